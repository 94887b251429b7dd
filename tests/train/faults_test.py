"""Faults: SIGTERM/Ctrl-C save and stop, resume is bit-identical; NaN stops or is skipped."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm_jax.data import batching
from lm_jax.train import faults
from lm_jax.train import run_logging
from lm_jax.train import trainer
from lm_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(corpus="synthetic", synthetic_vocab_size=16, synthetic_train_tokens=2000,
            cell="gru", hidden=16, embed=8, batch_size=4, bptt=8, optimizer="adam", lr=1e-2,
            steps=12, checkpoint_every=4, log_every=4, eval_batch_size=2, dropout=0.2,
            parallel="none")  # one device, as on one GPU (conftest.py)


def _run(workdir, **overrides):
  return trainer.train_and_evaluate(TrainConfig.from_flags(workdir=str(workdir), **{**TINY, **overrides}))


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k not in run_logging.TIMING_KEYS}
          for r in run_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _run(workdir)
  return workdir


def _at_position(monkeypatch, position, action):
  """Runs ``action(batch)`` when the trainer asks for the batch at ``position``."""
  real = batching.get_batch

  def get_batch(tokens, pos, **kwargs):
    batch = real(tokens, pos, **kwargs)
    return action(batch) if tuple(pos) == position else batch

  monkeypatch.setattr(batching, "get_batch", get_batch)


def test_stop_signals_flag_and_second_ctrl_c():
  before = signal.getsignal(signal.SIGTERM)
  with faults.StopSignals() as stop:
    assert stop.signum is None
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGTERM) is before
  assert faults.any_process(15) == 15 and faults.any_process(None) is None
  err = faults.TrainingInterrupted(signal.SIGINT, 7, "/w/checkpoints/7")
  assert err.exit_code == 130 and "SIGINT after step 7" in str(err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_window_saves_and_resume_is_bit_identical(tmp_path, monkeypatch, straight,
                                                             signum):
  """Stopped after step 6 (not a log or checkpoint step): the rerun ends as the straight run."""
  def signal_self(batch):
    os.kill(os.getpid(), signum)
    return batch

  _at_position(monkeypatch, (0, 5), signal_self)
  with pytest.raises(trainer.TrainingInterrupted, match=r"after step 6; saved checkpoint .*6"):
    _run(tmp_path)
  assert os.path.isdir(tmp_path / "checkpoints" / "6")
  monkeypatch.undo()
  _run(tmp_path)
  assert _metrics(tmp_path) == _metrics(straight)
  _assert_same_params(trainer.load_trained(str(tmp_path))[3],
                      trainer.load_trained(str(straight))[3])


def _corrupt_ids(batch):
  """A corrupt batch: an input id past the vocabulary embeds as NaN (``jnp.take`` fills)."""
  inputs = np.array(batch.inputs_BxT)
  inputs[0, 0] = 10**6
  return batch._replace(inputs_BxT=inputs)


def test_nan_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
  _at_position(monkeypatch, (0, 5), _corrupt_ids)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"at step 6 .*Last good checkpoint: .*checkpoints/4;"):
    _run(tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_a_diverging_run_ends_with_the_step_named_and_its_outputs_intact(tmp_path):
  """lr 1000 (issue 22): a loss too large for e^loss is logged (perplexity null), then the NaN
  stops the run naming its step; the checkpoints before it and metrics.jsonl stay readable."""
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+) ") as error:
    _run(tmp_path, cell="rnn_relu", optimizer="sgd", lr=1000.0, clip=0.0, dropout=0.0,
         log_every=2, checkpoint_every=2)
  failed_at = int(error.value.args[0].split("at step ")[1].split()[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
  assert saved and max(saved) < failed_at
  assert f"Last good checkpoint: {tmp_path / 'checkpoints' / str(max(saved))};" in str(error.value)
  assert trainer.load_trained(str(tmp_path))[3] is not None  # the last good one restores

  def strict(constant):
    raise ValueError(f"metrics.jsonl is not strict JSON: {constant}")
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line, parse_constant=strict) for line in f]
  assert records and all(r["step"] < failed_at for r in records)
  assert any(r["perplexity"] is None and r["loss_nats"] > 709 for r in records)  # e^loss: inf


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, monkeypatch, straight):
  _at_position(monkeypatch, (0, 5), _corrupt_ids)
  results = _run(tmp_path, skip_nonfinite=True)
  assert results["skipped_steps"] == 1 and results["steps"] == 12
  train = [r for r in _metrics(tmp_path) if r["split"] == "train"]
  assert [r["skipped_steps"] for r in train] == [0, 1, 0]
  assert all(np.isfinite(r["loss_nats"]) for r in train)
  # Up to the skipped step the run is the straight one; after it, it differs.
  assert train[0] == [r for r in _metrics(straight) if r["split"] == "train"][0]
  params = trainer.load_trained(str(tmp_path))[3]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _script(workdir, *extra):
  flags = [f"--{k}={v}" for k, v in TINY.items()] + [f"--workdir={workdir}", *extra]
  return [sys.executable, os.path.join(REPO, "experiments", "train_lm.py"), *flags]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_train_lm_exits_nonzero_on_signal_after_saving(tmp_path, signum, code):
  extra = ["--steps=400", "--checkpoint_every=100"]
  proc = subprocess.Popen(_script(tmp_path / "w", *extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  deadline = time.time() + 300
  while not os.path.exists(tmp_path / "w" / "metrics.jsonl") and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(1.0)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == code, err[-3000:]
  assert f"stopped by {signal.Signals(signum).name} after step" in err
  saved = [int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()]
  assert saved and max(saved) < 400
  rerun = subprocess.run(_script(tmp_path / "w", *extra), capture_output=True, text=True,
                         timeout=600, cwd=REPO)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from step {max(saved)}" in rerun.stderr
  straight = subprocess.run(_script(tmp_path / "s", *extra), capture_output=True, text=True,
                            timeout=600, cwd=REPO)
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert _metrics(tmp_path / "w") == _metrics(tmp_path / "s")
  _assert_same_params(trainer.load_trained(str(tmp_path / "w"))[3],
                      trainer.load_trained(str(tmp_path / "s"))[3])
