r"""Corpora: streaming readers, the standard benchmarks and the synthetic default.

A :class:`Corpus` holds a vocabulary and whole-split token streams (``np.int32`` ids).
Readers stream files in bounded binary chunks through an incremental UTF-8 decoder
(invalid UTF-8 raises :class:`CorpusError` naming the file and the byte offset of the first
bad byte); ``read_tokens`` (PTB, WikiText-2) tokenizes as it reads, so a single line of any
length never needs one giant ``read()``. ``load_text`` (your own file) holds the decoded
text, about one to four bytes a character beside the token list: it cuts the text into its
splits before tokenizing them (BPE is learned on the training part) and counts their
characters for bits per character.

Word-level tokenization of the benchmarks follows ``text.StreamTokenizer``, the usual
setups' conventions, so token counts match the literature: with ``add_eos`` every line,
blank lines included, ends with one ``<eos>`` (PyTorch's ``word_language_model``; the data
README counts this way: on WikiText-2 each blank line between paragraphs gives a lone
``<eos>`` and the `` = Heading = `` lines are kept). Vocabularies come from the training split only;
tokens of other splits that it lacks become ``<unk>``, counted in ``Corpus.oov_counts``.

Vocabulary sizes: ``len(vocab)`` counts the four reserved tokens, so the real PTB gives
10 002 ids of which 10 000 occur (PTB already has ``<unk>``, ``<eos>`` is added;
``<pad>`` and ``<bos>`` never occur), WikiText-2 33 280 (33 278 occur), and the Time
Machine at char level with ``letters_only=True, lowercase=True`` 31 = 26 letters +
space + 4 reserved (D2L's 28 = 26 + space + ``<unk>``).
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator, Mapping

import numpy as np

from lm_jax.data import synthetic
from lm_jax.data import text
from lm_jax.data import tokenizers

_CHUNK_BYTES = 1 << 20
NAMES = ("synthetic", "ptb", "wikitext2", "text", "timemachine", "tinyshakespeare")
# The tokenizer each of the older ``level`` values names.
LEVEL_TOKENIZERS = {"char": "char", "word": "whitespace"}
# The text presets: their file under the data folder and how it is read (char tokenizer).
PRESETS = {"timemachine": ("timemachine/timemachine.txt",
                           {"lowercase": True, "letters_only": True}),
           "tinyshakespeare": ("tinyshakespeare/input.txt", {})}
_NEXT_SPACE = re.compile(r"\s")
_WORDS = re.compile(r"\S+")


def token_level(tokenizer_name: str) -> str:
  """``Corpus.level`` of a tokenizer: "char" for ``char``, else "word"."""
  return "char" if tokenizer_name == "char" else "word"


def bits_per_character(bits_per_token: float, tokens: int, characters: int) -> float:
  """Bits per token x tokens / characters: the one rule of the trainer's reports and of
  ``lm-jax-evaluate``, so that models of other tokenizations of the same text compare."""
  return bits_per_token * tokens / max(characters, 1)


class CorpusError(ValueError):
  """A corpus file or split that cannot be used (missing, empty, invalid UTF-8)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A vocabulary and its splits as whole token streams of ids (read-only ``np.int32``).

  ``true_entropy_bits`` is the entropy rate of the source when known (synthetic);
  ``oov_counts`` maps each split to the number of its tokens mapped to ``<unk>``
  because the vocabulary lacks them (a literal ``<unk>`` in the text is not counted);
  ``characters`` maps each split to its characters (as the tokenizer read them: after
  ``lowercase``/``letters_only``), the denominator of bits per character; absent for the
  synthetic language. ``tokenizer``: the one that read a text corpus (``load_text``), to be
  saved with a model; None for the word-level presets (PTB, WikiText-2) and synthetic.
  """
  name: str
  vocab: text.Vocab
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray | None
  level: str
  true_entropy_bits: float | None = None
  oov_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
  characters: Mapping[str, int] = dataclasses.field(default_factory=dict)
  tokenizer: tokenizers.TextTokenizer | None = None

  def chars_per_token(self, split: str) -> float | None:
    """Characters per token of ``split``; None when the corpus has no characters
    (synthetic)."""
    ids = getattr(self, split)
    if split not in self.characters or ids is None or not self.characters[split]:
      return None
    return self.characters[split] / len(ids)

  def bits_per_character(self, split: str, bits_per_token: float) -> float | None:
    """:func:`bits_per_character` of ``split``; None when it has no characters."""
    if not self.chars_per_token(split):
      return None
    return bits_per_character(bits_per_token, len(getattr(self, split)),
                              self.characters[split])

  def __post_init__(self):
    for split in ("train", "valid", "test"):
      ids = getattr(self, split)
      if ids is None and split == "test":
        continue
      ids = np.asarray(ids)
      if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise CorpusError(f"{self.name}: split {split!r} must be a 1-D integer array, got "
                          f"shape {ids.shape} dtype {ids.dtype}")
      if len(ids) == 0:
        raise CorpusError(f"{self.name}: split {split!r} has no tokens")
      if ids.min() < 0 or ids.max() >= len(self.vocab):
        raise CorpusError(f"{self.name}: split {split!r} has ids outside "
                          f"[0, {len(self.vocab)})")
      ids = ids.astype(np.int32)
      ids.setflags(write=False)
      object.__setattr__(self, split, ids)


def content_sha256(corpus: Corpus) -> str:
  """SHA-256 of what a model is trained and evaluated on: the vocabulary's tokens and every
  split's ids (little-endian int32, each split named and sized), not file names or paths.

  Equal for the same data loaded from anywhere; different for any changed token. About a
  second per 100M tokens, so computed once per load (resume checks compare it).
  """
  digest = hashlib.sha256()
  digest.update(json.dumps(list(corpus.vocab.tokens), ensure_ascii=False).encode("utf-8"))
  for split in ("train", "valid", "test"):
    ids = getattr(corpus, split)
    if ids is not None:
      digest.update(f"\0{split}:{len(ids)}\0".encode("ascii"))
      for start in range(0, len(ids), 1 << 22):  # 16 MB at a time: no full-size copy
        digest.update(np.ascontiguousarray(ids[start:start + (1 << 22)], dtype="<i4").tobytes())
  return digest.hexdigest()


def default_data_dir() -> str:
  """``$LM_JAX_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
  env = os.environ.get("LM_JAX_DATA_DIR")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.normpath(os.path.join(repo, "..", "shared", "data"))


