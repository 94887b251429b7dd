"""``lm-jax-evaluate`` (``experiments/evaluate.py``): a trained workdir on text files.

  lm-jax-evaluate --workdir=runs/book held_out.txt other.txt --json_out=eval.json

For each file: perplexity, bits per token, bits per character (comparable across
tokenizations that encode all of the text, char and BPE; a lower bound for the word
tokenizers, which drop spacing and score ``<unk>`` as one token), the ``<unk>`` rate and
the token count, as a table and as JSON, read with the workdir's own tokenizer. A file
more than 1% of whose tokens read as ``<unk>`` gets a warning with the rate.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from lm_jax.commands import cli
from lm_jax.data import corpora
from lm_jax.train import evaluation
from lm_jax.train import trainer

COLUMNS = ("file", "tokens", "perplexity", "bits_per_token", "bits_per_character", "unk_rate")


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/default", "a lm-jax-train (train_lm.py) workdir")
  flags.DEFINE_integer("batch_size", 0, "evaluation rows (0: the run's --eval_batch_size)")
  flags.DEFINE_string("json_out", "", "also write the results here (default: "
                      "<workdir>/evaluation.json)")
  flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "compute dtype (empty: the "
                    "run's --dtype); a bfloat16 run's float32 params score in float32 too")


def format_table(rows: list[dict]) -> str:
  cells = [[os.path.basename(r["file"]), f"{r['tokens']:d}", f"{r['perplexity']:.3f}",
            f"{r['bits_per_token']:.4f}", f"{r['bits_per_character']:.4f}",
            f"{r['unk_rate']:.2%}"] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more text files to evaluate after the flags")
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  if args.batch_size < 0:
    raise app.UsageError(f"--batch_size={args.batch_size} must be >= 0 (0: the run's)")
  out = args.json_out or os.path.join(args.workdir, "evaluation.json")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise app.UsageError(f"--json_out={out}: its directory does not exist")
  config, vocab, model, params = trainer.load_trained(args.workdir, dtype=args.dtype or None)
  tokenizer = evaluation.load_tokenizer(args.workdir, config)
  rows = []
  for path in paths:
    if not os.path.isfile(path):
      raise corpora.CorpusError(f"{path}: no such file to evaluate")
    row = evaluation.evaluate_text_file(config, vocab, model, params, path,
                                        tokenizer=tokenizer,
                                        batch_size=args.batch_size or None)
    if row["unk_rate"] > evaluation.UNK_WARNING_RATE:
      print(f"warning: {path}: {row['unk_rate']:.1%} of its tokens are not in the "
            "vocabulary and read as <unk> (perplexity is then optimistic)", file=sys.stderr)
    rows.append(row)
  print(format_table(rows))
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"workdir": args.workdir, "results": rows}, f, indent=1)
  print(f"wrote {out}")


def run() -> None:
  define_flags()
  cli.run(main)
