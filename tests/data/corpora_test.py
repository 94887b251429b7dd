"""Tests for lm_jax.data.corpora: streaming readers, loaders and the Corpus container."""
import dataclasses
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.data import corpora
from lm_jax.data import synthetic

# No final-sigma letters: str.lower() of a lone "Σ" depends on its neighbours.
ALPHABET = "ab Zq\n\n\t\r.,-é日€İ\u00a0\u2028"


def reference_tokens(s, level="word", add_eos=True, lowercase=False, letters_only=False):
  """The reader's specification, applied to the whole text at once."""
  s = s[1:] if s.startswith("\ufeff") else s

  def clean(x):
    x = re.sub("[^A-Za-z]+", " ", x) if letters_only else x
    return x.lower() if lowercase else x

  if level == "char" and not add_eos:
    return list(clean(s))
  lines = s.split("\n")
  if lines[-1] == "":
    lines.pop()
  out = []
  for line in lines:
    out += clean(line).split() if level == "word" else list(clean(line))
    if add_eos:
      out.append("<eos>")
  return out


def write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
  return path


def test_word_level_eos_per_line_blank_lines_and_last_line(tmp_path):
  path = write(tmp_path, "a.txt", " the cat \n\n = Head = \r\nlast")
  assert corpora.read_tokens(path) == ["the", "cat", "<eos>", "<eos>", "=", "Head", "=",
                                       "<eos>", "last", "<eos>"]
  assert corpora.read_tokens(path, add_eos=False) == ["the", "cat", "=", "Head", "=", "last"]


def test_char_level(tmp_path):
  path = write(tmp_path, "a.txt", "Ab, c\nd\n")
  assert corpora.read_tokens(path, level="char", add_eos=False) == list("Ab, c\nd\n")
  assert corpora.read_tokens(path, level="char", add_eos=True) == [
      "A", "b", ",", " ", "c", "<eos>", "d", "<eos>"]
  # D2L's Time Machine preprocessing: runs of non-letters (newlines too) become one space.
  assert "".join(corpora.read_tokens(path, level="char", add_eos=False, lowercase=True,
                                     letters_only=True, chunk_bytes=1)) == "ab c d "


@settings(deadline=None, max_examples=50)
@given(st.text(ALPHABET, max_size=60), st.integers(1, 9), st.sampled_from(["word", "char"]),
       st.booleans(), st.booleans(), st.booleans())
def test_streaming_equals_whole_text(tmp_path_factory, s, chunk_bytes, level, add_eos,
                                     lowercase, letters_only):
  path = write(tmp_path_factory.mktemp("s"), "t.txt", s)
  expected = reference_tokens(s, level, add_eos, lowercase, letters_only)
  if not expected:
    with pytest.raises(corpora.CorpusError, match="no tokens"):
      corpora.read_tokens(path, level=level, add_eos=add_eos, lowercase=lowercase,
                          letters_only=letters_only, chunk_bytes=chunk_bytes)
    return
  assert corpora.read_tokens(path, level=level, add_eos=add_eos, lowercase=lowercase,
                             letters_only=letters_only, chunk_bytes=chunk_bytes) == expected


def test_very_long_line_in_small_chunks(tmp_path):
  words = [f"w{i % 1000}" for i in range(200_000)]
  path = write(tmp_path, "long.txt", " ".join(words) + "\nend")
  tokens = corpora.read_tokens(path, chunk_bytes=4096)
  assert tokens == words + ["<eos>", "end", "<eos>"]


def test_byte_order_mark_is_dropped(tmp_path):
  path = write(tmp_path, "bom.txt", b"\xef\xbb\xbfhello world\n")
  assert corpora.read_tokens(path, chunk_bytes=2) == ["hello", "world", "<eos>"]


@settings(deadline=None, max_examples=40)
@given(st.text("ab é日\n", max_size=30), st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]),
       st.integers(1, 8))