def _pieces(path: str | os.PathLike, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[str]:
  """The text of a UTF-8 file, decoded in ``chunk_bytes`` binary chunks (a leading byte-order
  mark dropped); ``CorpusError`` naming the file if it cannot be opened or is not UTF-8
  (then with the byte offset of the first bad byte)."""
  path = os.fspath(path)
  if chunk_bytes < 1:
    raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
  decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
  offset, at_start = 0, True
  try:
    f = open(path, "rb")
  except OSError as e:
    raise CorpusError(f"{path}: cannot open corpus file ({e.strerror})") from None
  with f:
    while True:
      chunk = f.read(chunk_bytes)
      pending = len(decoder.getstate()[0])
      try:
        piece = decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte offset {offset - pending + e.start} "
                          f"({e.reason})") from None
      if at_start and piece:
        at_start = False
        if piece[0] == "\ufeff":
          piece = piece[1:]  # a byte-order mark is not text
      offset += len(chunk)
      if piece:
        yield piece
      if not chunk:
        return


def read_text(path: str | os.PathLike, *, chunk_bytes: int = _CHUNK_BYTES) -> str:
  """A whole UTF-8 file as one string (errors as :func:`read_tokens`)."""
  return "".join(_pieces(path, chunk_bytes))


def count_characters(path: str | os.PathLike) -> int:
  """Unicode characters in a UTF-8 file (a byte-order mark not counted)."""
  return sum(len(piece) for piece in _pieces(path))


