"""Evaluating a trained workdir on text files: the tokens as the model was trained on them,
perplexity, bits per token and per character, and the ``<unk>`` rate."""
from __future__ import annotations

import os
from typing import Any, Callable

from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import text
from lm_jax.data import tokenizers
from lm_jax.train import training
from lm_jax.train.config import TrainConfig

# Warn when more than this share of an evaluated text (or a prompt) maps to <unk>.
UNK_WARNING_RATE = 0.01


TOKENIZER_FILE = "tokenizer.json"  # in a workdir: how the run read its text


def reading_options(config: TrainConfig) -> dict[str, Any]:
  """How a PTB or WikiText-2 run read its text (``corpora.read_tokens`` keywords: words,
  ``<eos>`` per line); the other text corpora have a tokenizer (:func:`config_tokenizer`).

  Raises ``CorpusError`` for a model of the synthetic language, which reads no text, and
  ``ValueError`` for the corpora with a tokenizer."""
  if config.data.corpus == "synthetic":
    raise corpora.CorpusError(
        "this workdir's model was trained on the synthetic language (--corpus=synthetic), "
        "which has no text: train with --text_path (or ptb/wikitext2) to evaluate text files")
  if config.data.corpus not in ("ptb", "wikitext2"):
    raise ValueError(f"--corpus={config.data.corpus} reads text with a tokenizer "
                     "(config_tokenizer / load_tokenizer), not with reading options")
  return dict(level="word", add_eos=True, lowercase=False, letters_only=False)


def config_tokenizer(config: TrainConfig) -> tokenizers.TextTokenizer | None:
  """The tokenizer a run's flags describe (a workdir's ``tokenizer.json`` is the record:
  :func:`load_tokenizer`); None for PTB, WikiText-2 (:func:`reading_options`) and synthetic.
  A BPE tokenizer is learned from the data, so the flags cannot give it: CorpusError."""
  data = config.data
  if data.corpus in corpora.PRESETS:
    return tokenizers.TextTokenizer("char", **corpora.PRESETS[data.corpus][1])
  if data.corpus != "text":
    return None
  if data.text_tokenizer() == "bpe":
    raise corpora.CorpusError(f"a BPE tokenizer is learned from the training text: read it "
                              f"from the run's workdir ({TOKENIZER_FILE})")
  return tokenizers.TextTokenizer(data.text_tokenizer(), lowercase=data.lowercase,
                                  letters_only=data.letters_only)


def load_tokenizer(workdir: str | os.PathLike, config: TrainConfig
                   ) -> tokenizers.TextTokenizer | None:
  """The tokenizer a run saved in its workdir (``tokenizer.json``); for a workdir from
  before it was saved, the one its flags name (:func:`config_tokenizer`)."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    return tokenizers.TextTokenizer.load(path)
  try:
    return config_tokenizer(config)
  except corpora.CorpusError:
    raise corpora.CorpusError(f"{path} not found: a BPE run saves its tokenizer there") from None


def read_as_trained(config: TrainConfig, path: str | os.PathLike, *,
                    tokenizer: tokenizers.TextTokenizer | None = None
                    ) -> tuple[list[str], int]:
  """``(tokens, characters)``: ``path`` read and tokenized exactly as the run's corpus was
  (``tokenizer``: :func:`load_tokenizer`'s; default: :func:`config_tokenizer`'s), and its
  characters as that tokenizer reads them (after ``lowercase``/``letters_only``; PTB and
  WikiText-2: the file's)."""
  tokenizer = tokenizer or config_tokenizer(config)
  if tokenizer is None:
    return (corpora.read_tokens(path, **reading_options(config)),
            corpora.count_characters(path))
  cleaned = tokenizer.clean(corpora.read_text(path))
  return tokenizer.tokenize(cleaned, cleaned=True), len(cleaned)


def tokens_as_trained(config: TrainConfig, path: str | os.PathLike, *,
                      tokenizer: tokenizers.TextTokenizer | None = None) -> list[str]:
  """``path`` read and tokenized exactly as the run's corpus was (:func:`read_as_trained`)."""
  return read_as_trained(config, path, tokenizer=tokenizer)[0]


count_characters = corpora.count_characters


def prompt_tokens(config: TrainConfig, prompt: str, *,
                  tokenizer: tokenizers.TextTokenizer | None = None
                  ) -> tuple[list[str], Callable[[list[str]], str]]:
  """``(tokens, detokenize)``: a prompt tokenized as the training text was (its last line
  gets no ``<eos>``), and the function that turns tokens back into text. An empty prompt
  gives the tokens of a line break (``<eos>`` where the text has none), so that generation
  starts as at the beginning of a line. BPE prompts lose trailing spaces: ``"The "`` would
  end on a lone space token, rare in training, where the next word's token carries it."""
  # PTB, WikiText-2 and the synthetic language: whitespace-separated words.
  tokenizer = (tokenizer or config_tokenizer(config)
               or tokenizers.TextTokenizer("whitespace"))
  if tokenizer.name == "bpe":
    prompt = prompt.rstrip(" ")
  tokens = tokenizer.tokenize(prompt, end_last_line=False)
  return tokens or tokenizer.line_break or ["<eos>"], tokenizer.detokenize


def unk_rate(tokens: list[str], ids, vocab: text.Vocab) -> float:
  """The share of ``tokens`` that map to ``<unk>`` without being ``<unk>`` in the text."""
  return corpora.oov_count(tokens, ids, vocab) / max(len(tokens), 1)


def evaluate_text_file(config: TrainConfig, vocab: text.Vocab, model: Any, params: Any,
                       path: str | os.PathLike, *,
                       tokenizer: tokenizers.TextTokenizer | None = None,
                       batch_size: int | None = None) -> dict[str, Any]:
  """Perplexity, bits per token, bits per character, ``<unk>`` rate and token count of a
  text file under a trained model (every token after the first predicted once, the state
  carried, as the trainer's evaluation).

  Bits per character are bits per token times tokens per character (the trainer's
  reports use the same rule), so models with other tokenizations of the same text compare.
  Characters are counted as the tokenizer reads the text: the file's own for PTB,
  WikiText-2 and any run without ``--lowercase``/``--letters_only``; a model that folds
  non-letters (the Time Machine preset) is scored per character of the folded text.
  """
  tokens, characters = read_as_trained(config, path, tokenizer=tokenizer)
  if len(tokens) < 2:
    raise corpora.CorpusError(f"{path}: {len(tokens)} token(s); evaluation needs at least 2")
  ids = vocab.to_ids(tokens)
  batch_size = batch_size or config.data.eval_batch_size
  summary = training.evaluate(
      params, batching.eval_batches(ids, batch_size=batch_size, bptt=config.data.bptt),
      model=model, batch_size=batch_size)
  return {"file": os.fspath(path), "tokens": len(tokens), "predicted_tokens": summary["tokens"],
          "characters": characters, "loss_nats": summary["loss_nats"],
          "perplexity": summary["perplexity"], "bits_per_token": summary["bits_per_token"],
          "bits_per_character": corpora.bits_per_character(summary["bits_per_token"],
                                                           len(tokens), characters),
          "unk_rate": unk_rate(tokens, ids, vocab)}
