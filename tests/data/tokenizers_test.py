"""Tests for lm_jax.data.tokenizers: the four tokenizers, BPE's no-<unk> promise, saving."""
import json
import sys

import numpy as np

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_jax.data import corpora
from lm_jax.data import tokenizers
from lm_jax.data.tokenizers import TextTokenizer

TEXT = "It's a well-known fact: value. Don't panic!\n\n(3.14) x_y\n"


@pytest.fixture(scope="module")
def bpe():
  pytest.importorskip("tokenizers")  # the 'tokenizers' extra (in 'test')
  return tokenizers.train_bpe([TEXT * 20 + "the cat sat on the mat\n" * 30], 300)


def test_words_split_punctuation_and_end_lines():
  assert TextTokenizer("words").tokenize(TEXT) == [
      "It's", "a", "well-known", "fact", ":", "value", ".", "Don't", "panic", "!", "<eos>",
      "<eos>", "(", "3.14", ")", "x", "_", "y", "<eos>"]
  # A prompt's unfinished last line gets no <eos>; a finished one does.
  assert TextTokenizer("words").tokenize("a b.\nc", end_last_line=False) == [
      "a", "b", ".", "<eos>", "c"]
  assert TextTokenizer("words").tokenize("a\nc") == ["a", "<eos>", "c", "<eos>"]


def test_whitespace_and_char_are_the_older_levels():
  assert TextTokenizer("whitespace").tokenize(TEXT) == TEXT.split()
  assert TextTokenizer("char").tokenize(TEXT) == list(TEXT)
  assert corpora.LEVEL_TOKENIZERS == {"char": "char", "word": "whitespace"}


def test_letters_only_is_one_rule_for_every_tokenizer():
  """D2L's rule (a newline is a non-letter too) for all, so bits per character count the
  same characters whatever the tokenizer."""
  text = "Ab, C!\nD."
  cleaned = {n: TextTokenizer(n, lowercase=True, letters_only=True).clean(text)
             for n in ("char", "whitespace", "words")}
  assert set(cleaned.values()) == {"ab c d "}
  assert TextTokenizer("words", lowercase=True, letters_only=True).tokenize(text) == [
      "ab", "c", "d", "<eos>"]


@pytest.mark.parametrize("text,expected", [
    ("Hello, world. (Yes) $5 100%\nNext line!\n", "Hello, world. (Yes) $5 100%\nNext line!\n"),
    ("a  b\n", "a b\n"),  # spacing is not kept: one space between words
])
def test_words_detokenize(text, expected):
  t = TextTokenizer("words")
  assert t.detokenize(t.tokenize(text)) == expected


def test_whitespace_and_char_detokenize():
  assert TextTokenizer("whitespace").detokenize(["a", "b", "<eos>", "c"]) == "a b\nc"
  assert TextTokenizer("char").detokenize(list("ab\nc")) == "ab\nc"


def test_line_break_tokens_and_reserved_tokens_in_bpe_text(bpe):
  assert TextTokenizer("words").line_break == ["<eos>"]
  assert TextTokenizer("char").line_break == ["\n"]
  assert TextTokenizer("whitespace").line_break == []
  assert bpe.detokenize(bpe.line_break) == "\n"
  # A sampled reserved token: <eos> is a line break, the others are not text.
  tokens = bpe.tokenize("the cat") + ["<eos>", "<pad>", "<unk>"] + bpe.tokenize("sat")
  assert bpe.detokenize(tokens) == "the cat\nsat"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_bpe_encodes_any_text_without_unk_and_decodes_it_exactly(bpe, s):
  """Byte-level: every UTF-8 string maps to tokens of the model and back, losslessly."""
  tokens = bpe.tokenize(s)
  vocab = set(tokenizers.bpe_vocabulary(bpe))
  assert all(t in vocab for t in tokens)
  assert bpe.detokenize(tokens) == s