def read_tokens(path: str | os.PathLike, *, level: str = "word", add_eos: bool = True,
                lowercase: bool = False, letters_only: bool = False,
                chunk_bytes: int = _CHUNK_BYTES) -> list[str]:
  """Reads a UTF-8 text file as tokens, streaming it in ``chunk_bytes`` binary chunks.

  Args:
    path: the file.
    level: "word" or "char".
    add_eos: end every line with ``<eos>`` (module docstring).
    lowercase: lower-case the text.
    letters_only: map runs of non-letters (not A-Z, a-z) to one space.
    chunk_bytes: read size in bytes; memory use is bounded by it (plus the output).

  Returns:
    The tokens. Raises ``CorpusError`` naming the file when it is missing, empty, has
    no tokens, or is not UTF-8 (then naming the byte offset of the first bad byte).
  """
  tokenizer = text.StreamTokenizer(level, add_eos=add_eos, lowercase=lowercase,
                                    letters_only=letters_only)
  empty = True
  for piece in _pieces(path, chunk_bytes):
    empty = False
    tokenizer.feed(piece)
  tokens = tokenizer.finish()
  if not tokens:
    raise CorpusError(f"{os.fspath(path)}: no tokens ({'empty file' if empty else 'only blanks'})")
  return tokens


def oov_count(tokens: list[str], ids: np.ndarray, vocab: text.Vocab) -> int:
  """How many of ``tokens`` map to ``<unk>`` (``ids``) without being ``<unk>`` in the text."""
  return int(np.count_nonzero(ids == vocab.unk_id)) - tokens.count("<unk>")


def _encode(name: str, level: str, splits: Mapping[str, list[str] | None], *,
            vocab: text.Vocab | None = None, true_entropy_bits: float | None = None,
            characters: Mapping[str, int] | None = None,
            tokenizer: tokenizers.TextTokenizer | None = None, **vocab_kwargs: Any) -> Corpus:
  """Builds the vocabulary from ``splits["train"]`` and maps every split to ids."""
  for split, tokens in splits.items():
    if tokens is not None and not tokens:
      raise CorpusError(f"{name}: split {split!r} has no tokens")
  if vocab is None:
    vocab = text.Vocab.build(splits["train"], **vocab_kwargs)
  arrays, oov = {}, {}
  for split, tokens in splits.items():
    if tokens is None:
      arrays[split] = None
      continue
    ids = vocab.to_ids(tokens)
    arrays[split] = ids
    oov[split] = oov_count(tokens, ids, vocab)
  return Corpus(name=name, vocab=vocab, train=arrays["train"], valid=arrays["valid"],
                test=arrays.get("test"), level=level, true_entropy_bits=true_entropy_bits,
                oov_counts=oov, characters=dict(characters or {}), tokenizer=tokenizer)


def _split_files(name: str, data_dir: str | None, files: tuple[str, str, str],
                 **vocab_kwargs: Any) -> Corpus:
  data_dir = default_data_dir() if data_dir is None else os.fspath(data_dir)
  paths = {split: os.path.join(data_dir, f) for split, f in zip(("train", "valid", "test"), files)}
  splits = {split: read_tokens(p, level="word", add_eos=True) for split, p in paths.items()}
  return _encode(name, "word", splits,
                 characters={split: count_characters(p) for split, p in paths.items()},
                 **vocab_kwargs)


def load_ptb(data_dir: str | os.PathLike | None = None, **vocab_kwargs: Any) -> Corpus:
  """Penn Treebank (Mikolov's LM version): ``ptb.{train,valid,test}.txt`` in ``data_dir``.

  ``data_dir`` is the folder holding the files; None: ``default_data_dir()/ptb``.
  Keyword arguments go to ``Vocab.from_counts`` (``min_freq``, ``max_size``, ``reserved``).
  """
  if data_dir is None:
    data_dir = os.path.join(default_data_dir(), "ptb")
  return _split_files("ptb", os.fspath(data_dir),
                      ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), **vocab_kwargs)


