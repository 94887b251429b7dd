r"""Validation perplexity against training time and tokens seen, one line per output head.

Reads the runs ``experiments/head_curves.sh`` writes (``RUNS_DIR/heads_CORPUS_HEAD/``:
``config.json``, ``metrics.jsonl``, ``results.json``) and draws, for each corpus, validation
perplexity against training time (``train_time``: the trainer's clock, evaluation and
checkpointing excluded, compilation included) and against training tokens seen
(step x batch x bptt), as Chen, Grangier and Auli (ACL 2016, Figure 2) compare their
strategies. Prints and writes the table of final numbers: steps, tokens, training time,
training tokens/s (tokens / training time, compilation included, and the trainer's median
over its logging windows, without it), exact validation and test perplexity, and each
head's ratios to the full softmax of the same corpus.

  python3 experiments/plot_heads.py                       # runs/heads_{ptb,wikitext2}_*
  python3 experiments/plot_heads.py --corpora=wikitext2 --runs_dir=/path/to/runs
"""
import glob
import json
import math
import os

from absl import app
from absl import flags

import benchmarking

from lm_jax.train import run_logging

_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs", "where head_curves.sh wrote the runs")
_CORPORA = flags.DEFINE_list("corpora", ["ptb", "wikitext2"], "corpora to draw, one figure each")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/figures", "where the figures go")
_JSON_OUT = flags.DEFINE_string("json_out", "results/plot_heads.json", "table as JSON")
# Head order in legends and tables: the exact softmax first, then by family.
HEAD_ORDER = ("full", "class", "classtree", "hsm", "adaptive", "dsoftmax", "nce", "neg",
              "sampled")


def read_run(path):
  """``{head, corpus, config, curve: [(train_time, tokens, valid_ppl)], results}`` or None."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    records = run_logging.read_metrics(os.path.join(path, "metrics.jsonl"))
  except FileNotFoundError:
    return None
  tokens_per_step = config["batch_size"] * config["bptt"]
  curve = [(r["train_time"], r["step"] * tokens_per_step, r["perplexity"])
           for r in records if r.get("split") == "valid" and "train_time" in r]
  results = None
  if os.path.exists(os.path.join(path, "results.json")):
    with open(os.path.join(path, "results.json")) as f:
      results = run_logging.nan_for_null(json.load(f))
  return {"head": config["head"], "corpus": config["corpus"], "config": config,
          "curve": curve, "results": results, "path": path}


def table_rows(runs):
  rows = []
  full = next((r for r in runs if r["head"] == "full" and r["results"]), None)
  for run in runs:
    res = run["results"]
    if not res:
      continue
    tokens = res["steps"] * run["config"]["batch_size"] * run["config"]["bptt"]
    row = {"corpus": run["corpus"], "head": run["head"], "steps": res["steps"],
           "tokens": tokens, "train_s": res["train_seconds"],
           "tokens_per_s": tokens / res["train_seconds"],
           "median_tokens_per_s": res.get("train_tokens_per_sec_median", math.nan),
           "valid_ppl": res["valid_perplexity"], "test_ppl": res.get("test_perplexity", math.nan)}
    if full is not None:
      full_res = full["results"]
      full_rate = (full_res["steps"] * full["config"]["batch_size"] * full["config"]["bptt"]
                   / full_res["train_seconds"])
      row["speed_vs_full"] = row["tokens_per_s"] / full_rate
      row["median_speed_vs_full"] = (row["median_tokens_per_s"]
                                     / full_res.get("train_tokens_per_sec_median", math.nan))
      row["test_vs_full_pct"] = 100.0 * (row["test_ppl"] / full_res["test_perplexity"] - 1.0)
    rows.append(row)
  return rows


def plot(runs, corpus, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  fig, (ax_time, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
  for i, run in enumerate(runs):
    if not run["curve"]:
      continue
    times, tokens, ppl = zip(*run["curve"])
    label = run["head"]
    if run["results"]:
      label += f" (test {run['results']['test_perplexity']:.0f})"
    style = dict(marker="o", markersize=3, color=matplotlib.colormaps["tab10"](i % 10),
                 label=label)
    ax_time.plot([t / 60 for t in times], ppl, **style)
    ax_tokens.plot([n / 1e6 for n in tokens], ppl, **style)
  config = runs[0]["config"]
  budget = config.get("time_budget", 0)
  ax_time.set_xlabel("training time (minutes; evaluation excluded)")
  ax_tokens.set_xlabel("training tokens seen (millions)")
  ax_time.set_ylabel("validation perplexity")
  for ax in (ax_time, ax_tokens):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
  ax_tokens.legend(fontsize=8)
  fig.suptitle(f"{corpus}: {config['cell']} {config['hidden']} hidden, batch "
               f"{config['batch_size']} x {config['bptt']}, {config['optimizer']} lr "
               f"{config['lr']}, same budget of {budget:g} s of training per head")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  all_rows = []
  for corpus in _CORPORA.value:
    runs = [r for r in (read_run(p) for p in sorted(glob.glob(
        os.path.join(_RUNS_DIR.value, f"heads_{corpus}_*")))) if r is not None]
    if not runs:
      print(f"{corpus}: no runs under {_RUNS_DIR.value}/heads_{corpus}_*; skipped")
      continue
    runs.sort(key=lambda r: (HEAD_ORDER.index(r["head"]) if r["head"] in HEAD_ORDER
                             else len(HEAD_ORDER), r["path"]))
    path = os.path.join(_OUT_DIR.value, f"heads_{corpus}.png")
    plot(runs, corpus, path)
    print(f"wrote {path}")
    all_rows += table_rows(runs)
  benchmarking.print_table(all_rows, ["corpus", "head", "steps", "tokens", "train_s",
                                      "tokens_per_s", "median_tokens_per_s", "valid_ppl",
                                      "test_ppl", "speed_vs_full", "median_speed_vs_full",
                                      "test_vs_full_pct"])
  benchmarking.write_json(_JSON_OUT.value, {"benchmark": "plot_heads", "rows": all_rows,
                                            "runs_dir": _RUNS_DIR.value})
  print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