def test_bpe_is_deterministic_and_learns_merges(bpe):
  again = tokenizers.train_bpe([TEXT * 20 + "the cat sat on the mat\n" * 30], 300)
  assert again.bpe.to_str() == bpe.bpe.to_str()
  assert len(bpe.tokenize("the cat sat on the mat\n")) < len("the cat sat on the mat\n") / 2
  with pytest.raises(tokenizers.TokenizerError, match="must be >= 256"):
    tokenizers.train_bpe(["abc"], 100)


@pytest.mark.parametrize("name", tokenizers.TOKENIZERS)
def test_save_and_load_round_trip(tmp_path, bpe, name):
  t = bpe if name == "bpe" else TextTokenizer(name, lowercase=True)
  t.save(tmp_path / "t.json")
  loaded = TextTokenizer.load(tmp_path / "t.json")
  assert loaded.config() == t.config()
  assert loaded.tokenize(TEXT) == t.tokenize(TEXT)


def test_load_errors_name_the_file(tmp_path):
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(tokenizers.TokenizerError, match="bad.json: not a tokenizer JSON"):
    TextTokenizer.load(tmp_path / "bad.json")
  (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
  with pytest.raises(tokenizers.TokenizerError, match="other.json: not a tokenizer file"):
    TextTokenizer.load(tmp_path / "other.json")
  (tmp_path / "broken.json").write_text(json.dumps(
      {"format": "lm_jax.TextTokenizer", "version": 1, "name": "bpe", "bpe": {"model": 3}}))
  with pytest.raises(tokenizers.TokenizerError, match="broken.json: malformed BPE model"):
    TextTokenizer.load(tmp_path / "broken.json")
  with pytest.raises(tokenizers.TokenizerError, match="'sentencepiece' is not one of"):
    TextTokenizer("sentencepiece")


def test_bpe_without_the_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
  with pytest.raises(tokenizers.TokenizerError, match=r"pip install 'lm_jax\[tokenizers\]'"):
    tokenizers.train_bpe(["abc"], 300)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def test_load_text_splits_by_characters_at_word_boundaries(tmp_path):
  text = "the cat sat on a mat.\n" * 40  # 0.21 of it ends inside "on"
  path = _write(tmp_path, "book.txt", text)
  for name in ("words", "bpe"):
    if name == "bpe":
      pytest.importorskip("tokenizers")
    corpus = corpora.load_text(path, tokenizer=name, valid_fraction=0.21, test_fraction=0.1,
                               **({"bpe_vocab_size": 260} if name == "bpe" else {}))
    assert sum(corpus.characters.values()) == len(text)
    assert corpus.characters["valid"] == pytest.approx(0.21 * len(text), abs=8)
    assert corpus.tokenizer.name == name and corpus.level == "word"
    # No word cut in two: each held-out piece starts at a space (a piece of a word would
    # also be a type the training split lacks).
    assert corpus.oov_counts["valid"] == 0
    if name == "bpe":  # BPE's text is exact: it starts at the space after "on"
      valid_text = corpus.tokenizer.detokenize(corpus.vocab.to_tokens(corpus.valid))
      assert valid_text.startswith(" a mat."), valid_text[:10]
  char = corpora.load_text(path, valid_fraction=0.2, test_fraction=0.1)
  assert char.characters == {"train": len(char.train), "valid": len(char.valid),
                             "test": len(char.test)}  # char: one token per character
  assert char.chars_per_token("valid") == 1.0


def test_load_text_bpe_never_reads_unk(tmp_path):
  pytest.importorskip("tokenizers")
  path = _write(tmp_path, "book.txt", "the cat sat on the mat.\n" * 50)
  valid = _write(tmp_path, "valid.txt", "Ünïcödé 🙂 ∑ never seen\n")
  corpus = corpora.load_text(path, tokenizer="bpe", valid_path=valid, bpe_vocab_size=280)
  assert corpus.oov_counts == {"train": 0, "valid": 0}
  # Every BPE token has an id, seen or not (a corpus this small has fewer merges than asked).
  assert len(corpus.vocab) == corpus.tokenizer.bpe.get_vocab_size() + 4 > 256 + 4
  assert corpus.tokenizer.detokenize(corpus.vocab.to_tokens(corpus.valid)) == (
      "Ünïcödé 🙂 ∑ never seen\n")
  with pytest.raises(corpora.CorpusError, match="do not apply to the BPE tokenizer"):
    corpora.load_text(path, tokenizer="bpe", max_size=100)


def test_load_text_max_vocab_and_min_count(tmp_path):
  path = _write(tmp_path, "book.txt", "a a a a b b b c c d\n" * 10 + "a b\n")
  capped = corpora.load_text(path, tokenizer="whitespace", max_size=6, valid_fraction=0.05)
  assert capped.vocab.tokens[4:] == ("a", "b")
  rare = corpora.load_text(path, tokenizer="whitespace", min_freq=15, valid_fraction=0.05)
  assert rare.vocab.tokens[4:] == ("a", "b", "c")  # d: 9 in train, now <unk>
  assert int(rare.vocab.counts[rare.vocab.unk_id]) == 9
  with pytest.raises(corpora.CorpusError, match="max_tokens=5 applies to the char and "):
    corpora.load_text(path, tokenizer="words", max_tokens=5)
  with pytest.raises(corpora.CorpusError, match="give tokenizer= .* or level="):
    corpora.load_text(path, tokenizer="words", level="word")


def test_char_and_whitespace_split_by_token_counts_as_the_older_levels(tmp_path):
  """--level=char/word workdirs resume: their splits are cut by token counts as before
  (a 'line i' text: the valid split starts at a token, whatever the character count)."""
  text = "".join(f"w{i} {'x' * (i % 7)}\n" for i in range(50))
  path = _write(tmp_path, "lines.txt", text)
  words = text.split()
  corpus = corpora.load_text(path, level="word", valid_fraction=0.2, test_fraction=0.1)
  n_valid, n_test = round(len(words) * 0.2), round(len(words) * 0.1)
  n_train = len(words) - n_valid - n_test
  for split, expected in (("valid", words[n_train:n_train + n_valid]),
                          ("test", words[n_train + n_valid:])):
    ids = getattr(corpus, split)
    assert len(ids) == len(expected)
    assert corpus.vocab.to_tokens(ids) == [w if w in corpus.vocab else "<unk>" for w in expected]
  assert sum(corpus.characters.values()) == len(text)
  capped = corpora.load_text(path, tokenizer="whitespace", max_tokens=20)
  assert len(capped.train) + len(capped.valid) == 20


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="ab Zq\n\n\t\r.,-\u00e9\u65e5\u20ac", min_size=20, max_size=120),
       st.sampled_from(["char", "word"]), st.booleans(), st.booleans(),
       st.sampled_from([0, 15]))