def load_wikitext2(data_dir: str | os.PathLike | None = None, **vocab_kwargs: Any) -> Corpus:
  """WikiText-2 (tokenized v1): ``wiki.{train,valid,test}.tokens`` in ``data_dir``.

  ``<eos>`` ends every line, blank lines included; None: ``default_data_dir()/wikitext-2``.
  """
  if data_dir is None:
    data_dir = os.path.join(default_data_dir(), "wikitext-2")
  return _split_files("wikitext2", os.fspath(data_dir),
                      ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
                      **vocab_kwargs)


def _word_boundary(text_: str, cut: int) -> int:
  """``cut`` moved forward to the next whitespace, so no word is cut in two."""
  found = _NEXT_SPACE.search(text_, cut)
  return found.start() if found else cut


def _token_cuts(text_: str, name: str, counts: tuple[int, ...]) -> tuple[int, ...]:
  """The character offsets where tokens number ``counts[0]``, ``counts[1]``, ... start
  (``len(text_)`` past the last token), for the char and whitespace tokenizers, which cut
  their splits by token counts (one pass, no list of all tokens)."""
  if name == "char":
    return tuple(min(c, len(text_)) for c in counts)
  cuts, wanted = [], sorted(counts)
  for i, match in enumerate(_WORDS.finditer(text_)):
    while wanted and wanted[0] == i:
      cuts.append(match.start())
      wanted.pop(0)
    if not wanted:
      break
  cuts += [len(text_)] * len(wanted)
  order = {c: cut for c, cut in zip(sorted(counts), cuts)}
  return tuple(order[c] for c in counts)


def _text_vocab(tokenizer: tokenizers.TextTokenizer, train: list[str],
                vocab_kwargs: dict[str, Any]) -> text.Vocab:
  """The training split's vocabulary; for BPE every token of the model (count 0 allowed),
  so that no UTF-8 text ever reads as ``<unk>``."""
  if tokenizer.name != "bpe":
    return text.Vocab.build(train, **vocab_kwargs)
  if set(vocab_kwargs) & {"min_freq", "max_size"}:
    raise CorpusError("min_freq / max_size do not apply to the BPE tokenizer: its size is "
                      "bpe_vocab_size")
  counts = dict.fromkeys(tokenizers.bpe_vocabulary(tokenizer), 0)
  for tok in train:
    counts[tok] = counts.get(tok, 0) + 1
  return text.Vocab.from_counts(counts, min_freq=0, **vocab_kwargs)


