"""Run outputs: strict JSON for any number, readable perplexities, plots of diverged runs."""
import json
import math

import pytest

from lm_jax.train import run_logging


def _strict_loads(line):
  def reject(constant):
    raise ValueError(f"not strict JSON: {constant}")
  return json.loads(line, parse_constant=reject)


def test_metrics_and_results_are_strict_json_and_read_back_as_floats(tmp_path):
  record = {"step": 4, "split": "train", "loss_nats": 1e4, "perplexity": math.inf,
            "bits_per_token": math.nan, "nested": [math.inf, 1.5, {"x": -math.inf}]}
  writer = run_logging.MetricsWriter(str(tmp_path / "metrics.jsonl"))
  writer.write(record)
  line = (tmp_path / "metrics.jsonl").read_text()
  assert _strict_loads(line)["perplexity"] is None
  assert _strict_loads(line)["nested"] == [None, 1.5, {"x": None}]
  [read] = run_logging.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert math.isnan(read["perplexity"]) and read["loss_nats"] == 1e4 and read["step"] == 4
  # A resume rewrites the kept records: still strict.
  run_logging.MetricsWriter(str(tmp_path / "metrics.jsonl"), resume_step=4)
  _strict_loads((tmp_path / "metrics.jsonl").read_text())
  run_logging.write_json(str(tmp_path / "results.json"), {"valid_perplexity": math.inf})
  assert _strict_loads((tmp_path / "results.json").read_text()) == {"valid_perplexity": None}


@pytest.mark.parametrize("perplexity, text", [
    (123.456, "123.46"), (999999.0, "999999.00"), (1.5e230, "1.5e+230"),
    (math.inf, "inf"), (math.nan, "nan")])
def test_perplexity_is_printed_readably(perplexity, text):
  assert run_logging.format_perplexity(perplexity) == text


def test_learning_curve_of_a_diverged_run_is_drawn(tmp_path):
  records = [{"step": s, "split": "train", "bits_per_token": b}
             for s, b in ((1, 3.0), (2, 8000.0), (3, math.nan))]
  run_logging.plot_learning_curve(records, str(tmp_path / "curve.png"))
  assert (tmp_path / "curve.png").stat().st_size > 0
