"""Tests for lm_jax.data.text: tokenize and Vocab."""
import collections
import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.data import text

WORDS = st.lists(st.sampled_from(["a", "b", "c", "dd", "é", "<unk>", "<eos>", "x y"]),
                 max_size=40)


def test_tokenize_word_and_char():
  assert text.tokenize("  the time\tmachine \n") == ["the", "time", "machine"]
  assert text.tokenize("ab c", level="char") == ["a", "b", " ", "c"]
  assert text.tokenize("", level="word") == []


def test_tokenize_bad_level():
  with pytest.raises(ValueError, match="level='byte'"):
    text.tokenize("a", level="byte")


def test_ids_reserved_first_then_by_frequency_ties_by_string():
  vocab = text.Vocab.build("b a c a b a d <eos> <unk> <unk>".split())
  assert vocab.tokens == ("<unk>", "<pad>", "<bos>", "<eos>", "a", "b", "c", "d")
  assert (vocab.unk_id, vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2, 3)
  # Reserved tokens found in the corpus keep their reserved id and their counts.
  assert vocab.counts.tolist() == [2, 0, 0, 1, 3, 2, 1, 1]
  assert vocab.counts.dtype == np.int64
  assert len(vocab) == 8
  assert vocab["a"] == vocab.token_to_id("a") == 4


def test_min_freq_and_max_size_count_reserved_and_fold_into_unk():
  counts = {"a": 5, "b": 3, "c": 2, "d": 1}
  vocab = text.Vocab.from_counts(counts, min_freq=2)
  assert vocab.tokens[4:] == ("a", "b", "c")
  assert vocab.counts[vocab.unk_id] == 1  # "d" is now <unk>
  vocab = text.Vocab.from_counts(counts, max_size=6)  # 4 reserved + 2 ordinary
  assert len(vocab) == 6 and vocab.tokens[4:] == ("a", "b")
  assert vocab.counts.sum() == sum(counts.values())
  assert vocab.to_ids(["c", "d", "a"]).tolist() == [0, 0, 4]


def test_max_size_smaller_than_reserved():
  with pytest.raises(ValueError, match="max_size=3 is smaller than the 4 reserved"):
    text.Vocab.from_counts({"a": 1}, max_size=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"min_freq": -1}, "min_freq must be"),
    ({"reserved": ("<pad>",)}, "must contain '<unk>'"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    text.Vocab.from_counts({"a": 1}, **kwargs)


def test_bad_counts():
  with pytest.raises(ValueError, match="count of 'a' is -1"):
    text.Vocab.from_counts({"a": -1})
  with pytest.raises(ValueError, match="tokens must be str"):
    text.Vocab.from_counts({3: 1})
  with pytest.raises(ValueError, match="duplicate tokens"):
    text.Vocab(tokens=text.RESERVED_TOKENS + ("a", "a"), counts=np.zeros(6))
  with pytest.raises(ValueError, match="2 tokens but counts has shape"):
    text.Vocab(tokens=("<unk>", "a"), counts=np.zeros(3), reserved=("<unk>",))


def test_custom_reserved():
  vocab = text.Vocab.build(["a", "b", "a"], reserved=("<unk>", "<eos>"))
  assert vocab.tokens == ("<unk>", "<eos>", "a", "b") and vocab.eos_id == 1
  with pytest.raises(KeyError, match="'<pad>' is not in"):
    _ = vocab.pad_id


@settings(deadline=None, max_examples=50)
@given(WORDS, st.integers(0, 3), st.one_of(st.none(), st.integers(4, 9)))
def test_counts_are_the_histogram_of_the_mapped_corpus(tokens, min_freq, max_size):
  vocab = text.Vocab.build(tokens, min_freq=min_freq, max_size=max_size)
  ids = vocab.to_ids(tokens)
  assert ids.dtype == np.int32 and ids.shape == (len(tokens),)
  np.testing.assert_array_equal(vocab.counts, np.bincount(ids, minlength=len(vocab)))
  ordinary = vocab.counts[len(vocab.reserved):]
  assert np.all(np.diff(ordinary) <= 0)  # decreasing frequency
  assert max_size is None or len(vocab) <= max_size
  # Every kept token round-trips; the others become <unk>.
  back = vocab.to_tokens(ids)
  assert all(b == t or (b == "<unk>" and t not in vocab) for b, t in zip(back, tokens))


def test_build_is_deterministic_regardless_of_order():
  tokens = "x y z y x w".split()
  assert text.Vocab.build(tokens) == text.Vocab.build(tokens[::-1])
  assert hash(text.Vocab.build(tokens)) == hash(text.Vocab.build(tokens[::-1]))
  assert text.Vocab.build(tokens) != text.Vocab.build(tokens + ["w"])
  assert text.Vocab.build(tokens) != "not a vocab"


def test_immutable():
  vocab = text.Vocab.build(["a"])
  with pytest.raises(dataclasses.FrozenInstanceError):
    vocab.tokens = ()
  with pytest.raises(ValueError, match="read-only"):
    vocab.counts[0] = 7


def test_to_tokens_checks_ids():
  vocab = text.Vocab.build(["a"])
  assert vocab.to_tokens(np.array([4, 3])) == ["a", "<eos>"]
  assert vocab.to_tokens([]) == []
  with pytest.raises(ValueError, match=r"id 5 is outside the vocabulary \[0, 5\)"):
    vocab.to_tokens([5])
  with pytest.raises(ValueError, match="1-D integer"):
    vocab.to_tokens([[1]])


def test_save_load_roundtrip(tmp_path):
  vocab = text.Vocab.build("ünï cödé ünï 日本 <eos>".split(), reserved=("<unk>", "<eos>"))
  path = tmp_path / "vocab.json"
  vocab.save(path)
  loaded = text.Vocab.load(path)
  assert loaded == vocab and loaded.tokens == vocab.tokens
  assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a vocabulary JSON file"),
    ("[1, 2]", "not a vocabulary file"),
    ('{"format": "lm_jax.Vocab", "version": 99}', "version 99 is not supported"),
    ('{"format": "lm_jax.Vocab", "version": 1, "tokens": []}', "lacks"),
    ('{"format": "lm_jax.Vocab", "version": 1, "tokens": ["<unk>"], "counts": [1.5],'
     ' "reserved": ["<unk>"]}', "list of integers"),
    ('{"format": "lm_jax.Vocab", "version": 1, "tokens": ["<unk>"], "counts": [1, 2],'
     ' "reserved": ["<unk>"]}', "malformed vocabulary: 1 tokens"),
    ('{"format": "lm_jax.Vocab", "version": 1, "tokens": ["a", "<unk>"], "counts": [1, 2],'
     ' "reserved": ["<unk>"]}', "must start with the reserved"),
])
def test_load_malformed(tmp_path, content, match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=match) as info:
    text.Vocab.load(path)
  assert "bad.json" in str(info.value)


def test_counter_input():
  vocab = text.Vocab.from_counts(collections.Counter("abracadabra"))
  assert vocab.tokens[4:] == ("a", "b", "r", "c", "d")