def load_text(path: str | os.PathLike, *,
              tokenizer: str | tokenizers.TextTokenizer | None = None,
              level: str | None = None, valid_fraction: float = 0.1,
              test_fraction: float = 0.0, lowercase: bool = False, letters_only: bool = False,
              name: str | None = None, max_tokens: int = 0,
              valid_path: str | os.PathLike | None = None,
              test_path: str | os.PathLike | None = None, bpe_vocab_size: int = 1024,
              **vocab_kwargs: Any) -> Corpus:
  """A plain text file, split contiguously: train first, then valid, then test.

  The (cleaned: ``lowercase``, ``letters_only``) text is cut into ``round(n * fraction)``
  tokens for valid and test for the char and whitespace tokenizers (as the older levels
  did), and into as many characters for words and BPE (whose tokens are only known once the
  split is, BPE being learned on the training part), each cut moved on to the next
  whitespace so that no word is cut in two. ``test_fraction=0`` gives ``test=None``.
  ``valid_path`` / ``test_path`` give those splits as files of their own (read the same
  way; the fraction of that split is then not taken from ``path``). Each split is then tokenized by
  ``tokenizer`` (a name of ``tokenizers.TOKENIZERS``, default "char", or a
  ``TextTokenizer``; ``level`` "char"/"word" is the older name of "char"/"whitespace");
  "bpe" learns a byte-level BPE of ``bpe_vocab_size`` tokens on the training split. The
  vocabulary comes from the training split only (``vocab_kwargs``: ``min_freq``,
  ``max_size``; not for BPE). The Time Machine in D2L's setting is ``load_text(path,
  tokenizer="char", lowercase=True, letters_only=True)``; D2L (0.17) also keeps only the
  first ``max_tokens=10000`` tokens (char and whitespace tokenizers only).
  """
  if level is not None:
    if level not in LEVEL_TOKENIZERS or tokenizer is not None:
      raise CorpusError(f"level={level!r}: give tokenizer= (one of {tokenizers.TOKENIZERS}) "
                        "or level= char|word, not both")
    tokenizer = LEVEL_TOKENIZERS[level]
  if isinstance(tokenizer, tokenizers.TextTokenizer):  # given: it also says how to clean
    kind, lowercase, letters_only = tokenizer.name, tokenizer.lowercase, tokenizer.letters_only
  else:
    kind = tokenizer or "char"
    if kind not in tokenizers.TOKENIZERS:
      raise CorpusError(f"tokenizer={kind!r} is not one of {tokenizers.TOKENIZERS}")
    # BPE is learned below, on the training part.
    tokenizer = None if kind == "bpe" else tokenizers.TextTokenizer(
        kind, lowercase=lowercase, letters_only=letters_only)
  if max_tokens < 0:
    raise CorpusError(f"max_tokens must be >= 0 (0: all), got {max_tokens}")
  by_tokens = kind in ("char", "whitespace")  # the older levels: split by token counts
  if max_tokens and not by_tokens:
    raise CorpusError(f"max_tokens={max_tokens} applies to the char and whitespace "
                      "tokenizers only")
  valid_fraction = 0.0 if valid_path else valid_fraction
  test_fraction = 0.0 if test_path else test_fraction
  if not ((valid_path or 0.0 < valid_fraction < 1.0) and 0.0 <= test_fraction < 1.0
          and valid_fraction + test_fraction < 1.0):
    raise CorpusError(f"need 0 < valid_fraction < 1, 0 <= test_fraction < 1 and their sum "
                      f"< 1, got {valid_fraction} and {test_fraction}")
  def read(file):
    return text.clean(read_text(file), lowercase=lowercase, letters_only=letters_only)

  whole = read(path)
  if by_tokens:
    if max_tokens:
      whole = whole[:_token_cuts(whole, kind, (max_tokens,))[0]]
    n = len(whole) if kind == "char" else sum(1 for _ in _WORDS.finditer(whole))
  else:
    n = len(whole)
  n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
  if by_tokens:
    a, b = _token_cuts(whole, kind, (n - n_valid - n_test, n - n_test))
  else:
    a = _word_boundary(whole, n - n_valid - n_test)
    b = max(a, _word_boundary(whole, n - n_test))
  texts = {"train": whole[:a],
           "valid": read(valid_path) if valid_path else whole[a:b],
           "test": (read(test_path) if test_path
                    else whole[b:] if test_fraction > 0 else None)}
  # A piece that ends inside the file's text does not end its last line (no <eos> there).
  ends_text = {"train": a >= len(whole), "valid": bool(valid_path) or b >= len(whole),
               "test": True}
  del whole
  if tokenizer is None:
    tokenizer = tokenizers.train_bpe([texts["train"]], bpe_vocab_size, lowercase=lowercase,
                                     letters_only=letters_only, cleaned=True)
  splits = {split: None if t is None else tokenizer.tokenize(
      t, cleaned=True, end_last_line=ends_text[split]) for split, t in texts.items()}
  for split, tokens in splits.items():
    if tokens is not None and not tokens:
      where = {"valid": valid_path, "test": test_path}.get(split) or path
      raise CorpusError(f"{os.fspath(where)}: split {split!r} has no tokens (a longer file, "
                        "or larger fractions)")
  name = name or os.path.splitext(os.path.basename(os.fspath(path)))[0]
  return _encode(name, token_level(kind), splits,
                 vocab=_text_vocab(tokenizer, splits["train"], vocab_kwargs),
                 characters={k: len(t) for k, t in texts.items() if t is not None},
                 tokenizer=tokenizer)