def test_invalid_utf8_names_file_and_byte_offset(tmp_path_factory, prefix, bad, chunk_bytes):
  data = prefix.encode("utf-8") + bad + "tail é".encode("utf-8")
  path = write(tmp_path_factory.mktemp("u"), "bad.txt", data)
  offset = len(prefix.encode("utf-8"))
  with pytest.raises(corpora.CorpusError, match=f"bad.txt: invalid UTF-8 at byte offset "
                     f"{offset} "):
    corpora.read_tokens(path, chunk_bytes=chunk_bytes)


def test_truncated_character_at_end_of_file(tmp_path):
  path = write(tmp_path, "trunc.txt", "abc é".encode("utf-8")[:-1])
  with pytest.raises(corpora.CorpusError, match="trunc.txt: invalid UTF-8 at byte offset 4"):
    corpora.read_tokens(path, chunk_bytes=3)


def test_missing_empty_and_blank_files(tmp_path):
  with pytest.raises(corpora.CorpusError, match="nope.txt: cannot open"):
    corpora.read_tokens(tmp_path / "nope.txt")
  with pytest.raises(corpora.CorpusError, match="empty.txt: no tokens .empty file"):
    corpora.read_tokens(write(tmp_path, "empty.txt", ""))
  with pytest.raises(corpora.CorpusError, match="blank.txt: no tokens .only blanks"):
    corpora.read_tokens(write(tmp_path, "blank.txt", " \n\t\n"), add_eos=False)
  with pytest.raises(ValueError, match="level='bpe'"):
    corpora.read_tokens(write(tmp_path, "x.txt", "x"), level="bpe")


def make_ptb(tmp_path):
  d = tmp_path / "ptb"
  d.mkdir()
  write(d, "ptb.train.txt", " the cat <unk> sat \n the dog sat \n")
  write(d, "ptb.valid.txt", " the bird sat \n")
  write(d, "ptb.test.txt", " a cat \n")
  return d


def test_load_ptb_tiny(tmp_path):
  corpus = corpora.load_ptb(make_ptb(tmp_path))
  vocab = corpus.vocab
  assert vocab.tokens == ("<unk>", "<pad>", "<bos>", "<eos>", "sat", "the", "cat", "dog")
  assert vocab.counts.tolist() == [1, 0, 0, 2, 2, 2, 1, 1]
  assert corpus.train.tolist() == [5, 6, 0, 4, 3, 5, 7, 4, 3]
  assert corpus.valid.tolist() == [5, 0, 4, 3] and corpus.test.tolist() == [0, 6, 3]
  # A literal <unk> in the text is not out-of-vocabulary; "bird" and "a" are.
  assert corpus.oov_counts == {"train": 0, "valid": 1, "test": 1}
  assert corpus.level == "word" and corpus.true_entropy_bits is None
  assert corpus.train.dtype == np.int32 and not corpus.train.flags.writeable
  assert corpora.load_corpus("ptb", tmp_path).train.tolist() == corpus.train.tolist()


def test_load_ptb_missing_split(tmp_path):
  d = make_ptb(tmp_path)
  os.remove(d / "ptb.test.txt")
  with pytest.raises(corpora.CorpusError, match="ptb.test.txt: cannot open"):
    corpora.load_ptb(d)


def test_load_wikitext2_blank_lines_get_eos(tmp_path):
  d = tmp_path / "wikitext-2"
  d.mkdir()
  write(d, "wiki.train.tokens", " \n = Title = \n \n Some text . \n")
  write(d, "wiki.valid.tokens", " Some = \n")
  write(d, "wiki.test.tokens", " text \n")
  corpus = corpora.load_corpus("wikitext2", tmp_path)
  assert corpus.vocab.to_tokens(corpus.train) == [
      "<eos>", "=", "Title", "=", "<eos>", "<eos>", "Some", "text", ".", "<eos>"]
  assert corpus.name == "wikitext2" and corpus.oov_counts["valid"] == 0


