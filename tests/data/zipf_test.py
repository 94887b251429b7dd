"""Tests for lm_jax.data.zipf and experiments/zipf.py."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.data import synthetic
from lm_jax.data import zipf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rank_frequency_expected_values():
  tokens = "a b a c a b".split()
  assert zipf.rank_frequency(tokens).tolist() == [3, 2, 1]
  assert zipf.rank_frequency(tokens, n=2).tolist() == [2, 1, 1, 1]  # (a b) twice
  assert zipf.rank_frequency(tokens, n=6).tolist() == [1]
  assert zipf.rank_frequency(np.array([3, 3, 1])).dtype == np.int64


@settings(deadline=None, max_examples=50)
@given(st.lists(st.integers(0, 4), min_size=3, max_size=60), st.integers(1, 3))
def test_rank_frequency_matches_counter(tokens, n):
  grams = collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
  expected = sorted(grams.values(), reverse=True)
  assert zipf.rank_frequency(np.array(tokens), n).tolist() == expected
  assert zipf.rank_frequency([f"t{t}" for t in tokens], n).tolist() == expected


@pytest.mark.parametrize("args, match", [
    ((["a"], 0), "n must be an int >= 1"),
    ((["a", "b"], 3), "2 tokens have no 3-grams"),
    ((np.zeros((2, 2), np.int32), 1), r"1-D, got shape \(2, 2\)"),
])
def test_rank_frequency_errors(args, match):
  with pytest.raises(ValueError, match=match):
    zipf.rank_frequency(*args)


@settings(deadline=None, max_examples=30)
@given(st.floats(0.3, 2.0), st.floats(1e3, 1e7))
def test_fit_recovers_exact_power_law(alpha, scale):
  freqs = scale * np.arange(1, 3001, dtype=np.float64) ** -alpha
  np.testing.assert_allclose(zipf.fit_zipf(freqs, min_count=0), alpha, rtol=1e-9)
  np.testing.assert_allclose(zipf.fit_zipf(freqs, min_rank=1, max_rank=50, min_count=0), alpha,
                             rtol=1e-9)


def test_fit_range_ignores_head_and_low_count_tail():
  freqs = np.concatenate([[10**7] * 9, 1e6 * np.arange(10, 1001.0) ** -1.0, [1] * 5000])
  assert abs(zipf.fit_zipf(freqs) - 1.0) < 1e-9
  # Using the head and the staircase of ones gives a different slope.
  assert abs(zipf.fit_zipf(freqs, min_rank=1, min_count=1) - 1.0) > 0.1


@pytest.mark.parametrize("freqs, kwargs, match", [
    ([1, 2, 3], {}, "sorted in decreasing order"),
    ([[3, 2]], {}, "1-D"),
    ([9, 8, 7], {"min_rank": 0}, "min_rank must be >= 1"),
    ([100] * 12, {"max_rank": 10}, r"ranks \[10, 10\] of 12 .count >= 5. leave 1"),
])
def test_fit_errors(freqs, kwargs, match):
  with pytest.raises(ValueError, match=match):
    zipf.fit_zipf(freqs, **kwargs)


def test_plot_writes_png_and_returns_fits(tmp_path):
  curves = {"steep": 1e5 * np.arange(1, 500.0) ** -1.2, "flat": 1e4 * np.arange(1, 800.0) ** -0.6}
  path = tmp_path / "z.png"
  alphas = zipf.plot_zipf(curves, path, title="test")
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert alphas == {k: zipf.fit_zipf(v) for k, v in curves.items()}
  np.testing.assert_allclose([alphas["steep"], alphas["flat"]], [1.2, 0.6])


def test_report_ngram_alphas_decrease_on_synthetic_text(tmp_path):
  x = synthetic.sample(synthetic.make_language(seed=0), 200_000, seed=0)
  report = zipf.zipf_report(x, max_n=3, png_path=tmp_path / "r.png")
  alphas = [report["ngrams"][str(n)]["alpha"] for n in (1, 2, 3)]
  assert alphas[0] > alphas[1] > alphas[2] > 0
  assert report["num_tokens"] == 200_000 and report["ngrams"]["1"]["distinct"] == 256
  assert report["fit"] == {"min_rank": 10, "max_rank": None, "min_count": 5}
  json.dumps(report)  # JSON-ready
  assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_experiment_script_smoke(tmp_path):
  words = synthetic.sample(synthetic.make_language(60, seed=1), 20_000, seed=0)
  (tmp_path / "t.txt").write_text(" ".join(f"w{t}" for t in words))
  out, json_out = tmp_path / "z.png", tmp_path / "z.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "zipf.py"), "--corpus=text",
       f"--path={tmp_path / 't.txt'}", "--level=word", f"--out={out}", f"--json_out={json_out}",
       "--max_n=2"],
      capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO},
      check=False)
  assert result.returncode == 0, result.stderr
  assert "t 1-grams: alpha = " in result.stdout and "t 2-grams" in result.stdout
  report = json.loads(json_out.read_text())
  assert report["corpus"] == "t" and set(report["ngrams"]) == {"1", "2"}
  assert out.read_bytes()[:8] == PNG_MAGIC
