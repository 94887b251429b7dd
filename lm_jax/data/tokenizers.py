r"""Text tokenizers for your own files: characters, whitespace words, punctuation-aware words
and byte-level BPE, each saved with a trained model so that training, evaluation and
generation always read text the same way.

======================  ===========================================================  ======
name                    tokens                                                       lines
======================  ===========================================================  ======
``char``                every character (``"\n"`` included)                          kept
``whitespace``          ``str.split()``: ``"value."`` is one token                   dropped
``words``               :data:`WORD_PATTERN`: ``"value."`` -> ``value``, ``.``;      ``<eos>``
                        ``don't``, ``well-known`` stay whole
``bpe``                 byte-level BPE (HF ``tokenizers``) learned on the training   kept
                        split: every UTF-8 text encodes, never to ``<unk>``
======================  ===========================================================  ======

``lowercase`` and ``letters_only`` (every run of characters other than A-Z, a-z becomes one
space, D2L's Time Machine rule, line breaks included, for every tokenizer alike: the
characters that bits per character count are then the same) clean the text first.

>>> t = TextTokenizer("words")
>>> t.tokenize("Don't panic, Arthur.\nNo.\n")
["Don't", 'panic', ',', 'Arthur', '.', '<eos>', 'No', '.', '<eos>']
>>> t.detokenize(t.tokenize("Don't panic, Arthur.\nNo.\n"))
"Don't panic, Arthur.\nNo.\n"
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable

from lm_jax.data import text as text_lib

TOKENIZERS = ("char", "whitespace", "words", "bpe")
# Numbers with inner . , : stay whole ("3.14", "1,000", "10:30"), as do words with inner
# apostrophes or hyphens; every other non-space character is a token of its own
# ("value." -> "value", ".").
WORD_PATTERN = re.compile(r"\d+(?:[.,:]\d+)+|[^\W_]+(?:['\u2019\-][^\W_]+)*|[^\w\s]|_+")
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%'\u2019")
_NO_SPACE_AFTER = frozenset("([{$")
_RESERVED = frozenset(text_lib.RESERVED_TOKENS)
_FORMAT = "lm_jax.TextTokenizer"
_VERSION = 1
INSTALL_HINT = "pip install 'lm_jax[tokenizers]' (HF tokenizers) for --tokenizer=bpe"


class TokenizerError(ValueError):
  """A tokenizer that cannot be built, loaded or used (missing package, bad file)."""


def _hf():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TokenizerError(f"the byte-level BPE tokenizer needs HF tokenizers: "
                         f"{INSTALL_HINT}") from None
  return tokenizers


def lines_with_ends(text: str) -> list[str]:
  r"""``text`` cut after every ``"\n"`` (only there: ``"\r"`` stays in its line)."""
  lines = text.split("\n")
  out = [line + "\n" for line in lines[:-1]]
  return out + [lines[-1]] if lines[-1] else out


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
  """Text <-> token strings; a ``Vocab`` then maps tokens to ids.

  Attributes:
    name: one of :data:`TOKENIZERS`.
    lowercase, letters_only: cleaning applied before tokenizing (module docstring).
    bpe: the HF ``tokenizers.Tokenizer`` of ``name="bpe"`` (:func:`train_bpe`), else None.
  """
  name: str
  lowercase: bool = False
  letters_only: bool = False
  bpe: Any = None

  def __post_init__(self):
    if self.name not in TOKENIZERS:
      raise TokenizerError(f"tokenizer {self.name!r} is not one of {TOKENIZERS}")
    if (self.name == "bpe") != (self.bpe is not None):
      raise TokenizerError("a trained BPE model is needed for name='bpe' (train_bpe), and "
                           "only for it")

  def clean(self, text: str) -> str:
    """``text`` with ``letters_only`` (first, as D2L) and ``lowercase`` applied
    (:func:`lm_jax.data.text.clean`, the rule of the older readers too)."""
    return text_lib.clean(text, lowercase=self.lowercase, letters_only=self.letters_only)

  def tokenize(self, text: str, *, end_last_line: bool = True,
               cleaned: bool = False) -> list[str]:
    """The tokens of ``text``, cleaned first unless ``cleaned`` says it already is.
    ``end_last_line=False``: a last line without ``"\\n"`` gets no ``<eos>`` (a prompt)."""
    text = text if cleaned else self.clean(text)
    if self.name == "char":
      return list(text)
    if self.name == "whitespace":
      return text.split()
    if self.name == "bpe":
      return [tok for enc in self.bpe.encode_batch(lines_with_ends(text), add_special_tokens=False)
              for tok in enc.tokens]
    tokens: list[str] = []
    for line in lines_with_ends(text):
      tokens += WORD_PATTERN.findall(line)
      if line.endswith("\n") or end_last_line:
        tokens.append("<eos>")
    return tokens

  @property
  def line_break(self) -> list[str]:
    """The tokens of one line break (what generation starts from without a prompt); empty
    for ``whitespace``, which drops line breaks."""
    if self.name == "words":
      return ["<eos>"]
    return [] if self.name == "whitespace" else self.tokenize("\n")

  def detokenize(self, tokens: Iterable[str]) -> str:
    """Text for tokens: the inverse of ``tokenize`` up to spacing (``whitespace`` and
    ``words`` do not keep it: one space between words, none before ``.,;:!?)``). A
    sampled ``<eos>`` is a line break; the other reserved tokens (``<unk>``, ``<pad>``,
    ``<bos>``) are written as they are, except by BPE, whose text has none (dropped)."""
    tokens = list(tokens)
    if self.name == "char":
      return "".join("\n" if t == "<eos>" else t for t in tokens)
    if self.name == "bpe":
      newline = self.line_break
      pieces = [newline if t == "<eos>" else [] if t in _RESERVED else [t] for t in tokens]
      return self.bpe.decoder.decode([t for piece in pieces for t in piece])
    out, prev = [], "<eos>"
    for tok in tokens:
      space = prev != "<eos>" and tok != "<eos>" and not (
          self.name == "words" and (tok in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER))
      out.append("\n" if tok == "<eos>" else " " + tok if space else tok)
      prev = tok
    return "".join(out)

  def config(self) -> dict[str, Any]:
    """What ``save`` writes (the BPE model as HF ``tokenizers`` JSON)."""
    payload = {"format": _FORMAT, "version": _VERSION, "name": self.name,
               "lowercase": self.lowercase, "letters_only": self.letters_only}
    if self.bpe is not None:
      payload["bpe"] = json.loads(self.bpe.to_str())
    return payload

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer as versioned JSON, atomically (a temporary file, then a rename)."""
    path = os.fspath(path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(self.config(), f, ensure_ascii=False)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TextTokenizer":
    """Reads a file written by ``save``; a malformed one raises TokenizerError naming it."""
    payload = text_lib.read_versioned_json(path, _FORMAT, _VERSION, "tokenizer", TokenizerError)
    bpe = None
    if payload.get("name") == "bpe":
      try:
        bpe = _hf().Tokenizer.from_str(json.dumps(payload.get("bpe")))
      except Exception as e:  # pylint: disable=broad-except  (the Rust side raises Exception)
        if isinstance(e, TokenizerError):
          raise
        raise TokenizerError(f"{path}: malformed BPE model ({e})") from None
    return cls(name=payload.get("name"), lowercase=bool(payload.get("lowercase")),
               letters_only=bool(payload.get("letters_only")), bpe=bpe)


def train_bpe(texts: Iterable[str], vocab_size: int, *, lowercase: bool = False,
              letters_only: bool = False, cleaned: bool = False) -> TextTokenizer:
  """A byte-level BPE (GPT-2's byte alphabet and pre-tokenizer, HF ``tokenizers``) learned on
  ``texts``, ``vocab_size`` tokens including the 256 bytes, so any UTF-8 text encodes.

  ``cleaned``: the texts are already cleaned (``TextTokenizer.clean``). Deterministic for
  the same texts (the merges are chosen by count, ties by HF's order)."""
  hf = _hf()
  if vocab_size < 256:
    raise TokenizerError(f"bpe_vocab_size={vocab_size} must be >= 256 (the byte alphabet)")
  model = hf.Tokenizer(hf.models.BPE())
  model.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  def lines(t):
    return lines_with_ends(t if cleaned else text_lib.clean(t, lowercase=lowercase,
                                                             letters_only=letters_only))

  model.train_from_iterator((line for t in texts for line in lines(t)), trainer)
  return TextTokenizer("bpe", lowercase=lowercase, letters_only=letters_only, bpe=model)


def bpe_vocabulary(tokenizer: TextTokenizer) -> list[str]:
  """Every token of a BPE tokenizer's model (the 256 bytes and the merges), sorted."""
  return sorted(tokenizer.bpe.get_vocab())