def test_load_text_split_by_fraction(tmp_path):
  path = write(tmp_path, "book.txt", "abcdefghij" * 2)
  corpus = corpora.load_text(path, valid_fraction=0.25, test_fraction=0.1)
  assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (13, 5, 2)
  assert "".join(corpus.vocab.to_tokens(corpus.valid)) == "defgh"
  assert corpus.name == "book" and corpus.level == "char"
  assert corpora.load_text(path).test is None


def test_load_text_with_validation_and_test_files(tmp_path):
  train = write(tmp_path, "train.txt", "abcabc")
  valid = write(tmp_path, "valid.txt", "cab")
  test = write(tmp_path, "test.txt", "bad")  # 'd' unseen in train: <unk>
  corpus = corpora.load_text(train, valid_path=valid, test_path=test)
  assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [6, 3, 3]
  assert corpus.vocab.to_tokens(corpus.test) == ["b", "a", "<unk>"]
  assert corpus.oov_counts == {"train": 0, "valid": 0, "test": 1}
  only_valid = corpora.load_text(train, valid_path=valid, test_fraction=0.5)  # test: the end
  assert "".join(only_valid.vocab.to_tokens(only_valid.test)) == "abc"
  with pytest.raises(corpora.CorpusError, match="missing.txt: cannot open"):
    corpora.load_text(train, valid_path=str(tmp_path / "missing.txt"))


def test_load_text_unseen_characters_are_oov(tmp_path):
  path = write(tmp_path, "t.txt", "aaaaaaaaab")
  corpus = corpora.load_text(path, valid_fraction=0.1)
  assert corpus.oov_counts == {"train": 0, "valid": 1}
  assert corpus.valid.tolist() == [corpus.vocab.unk_id]


def test_load_text_empty_split(tmp_path):
  path = write(tmp_path, "tiny.txt", "abc")
  with pytest.raises(corpora.CorpusError, match="split 'valid' has no tokens"):
    corpora.load_text(path, valid_fraction=0.1)
  with pytest.raises(corpora.CorpusError, match="valid_fraction"):
    corpora.load_text(path, valid_fraction=0.6, test_fraction=0.5)


def test_load_corpus_text_and_presets(tmp_path):
  write(tmp_path, "x.txt", "Hello, World!\nHi.\n" * 5)
  corpus = corpora.load_corpus("text", tmp_path, path="x.txt", level="word", lowercase=True,
                               letters_only=True)
  assert set(corpus.vocab.tokens[4:]) == {"hello", "world", "hi"}
  (tmp_path / "timemachine").mkdir()
  write(tmp_path / "timemachine", "timemachine.txt", "The Time-Machine.\n" * 10)
  tm = corpora.load_corpus("timemachine", tmp_path)
  assert tm.name == "timemachine" and tm.level == "char"
  assert sorted(tm.vocab.tokens[4:]) == sorted(set("the time machine "))
  with pytest.raises(corpora.CorpusError, match="needs path="):
    corpora.load_corpus("text", tmp_path)
  with pytest.raises(corpora.CorpusError, match="unknown corpus 'penn'"):
    corpora.load_corpus("penn")


def test_load_synthetic():
  corpus = corpora.load_synthetic(seed=3, vocab_size=20, num_train=5000, num_valid=500,
                                  num_test=0)
  lang = synthetic.make_language(20, seed=3)
  assert corpus.true_entropy_bits == lang.entropy_rate_bits
  assert len(corpus.vocab) == 24 and corpus.test is None
  assert (len(corpus.train), len(corpus.valid)) == (5000, 500)
  assert corpus.oov_counts == {"train": 0, "valid": 0}
  assert np.all(corpus.train >= 4)  # reserved ids never occur
  counts = corpus.vocab.counts[4:]
  assert np.all(np.diff(counts) <= 0) and counts.sum() == 5000
  again = corpora.load_corpus("synthetic", seed=3, vocab_size=20, num_train=5000,
                              num_valid=500, num_test=0)
  np.testing.assert_array_equal(again.train, corpus.train)
  assert again.vocab == corpus.vocab
  with pytest.raises(corpora.CorpusError, match="split 'valid' has no tokens"):
    corpora.load_synthetic(vocab_size=20, num_train=100, num_valid=0)