def test_older_levels_load_as_the_token_count_split_of_read_tokens(
    tmp_path, s, level, lowercase, letters_only, max_tokens):
  """The specification of --level=char/word text corpora before tokenizers existed:
  read_tokens' tokens, the first max_tokens kept, round(n f) tokens for valid and test."""
  path = _write(tmp_path, "t.txt", s)
  kwargs = dict(lowercase=lowercase, letters_only=letters_only)
  try:
    tokens = corpora.read_tokens(path, level=level, add_eos=False, **kwargs)
  except corpora.CorpusError:
    return  # only blanks: load_text raises too
  tokens = tokens[:max_tokens] if max_tokens else tokens
  n = len(tokens)
  n_valid, n_test = round(n * 0.2), round(n * 0.1)
  n_train = n - n_valid - n_test
  expected = {"train": tokens[:n_train], "valid": tokens[n_train:n_train + n_valid],
              "test": tokens[n_train + n_valid:]}
  try:
    corpus = corpora.load_text(path, level=level, valid_fraction=0.2, test_fraction=0.1,
                               max_tokens=max_tokens, **kwargs)
  except corpora.CorpusError as e:
    assert "has no tokens" in str(e) and not all(expected.values())
    return
  vocab = corpora.text.Vocab.build(expected["train"])
  assert corpus.vocab == vocab
  for split, split_tokens in expected.items():
    np.testing.assert_array_equal(getattr(corpus, split), vocab.to_ids(split_tokens))