def load_synthetic(*, seed: int = 0, vocab_size: int = synthetic.DEFAULT_VOCAB_SIZE,
                   num_train: int = 1_000_000, num_valid: int = 100_000,
                   num_test: int = 100_000, **language_kwargs: Any) -> Corpus:
  """The synthetic Markov language of ``lm_jax.data.synthetic`` as a corpus (no files needed).

  Language token ``j`` is named ``"s{j}"``; the vocabulary keeps every one of them
  (sorted by train frequency, count 0 allowed), so there is never an ``<unk>`` and
  ``true_entropy_bits`` is the exact entropy rate of every split's source.
  Remaining keyword arguments go to ``synthetic.make_language``.
  """
  lang = synthetic.make_language(vocab_size, seed=seed, **language_kwargs)
  streams = {"train": synthetic.sample(lang, num_train, seed=seed * 3 + 1),
             "valid": synthetic.sample(lang, num_valid, seed=seed * 3 + 2),
             "test": synthetic.sample(lang, num_test, seed=seed * 3 + 3) if num_test else None}
  for split, symbols in streams.items():
    if symbols is not None and not len(symbols):
      raise CorpusError(f"synthetic: split {split!r} has no tokens (num_{split}=0)")
  names = [f"s{j}" for j in range(vocab_size)]
  counts = np.bincount(streams["train"], minlength=vocab_size)
  vocab = text.Vocab.from_counts(dict(zip(names, counts.tolist())), min_freq=0)
  symbol_to_id = vocab.to_ids(names)
  ids = {k: None if v is None else symbol_to_id[v] for k, v in streams.items()}
  return Corpus(name="synthetic", vocab=vocab, train=ids["train"], valid=ids["valid"],
                test=ids["test"], level="word", true_entropy_bits=lang.entropy_rate_bits,
                oov_counts={k: 0 for k, v in ids.items() if v is not None})


def load_corpus(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Corpus:
  """Loads a corpus by name; ``kwargs`` go to the loader.

  Names: "synthetic" (``load_synthetic``; ``data_dir`` unused), "ptb", "wikitext2"
  (``data_dir`` is the shared data folder holding ``ptb/`` and ``wikitext-2/``), "text"
  (``load_text``; needs ``path=``, relative paths are taken under ``data_dir`` if given),
  and the presets "timemachine" (D2L's: lower-cased letters and spaces, char level unless
  ``level="word"``) and "tinyshakespeare" (char level, last 10% for validation).
  """
  root = default_data_dir() if data_dir is None else os.fspath(data_dir)
  if name == "synthetic":
    return load_synthetic(**kwargs)
  if name == "ptb":
    return load_ptb(os.path.join(root, "ptb"), **kwargs)
  if name == "wikitext2":
    return load_wikitext2(os.path.join(root, "wikitext-2"), **kwargs)
  if name == "text":
    if "path" not in kwargs:
      raise CorpusError("load_corpus('text') needs path= (the text file)")
    path = os.fspath(kwargs.pop("path"))
    if data_dir is not None and not os.path.isabs(path):
      path = os.path.join(root, path)
    return load_text(path, **kwargs)
  if name in PRESETS:
    file, options = PRESETS[name]
    return load_text(os.path.join(root, *file.split("/")), **{**options, "name": name, **kwargs})
  raise CorpusError(f"unknown corpus {name!r}; expected one of {NAMES}")