def test_corpus_validates_splits():
  vocab = corpora.text.Vocab.build(["a"])
  with pytest.raises(corpora.CorpusError, match="split 'valid' has no tokens"):
    corpora.Corpus("c", vocab, np.array([4]), np.array([], np.int32), None, "word")
  with pytest.raises(corpora.CorpusError, match=r"'train' has ids outside \[0, 5\)"):
    corpora.Corpus("c", vocab, np.array([5]), np.array([4]), None, "word")
  corpus = corpora.Corpus("c", vocab, [4, 4], np.array([4]), None, "word")
  with pytest.raises(dataclasses.FrozenInstanceError):
    corpus.train = None


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("LM_JAX_DATA_DIR", "/some/where")
  assert corpora.default_data_dir() == "/some/where"
  monkeypatch.delenv("LM_JAX_DATA_DIR")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(corpora.__file__))))
  assert corpora.default_data_dir() == os.path.normpath(
      os.path.join(repo, "..", "shared", "data"))


@pytest.mark.slow
def test_real_corpora_counts_match_the_data_readme():
  data_dir = corpora.default_data_dir()
  if not os.path.isdir(os.path.join(data_dir, "ptb")):
    pytest.skip(f"no real corpora under {data_dir}")
  ptb = corpora.load_corpus("ptb", data_dir)
  assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
  assert np.count_nonzero(ptb.vocab.counts) == 10_000 and len(ptb.vocab) == 10_002
  assert ptb.oov_counts == {"train": 0, "valid": 0, "test": 0}
  wiki = corpora.load_corpus("wikitext2", data_dir)
  assert (len(wiki.train), len(wiki.valid), len(wiki.test)) == (2_088_628, 217_646, 245_569)
  assert np.count_nonzero(wiki.vocab.counts) == 33_278
  tm_path = os.path.join(data_dir, "timemachine", "timemachine.txt")
  assert len(corpora.read_tokens(tm_path, add_eos=False, lowercase=True,
                                 letters_only=True)) == 32_775
  tm = corpora.load_corpus("timemachine", data_dir)
  assert len(tm.vocab) == 31 and len(tm.train) + len(tm.valid) == 173_428


def test_a_line_too_long_to_read_at_once_is_streamed(tmp_path, monkeypatch):
  """A 4 MB file with no newline: the reader never holds more than one chunk of text."""
  from lm_jax.data import text
  path = tmp_path / "one_line.txt"
  with open(path, "wb") as f:
    f.write(b"ab " * ((4 << 20) // 3))
  pieces = []
  real_feed = text.StreamTokenizer.feed
  monkeypatch.setattr(text.StreamTokenizer, "feed",
                      lambda self, piece: pieces.append(len(piece)) or real_feed(self, piece))
  tokens = corpora.read_tokens(path, level="word", chunk_bytes=1 << 16)
  assert len(tokens) == (4 << 20) // 3 + 1 and tokens[-1] == "<eos>"
  assert max(pieces) <= 1 << 16 and len(pieces) > 20


def test_load_text_max_tokens_keeps_the_first_tokens(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text("abcdefghij" * 3, encoding="utf-8")
  corpus = corpora.load_text(path, level="char", max_tokens=10)
  assert len(corpus.train) + len(corpus.valid) == 10
  assert corpus.vocab.to_tokens(list(corpus.train)) == list("abcdefghi")  # valid: the "j"
  with pytest.raises(corpora.CorpusError, match="max_tokens must be >= 0"):
    corpora.load_text(path, level="char", max_tokens=-1)
