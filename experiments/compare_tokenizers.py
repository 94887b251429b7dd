r"""char, words and BPE tokenizers compared in bits per character under one training-time budget.

Trains the same LSTM (same sizes, optimizer, batch and unroll, in tokens) on one text file
with each tokenizer for ``--time_budget`` seconds of training (the trainer's clock:
evaluation and checkpointing not counted), evaluating on the validation split every
``--eval_every_seconds``, and compares validation **bits per character**: bits per token
times tokens per character of the split, so that models whose tokens cover different
amounts of text compare (a word model predicts fewer, harder tokens). Prints a table,
writes it as JSON and draws bits per character against training time.

  python3 experiments/compare_tokenizers.py      # Tiny Shakespeare, 180 s each, ~11 min

Rerunning with the same ``--runs_dir`` reuses finished runs (evaluation only). The table's
``best_valid_bits_per_character`` is the lowest point of the curve (a run that starts to
overfit within the budget ends above it).
  python3 experiments/compare_tokenizers.py --text_path=my.txt --time_budget=600

Word models cannot spell a word they never saw: the validation ``<unk>`` rate is in the
table, and a ``<unk>`` is scored as one token, so a word model's bits per character leave
out the spelling of its unknown words (and ``words`` keeps no spacing), which flatters it.
BPE is byte-level: nothing is ``<unk>``.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging

import benchmarking

from lm_jax.data import corpora
from lm_jax.train import run_logging
from lm_jax.train import trainer
from lm_jax.train.config import TrainConfig

_TEXT = flags.DEFINE_string(
    "text_path", os.path.join(corpora.default_data_dir(), "tinyshakespeare", "input.txt"),
    "the text file (split 90/10 into train and validation)")
_TOKENIZERS = flags.DEFINE_list("tokenizers", ["char", "words", "bpe"], "tokenizers to compare")
_BUDGET = flags.DEFINE_float("time_budget", 180.0, "training seconds per tokenizer")
_EVAL_EVERY = flags.DEFINE_float("eval_every_seconds", 30.0, "validation every this many "
                                 "training seconds (the curve's points)")
_BPE_SIZE = flags.DEFINE_integer("bpe_vocab_size", 2048, "BPE tokens (256 bytes included)")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "LSTM units")
_EMBED = flags.DEFINE_integer("embed", 128, "embedding size")
_RUNS = flags.DEFINE_string("runs_dir", "runs/tokenizers", "one workdir per tokenizer here "
                            "(rerunning resumes or reuses them)")
_JSON = flags.DEFINE_string("json_out", "results/compare_tokenizers.json", "the table as JSON")
_PLOT = flags.DEFINE_string("plot", "docs/figures/tokenizers.png", "the figure")


def run_one(name: str) -> dict:
  workdir = os.path.join(_RUNS.value, name)
  extra = {"bpe_vocab_size": _BPE_SIZE.value} if name == "bpe" else {}
  config = TrainConfig.from_flags(
      text_path=_TEXT.value, tokenizer=name, test_fraction=0.0, valid_fraction=0.1,
      cell="lstm", hidden=_HIDDEN.value, embed=_EMBED.value, batch_size=32, bptt=64,
      eval_batch_size=16, lr=3e-3, clip=1.0, epochs=1000, time_budget=_BUDGET.value,
      eval_every_seconds=_EVAL_EVERY.value, log_every=50, checkpoint_every=100_000,
      workdir=workdir, tensorboard=False, **extra)
  results = trainer.train_and_evaluate(config)
  corpus = trainer.load_corpus(config)
  records = run_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  curve = [(r["train_time"], r["bits_per_character"]) for r in records
           if r.get("split") == "valid" and "bits_per_character" in r]
  chars = corpus.characters["train"]
  return {"tokenizer": name, "vocab": len(corpus.vocab),
          "chars_per_token": corpus.chars_per_token("train"),
          "train_tokens": len(corpus.train), "steps": results["steps"],
          "epochs": results["epochs"], "train_seconds": results["train_seconds"],
          "tokens_per_sec": results["train_tokens_per_sec_median"],
          "chars_per_sec": results["train_tokens_per_sec_median"]
                           * corpus.chars_per_token("train"),
          "train_characters": chars,
          "valid_unk_rate": corpus.oov_counts["valid"] / len(corpus.valid),
          "valid_perplexity": results["valid_perplexity"],
          "valid_bits_per_token": results["valid_bits_per_token"],
          "valid_bits_per_character": results["valid_bits_per_character"],
          "best_valid_bits_per_character": min(b for _, b in curve) if curve else None,
          "curve": curve}


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for row in rows:
    times, bpc = zip(*row["curve"]) if row["curve"] else ((), ())
    lossy = (f"; a lower bound: no spacing, {row['valid_unk_rate']:.1%} <unk>"
             if row["tokenizer"] in ("whitespace", "words") else "")
    ax.plot(times, bpc, marker="o", label=f"{row['tokenizer']} (V={row['vocab']}, "
                                          f"{row['chars_per_token']:.2f} chars/token{lossy})")
  ax.set_xlabel("training time (s)")
  ax.set_ylabel("validation bits per character")
  where = os.path.join(*os.path.normpath(_TEXT.value).split(os.sep)[-2:])
  ax.set_title(f"{where}: one LSTM-{_HIDDEN.value}, {_BUDGET.value:.0f} s of training each",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off
  run_logging.configure_console()
  rows = [run_one(name) for name in _TOKENIZERS.value]
  benchmarking.print_table(rows, ("tokenizer", "vocab", "chars_per_token", "steps",
                                  "epochs", "tokens_per_sec", "chars_per_sec",
                                  "valid_unk_rate", "valid_perplexity",
                                  "valid_bits_per_character",
                                  "best_valid_bits_per_character"))
  benchmarking.write_json(_JSON.value, {"machine": benchmarking.machine_facts(),
                                        "text_path": _TEXT.value,
                                        "time_budget": _BUDGET.value, "rows": rows})
  plot(rows, _PLOT.value)
  print(f"wrote {_JSON.value} and {_PLOT.value}")


if __name__ == "__main__":
  app.run(main)
