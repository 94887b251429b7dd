"""End to end: the training loop, its outputs, resume, bad flags, NaN; train_lm.py smoke run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm_jax import checkpointing
from lm_jax import generation
from lm_jax import run_logging
from lm_jax import trainer
from lm_jax.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("wall_time", "tokens_per_sec")

TINY = dict(corpus="synthetic", synthetic_vocab_size=16, synthetic_train_tokens=3000,
            cell="lstm", hidden=16, embed=8, batch_size=4, bptt=8, optimizer="adam", lr=1e-2,
            steps=24, checkpoint_every=8, log_every=4, eval_batch_size=2)


def _config(workdir, **overrides):
  return TrainConfig(workdir=str(workdir), **{**TINY, **overrides})


def _metrics(workdir):
  records = run_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _final_params(workdir):
  return generation.load_trained(str(workdir))[3]


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_run_writes_everything_a_researcher_needs(tmp_path):
  results = trainer.train_and_evaluate(_config(tmp_path))
  for name in ("metrics.jsonl", "vocab.json", "config.json", "learning_curve.png",
               "results.json", "checkpoints"):
    assert os.path.exists(tmp_path / name), name
  for key in ("valid_perplexity", "valid_bits_per_token", "test_perplexity",
              "test_bits_per_token", "true_entropy_bits_per_token", "wall_time_sec", "flags"):
    assert key in results
  np.testing.assert_allclose(results["valid_perplexity"],
                             2.0 ** results["valid_bits_per_token"], rtol=1e-9)
  records = run_logging.read_metrics(str(tmp_path / "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
  for key in ("step", "split", "loss_nats", "perplexity", "bits_per_token", "tokens_per_sec",
              "lr", "grad_norm", "wall_time"):
    assert key in train[0]
  assert train[-1]["loss_nats"] < train[0]["loss_nats"]
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["steps"] == 24


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(_config(straight, dropout=0.3))

  interrupted = tmp_path / "interrupted"
  real_save = checkpointing.save

  class Interrupt(Exception):
    pass

  def save_then_die(manager, step, state, meta):
    real_save(manager, step, state, meta)
    if step == 16:
      manager.wait_until_finished()
      raise Interrupt

  monkeypatch.setattr(checkpointing, "save", save_then_die)
  with pytest.raises(Interrupt):
    trainer.train_and_evaluate(_config(interrupted, dropout=0.3))
  monkeypatch.setattr(checkpointing, "save", real_save)
  # Simulate a torn last line of metrics.jsonl, as a kill during a write leaves.
  with open(interrupted / "metrics.jsonl", "a") as f:
    f.write('{"step": 17, "spl')
  trainer.train_and_evaluate(_config(interrupted, dropout=0.3))

  assert _metrics(straight) == _metrics(interrupted)
  _assert_same_params(_final_params(straight), _final_params(interrupted))


def test_same_seed_same_metrics(tmp_path):
  trainer.train_and_evaluate(_config(tmp_path / "a", steps=8))
  trainer.train_and_evaluate(_config(tmp_path / "b", steps=8))
  assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
  trainer.train_and_evaluate(_config(tmp_path, steps=8))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="hidden: checkpoint has 16"):
    trainer.train_and_evaluate(_config(tmp_path, steps=16, hidden=32))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="vocab"):
    trainer.train_and_evaluate(_config(tmp_path, steps=16, synthetic_vocab_size=17))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  trainer.train_and_evaluate(_config(tmp_path, steps=16))
  newest = tmp_path / "checkpoints" / "16" / "state"
  for root, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  results = trainer.train_and_evaluate(_config(tmp_path, steps=24))
  assert results["steps"] == 24


def test_nan_loss_stops_with_the_step_named(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step \d+"):
    trainer.train_and_evaluate(_config(tmp_path, optimizer="sgd", lr=1e30, clip=0.0,
                                       cell="rnn_relu", init_scale=3.0))


@pytest.mark.parametrize("overrides, flag", [
    (dict(cell="transformer"), "--cell"), (dict(batching="shuffled"), "--batching"),
    (dict(hidden=0), "--hidden"), (dict(steps=0, epochs=0), "--epochs"),
    (dict(corpus="text"), "--text_path"), (dict(dropout=1.0), "--dropout")])
def test_bad_flags_fail_before_any_work(tmp_path, overrides, flag):
  with pytest.raises(ValueError, match=flag):
    trainer.train_and_evaluate(_config(tmp_path, **overrides))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def _script(workdir, *extra):
  flags = [f"--{k}={v}" for k, v in TINY.items()] + [f"--workdir={workdir}", *extra]
  return [sys.executable, os.path.join(REPO, "experiments", "train_lm.py"), *flags]


def test_train_lm_script_smoke_and_generate(tmp_path):
  out = subprocess.run(_script(tmp_path / "w"), capture_output=True, text=True, timeout=300,
                       cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "true entropy rate" in out.stderr
  gen = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "generate.py"),
                        f"--workdir={tmp_path / 'w'}", "--prompt=s1 s2", "--num_tokens=5",
                        "--temperature=0"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stdout.split()[:2] == ["s1", "s2"] and len(gen.stdout.split()) == 7


@pytest.mark.slow
def test_kill_9_then_rerun_ends_bit_identical(tmp_path):
  """SIGKILL at a random moment (maybe mid-step, maybe mid-checkpoint); the rerun catches up."""
  extra = ["--steps=60", "--checkpoint_every=4"]
  straight = subprocess.run(_script(tmp_path / "straight", *extra), capture_output=True,
                            text=True, timeout=600, cwd=REPO)
  assert straight.returncode == 0, straight.stderr[-3000:]
  rng = random.Random(0)
  workdir = tmp_path / "killed"
  for attempt in range(2):
    proc = subprocess.Popen(_script(workdir, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while not os.path.exists(workdir / "checkpoints" / "4") and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  rerun = subprocess.run(_script(workdir, *extra), capture_output=True, text=True, timeout=600,
                         cwd=REPO)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert _metrics(tmp_path / "straight") == _metrics(workdir)
  _assert_same_params(_final_params(tmp_path / "straight"), _final_params(workdir))
