r"""Tokens and vocabularies: the host-side mapping between strings and integer ids.

A :class:`Vocab` is an immutable NumPy/Python object (no JAX arrays). Its ids are
ordered so that the large-vocabulary output layers can rely on them: the reserved
tokens come first (``<unk>`` = 0, ``<pad>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3 with the
default ``RESERVED_TOKENS``), then the ordinary tokens by decreasing corpus frequency,
ties broken by the token string, so that building twice gives the same ids.

>>> vocab = Vocab.build(tokenize("the cat saw the dog <eos>"))
>>> vocab.tokens
('<unk>', '<pad>', '<bos>', '<eos>', 'the', 'cat', 'dog', 'saw')
>>> vocab.to_ids(["the", "bird"]).tolist(), vocab.counts.tolist()
([4, 0], [0, 0, 0, 1, 2, 1, 1, 1])

References:
  Dive into Deep Learning, section 9.2 "Converting Raw Text into Sequence Data"
  (tokens, vocabulary, ``<unk>``).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

RESERVED_TOKENS = ("<unk>", "<pad>", "<bos>", "<eos>")
LEVELS = ("word", "char")
_NON_LETTERS = re.compile(r"[^A-Za-z]+")
_FORMAT = "lm_jax.Vocab"
_VERSION = 1


def clean(s: str, *, lowercase: bool = False, letters_only: bool = False) -> str:
  """``s`` with ``letters_only`` (every run of characters other than A-Z, a-z becomes one
  space; first, as D2L: "K" (Kelvin sign) is not a letter here) and ``lowercase`` applied."""
  if letters_only:
    s = _NON_LETTERS.sub(" ", s)
  return s.lower() if lowercase else s


def tokenize(line: str, level: str = "word") -> list[str]:
  """Splits a line into word tokens (on whitespace) or character tokens."""
  if level == "word":
    return line.split()
  if level == "char":
    return list(line)
  raise ValueError(f"level={level!r} is not one of {LEVELS}")


class StreamTokenizer:
  r"""Tokenizes text fed in pieces of any size exactly as if it came whole.

  Lines end at ``"\n"`` (so ``"\r\n"`` works: ``"\r"`` is whitespace). With ``add_eos``
  every line, blank lines included, ends with one ``<eos>`` (a last line without a
  newline too; a text ending in ``"\n"`` has no extra empty line); at char level the
  newline then becomes ``<eos>``, without ``add_eos`` it is a character. ``letters_only``
  maps each run of characters other than A-Z, a-z to ONE space (D2L's
  ``re.sub('[^A-Za-z]+', ' ', text)``, runs crossing pieces included; it is applied
  before ``lowercase``, as D2L does). Memory is bounded by the piece plus one word.

  >>> t = StreamTokenizer("word", add_eos=True)
  >>> for piece in ["the ca", "t\n\nsat"]:
  ...   t.feed(piece)
  >>> t.finish()
  ['the', 'cat', '<eos>', '<eos>', 'sat', '<eos>']
  """

  def __init__(self, level: str = "word", *, add_eos: bool = True, lowercase: bool = False,
               letters_only: bool = False):
    if level not in LEVELS:
      raise ValueError(f"level={level!r} is not one of {LEVELS}")
    self.level, self.add_eos = level, add_eos
    self.lowercase, self.letters_only = lowercase, letters_only
    self.tokens: list[str] = []
    self.carry = ""          # word level: the unfinished word at the end of the last piece
    self.line_open = False   # some character of the current line has been seen
    self.in_run = False      # char level, letters_only: last output was a mapped space

  def _clean(self, s: str) -> str:
    return clean(s, lowercase=self.lowercase, letters_only=self.letters_only)

  def _chars(self, s: str) -> None:
    s = self._clean(s)
    if self.letters_only and s:
      if self.in_run and s[0] == " ":
        s = s[1:]
      if s:
        self.in_run = s[-1] == " "
    self.tokens.extend(s)

  def feed(self, piece: str) -> None:
    """Tokenizes the next piece of text."""
    if not piece:
      return
    if self.level == "char" and not self.add_eos:
      self._chars(piece)
      return
    lines = piece.split("\n")
    for i, line in enumerate(lines):
      if i > 0:  # a newline ended the previous line
        self._end_line()
      if line:
        self.line_open = True
      if self.level == "char":
        self._chars(line)
        continue
      line = self.carry + line
      self.carry = ""
      if i == len(lines) - 1 and line and not line[-1].isspace():
        parts = line.rsplit(None, 1)  # keep the possibly unfinished last word for later
        self.carry = parts[-1]
        line = parts[0] if len(parts) == 2 else ""
      self.tokens.extend(self._clean(line).split())

  def _end_line(self) -> None:
    if self.carry:
      self.tokens.extend(self._clean(self.carry).split())
      self.carry = ""
    if self.add_eos:
      self.tokens.append("<eos>")
      self.in_run = False
    self.line_open = False

  def finish(self) -> list[str]:
    """Ends the text; returns all its tokens."""
    if self.line_open or self.carry:
      self._end_line()
    return self.tokens


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Vocab:
  """An immutable token <-> id mapping with the corpus count of every id.

  Attributes:
    tokens: tuple of strings, id -> token; the reserved tokens first.
    counts: read-only ``np.int64 [V]``, how often each id occurs in the corpus the
      vocabulary was built from once it is mapped to ids: ordinary tokens keep their
      counts, reserved tokens found in the corpus (PTB's ``<unk>``, ``<eos>``) keep
      theirs, tokens dropped by ``min_freq``/``max_size`` are added to ``<unk>``'s,
      and unseen reserved tokens count 0. So ``counts == bincount(to_ids(corpus))``.
    reserved: the reserved tokens, ``tokens[:len(reserved)]``.
  """
  tokens: tuple[str, ...]
  counts: np.ndarray
  reserved: tuple[str, ...] = RESERVED_TOKENS
  _index: dict[str, int] = dataclasses.field(init=False, compare=False)

  def __post_init__(self):
    tokens, reserved = tuple(self.tokens), tuple(self.reserved)
    counts = np.array(self.counts, dtype=np.int64).reshape(-1)
    if len(counts) != len(tokens):
      raise ValueError(f"{len(tokens)} tokens but counts has shape {counts.shape}")
    if np.any(counts < 0):
      raise ValueError(f"counts must be >= 0, got min {counts.min()}")
    if not all(isinstance(t, str) for t in tokens):
      raise ValueError("every token must be a str")
    if tokens[:len(reserved)] != reserved:
      raise ValueError(f"tokens must start with the reserved tokens {reserved}, "
                       f"got {tokens[:len(reserved)]}")
    if "<unk>" not in reserved:
      raise ValueError(f"reserved={reserved} must contain '<unk>' (unknown tokens map to it)")
    index = {tok: i for i, tok in enumerate(tokens)}
    if len(index) != len(tokens):
      dup = [t for t, c in collections.Counter(tokens).items() if c > 1]
      raise ValueError(f"duplicate tokens: {dup[:5]}")
    counts.setflags(write=False)
    object.__setattr__(self, "tokens", tokens)
    object.__setattr__(self, "reserved", reserved)
    object.__setattr__(self, "counts", counts)
    object.__setattr__(self, "_index", index)

  @classmethod
  def from_counts(cls, counts: Mapping[str, int], *, min_freq: int = 1,
                  max_size: int | None = None,
                  reserved: Sequence[str] = RESERVED_TOKENS) -> "Vocab":
    """Builds a vocabulary from token counts.

    Args:
      counts: token -> corpus count (e.g. a ``collections.Counter``).
      min_freq: ordinary tokens seen fewer times are dropped (mapped to ``<unk>``).
      max_size: the largest ``len(vocab)``, reserved tokens INCLUDED; the most
        frequent ordinary tokens are kept. None: no limit.
      reserved: special tokens given the first ids, in this order.

    Returns:
      The ``Vocab``.
    """
    reserved = tuple(reserved)
    if "<unk>" not in reserved:
      raise ValueError(f"reserved={reserved} must contain '<unk>' (unknown tokens map to it)")
    if not isinstance(min_freq, (int, np.integer)) or min_freq < 0:
      raise ValueError(f"min_freq must be an int >= 0, got {min_freq!r}")
    if max_size is not None and max_size < len(reserved):
      raise ValueError(f"max_size={max_size} is smaller than the {len(reserved)} reserved "
                       f"tokens {reserved} (max_size counts them)")
    for tok, c in counts.items():
      if not isinstance(tok, str):
        raise ValueError(f"tokens must be str, got {tok!r}")
      if c < 0:
        raise ValueError(f"count of {tok!r} is {c} < 0")
    reserved_set = set(reserved)
    ordinary = sorted(((t, int(c)) for t, c in counts.items() if t not in reserved_set),
                      key=lambda tc: (-tc[1], tc[0]))
    kept = [tc for tc in ordinary if tc[1] >= min_freq]
    if max_size is not None:
      kept = kept[:max_size - len(reserved)]
    dropped = sum(c for _, c in ordinary) - sum(c for _, c in kept)
    reserved_counts = [int(counts.get(t, 0)) for t in reserved]
    reserved_counts[reserved.index("<unk>")] += dropped
    return cls(tokens=reserved + tuple(t for t, _ in kept),
               counts=np.array(reserved_counts + [c for _, c in kept], dtype=np.int64),
               reserved=reserved)

  @classmethod
  def build(cls, tokens: Iterable[str], **kwargs) -> "Vocab":
    """Builds a vocabulary from a token stream; keyword arguments as ``from_counts``."""
    return cls.from_counts(collections.Counter(tokens), **kwargs)

  def __len__(self) -> int:
    return len(self.tokens)

  def __contains__(self, token: str) -> bool:
    return token in self._index

  def token_to_id(self, token: str) -> int:
    """The id of ``token``; ``unk_id`` if it is not in the vocabulary."""
    return self._index.get(token, self.unk_id)

  __getitem__ = token_to_id

  def _special(self, token: str) -> int:
    if token not in self._index:
      raise KeyError(f"{token!r} is not in this vocabulary's reserved tokens {self.reserved}")
    return self._index[token]

  @property
  def unk_id(self) -> int:
    return self._index["<unk>"]

  @property
  def pad_id(self) -> int:
    return self._special("<pad>")

  @property
  def bos_id(self) -> int:
    return self._special("<bos>")

  @property
  def eos_id(self) -> int:
    return self._special("<eos>")

  def to_ids(self, tokens: Iterable[str]) -> np.ndarray:
    """``np.int32 [N]`` ids of a token sequence; unknown tokens -> ``unk_id``."""
    get = self._index.get
    return np.fromiter(map(get, tokens, itertools.repeat(self.unk_id)), dtype=np.int32)

  def to_tokens(self, ids: Any) -> list[str]:
    """The tokens of a 1-D sequence of ids; an id outside ``[0, V)`` raises ValueError."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} "
                       f"dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= len(self))
    if np.any(bad):
      raise ValueError(f"id {ids[bad][0]} is outside the vocabulary [0, {len(self)})")
    return [self.tokens[i] for i in ids.tolist()]

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Vocab):
      return NotImplemented
    return (self.tokens == other.tokens and self.reserved == other.reserved
            and np.array_equal(self.counts, other.counts))

  def __hash__(self) -> int:
    return hash((self.tokens, self.reserved, self.counts.tobytes()))

  def __repr__(self) -> str:
    head = ", ".join(repr(t) for t in self.tokens[:8])
    return f"Vocab(size={len(self)}, tokens=({head}{', ...' if len(self) > 8 else ''}))"

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as versioned JSON (tokens, counts, reserved)."""
    payload = {"format": _FORMAT, "version": _VERSION, "reserved": list(self.reserved),
               "tokens": list(self.tokens), "counts": self.counts.tolist()}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(payload, f, ensure_ascii=False)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Vocab":
    """Reads a file written by ``save``; a malformed file raises ValueError naming it."""
    payload = read_versioned_json(path, _FORMAT, _VERSION, "vocabulary")
    missing = {"tokens", "counts", "reserved"} - set(payload)
    if missing:
      raise ValueError(f"{path}: vocabulary file lacks {sorted(missing)}")
    counts = payload["counts"]
    if not isinstance(counts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts):
      raise ValueError(f"{path}: \"counts\" must be a list of integers")
    try:
      return cls(tokens=tuple(payload["tokens"]), counts=np.array(counts, dtype=np.int64),
                 reserved=tuple(payload["reserved"]))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: malformed vocabulary: {e}") from None


def read_versioned_json(path: str | os.PathLike, format_name: str, version: int, what: str,
                        error: type[ValueError] = ValueError) -> dict:
  """The JSON object of a file written with ``{"format": format_name, "version": version}``;
  ``error`` naming the file (and ``what`` it should be) if it is not that."""
  try:
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: not a {what} JSON file ({e})") from None
  if not isinstance(payload, dict) or payload.get("format") != format_name:
    raise error(f"{path}: not a {what} file (expected \"format\": {format_name!r})")
  if payload.get("version") != version:
    raise error(f"{path}: {what} format version {payload.get('version')!r} is not "
                f"supported (this code reads version {version})")
  return payload
