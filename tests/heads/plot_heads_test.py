"""Tests for experiments/plot_heads.py: the per-head curves and table from run directories."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_run(runs_dir, corpus, head, seconds, valid, test, steps):
  path = runs_dir / f"heads_{corpus}_{head}"
  path.mkdir(parents=True)
  config = {"head": head, "corpus": corpus, "batch_size": 2, "bptt": 5, "cell": "elman",
            "hidden": 8, "optimizer": "adam", "lr": 0.002, "time_budget": seconds[-1]}
  (path / "config.json").write_text(json.dumps(config))
  records = [{"step": s, "split": "train", "loss_nats": 1.0, "train_time": t}
             for s, t in zip(steps, seconds)]
  records += [{"step": s, "split": "valid", "perplexity": v, "train_time": t}
              for s, t, v in zip(steps, seconds, valid)]
  records.append({"step": steps[-1], "split": "test", "perplexity": test,
                  "train_time": seconds[-1]})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (path / "results.json").write_text(json.dumps({
      "steps": steps[-1], "train_seconds": seconds[-1], "valid_perplexity": valid[-1],
      "test_perplexity": test}))


def test_plot_heads_draws_each_corpus_and_tabulates_ratios_to_full(tmp_path):
  runs = tmp_path / "runs"
  _fake_run(runs, "ptb", "full", [10.0, 20.0], [300.0, 200.0], 190.0, [10, 20])
  _fake_run(runs, "ptb", "adaptive", [10.0, 20.0], [250.0, 180.0], 171.0, [50, 100])
  _fake_run(runs, "wikitext2", "hsm", [5.0], [400.0], 390.0, [7])
  out, figures = tmp_path / "table.json", tmp_path / "figures"
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot_heads.py"),
                  f"--runs_dir={runs}", "--corpora=ptb,wikitext2,missing",
                  f"--out_dir={figures}", f"--json_out={out}"],
                 check=True, capture_output=True, timeout=300, cwd=ROOT)
  rows = {(r["corpus"], r["head"]): r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {("ptb", "full"), ("ptb", "adaptive"), ("wikitext2", "hsm")}
  adaptive = rows["ptb", "adaptive"]
  assert adaptive["tokens"] == 100 * 2 * 5
  np.testing.assert_allclose(adaptive["tokens_per_s"], 1000 / 20.0)
  np.testing.assert_allclose(adaptive["speed_vs_full"], 5.0)
  np.testing.assert_allclose(adaptive["test_vs_full_pct"], -10.0)
  assert "speed_vs_full" not in rows["wikitext2", "hsm"]  # no full softmax run to compare
  for corpus in ("ptb", "wikitext2"):
    assert (figures / f"heads_{corpus}.png").stat().st_size > 0
  assert not (figures / "heads_missing.png").exists()
