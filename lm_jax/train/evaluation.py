"""Evaluating a trained workdir on text files: the tokens as the model was trained on them,
perplexity, bits per token and per character, and the ``<unk>`` rate."""
from __future__ import annotations

import math
import os
from typing import Any

from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import text
from lm_jax.train import training
from lm_jax.train.config import TrainConfig

# Warn when more than this share of an evaluated text (or a prompt) maps to <unk>.
UNK_WARNING_RATE = 0.01


def reading_options(config: TrainConfig) -> dict[str, Any]:
  """How the run's corpus read its text (``corpora.read_tokens`` keywords: level, ``<eos>``,
  case, letters only), the presets' rules included (``corpora.load_corpus``).

  Raises ``CorpusError`` for a model of the synthetic language, which reads no text."""
  data = config.data
  if data.corpus == "synthetic":
    raise corpora.CorpusError(
        "this workdir's model was trained on the synthetic language (--corpus=synthetic), "
        "which has no text: train with --text_path (or ptb/wikitext2) to evaluate text files")
  if data.corpus in ("ptb", "wikitext2"):
    return dict(level="word", add_eos=True, lowercase=False, letters_only=False)
  if data.corpus == "timemachine":
    return dict(level="char", add_eos=False, lowercase=True, letters_only=True)
  if data.corpus == "tinyshakespeare":
    return dict(level="char", add_eos=False, lowercase=False, letters_only=False)
  return dict(level=data.level, add_eos=False, lowercase=data.lowercase,
              letters_only=data.letters_only)


def tokens_as_trained(config: TrainConfig, path: str | os.PathLike) -> list[str]:
  """``path`` read and tokenized exactly as the run's corpus was (:func:`reading_options`)."""
  return corpora.read_tokens(path, **reading_options(config))


def prompt_tokens(config: TrainConfig, prompt: str) -> tuple[list[str], str]:
  """``(tokens, level)``: a prompt tokenized as the training text was (no ``<eos>``
  appended); the synthetic language's tokens (``s12``) are words."""
  if config.data.corpus == "synthetic":
    return text.tokenize(prompt, "word"), "word"
  options = {**reading_options(config), "add_eos": False}
  level = options.pop("level")
  tokenizer = text.StreamTokenizer(level, **options)
  tokenizer.feed(prompt)
  return tokenizer.finish(), level


def count_characters(path: str | os.PathLike) -> int:
  """Unicode characters in a UTF-8 file (the denominator of bits per character)."""
  with open(path, encoding="utf-8") as f:
    return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), ""))


def unk_rate(tokens: list[str], ids, vocab: text.Vocab) -> float:
  """The share of ``tokens`` that map to ``<unk>`` without being ``<unk>`` in the text."""
  return corpora.oov_count(tokens, ids, vocab) / max(len(tokens), 1)


def evaluate_text_file(config: TrainConfig, vocab: text.Vocab, model: Any, params: Any,
                       path: str | os.PathLike, *, batch_size: int | None = None
                       ) -> dict[str, Any]:
  """Perplexity, bits per token, bits per character, ``<unk>`` rate and token count of a
  text file under a trained model (every token after the first predicted once, the state
  carried, as the trainer's evaluation).

  Bits per character divide the summed bits by the file's characters, so models with other
  tokenizations of the same text compare (the first token, which is not predicted, is in
  the characters but not in the bits: negligible for any real file). They are per raw
  character: a model that lower-cases or folds non-letters (``--letters_only``, the Time
  Machine preset) models fewer distinct characters than the file holds.
  """
  tokens = tokens_as_trained(config, path)
  if len(tokens) < 2:
    raise corpora.CorpusError(f"{path}: {len(tokens)} token(s); evaluation needs at least 2")
  ids = vocab.to_ids(tokens)
  batch_size = batch_size or config.data.eval_batch_size
  summary = training.evaluate(
      params, batching.eval_batches(ids, batch_size=batch_size, bptt=config.data.bptt),
      model=model, batch_size=batch_size)
  characters = count_characters(path)
  bits = summary["loss_nats"] * summary["tokens"] / math.log(2)
  return {"file": os.fspath(path), "tokens": len(tokens), "predicted_tokens": summary["tokens"],
          "characters": characters, "loss_nats": summary["loss_nats"],
          "perplexity": summary["perplexity"], "bits_per_token": summary["bits_per_token"],
          "bits_per_character": bits / max(characters, 1),
          "unk_rate": unk_rate(tokens, ids, vocab)}
