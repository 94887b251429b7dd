"""Two processes with jax.distributed (CPU, gloo, loopback coordinator) equal one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm_jax.train import run_logging
from lm_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(corpus="synthetic", synthetic_vocab_size=16, synthetic_train_tokens=3000,
            cell="lstm", hidden=16, embed=8, batch_size=4, bptt=8, optimizer="adam", lr=1e-2,
            steps=12, checkpoint_every=6, log_every=3, eval_batch_size=3)


def _command(workdir, *extra):
  return [sys.executable, os.path.join(REPO, "experiments", "train_lm.py"),
          *[f"--{k}={v}" for k, v in TINY.items()], f"--workdir={workdir}", *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return env


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in run_logging.TIMING_KEYS}
          for r in run_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_equal_one_process(tmp_path):
  """Same global batch: params and metrics agree to 1e-5 (psum adds the two halves' gradients
  and losses in another order than one device does, so bit equality is not expected)."""
  single = subprocess.run(_command(tmp_path / "single", "--parallel=none"), env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
  assert single.returncode == 0, single.stderr[-3000:]
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      _command(tmp_path / "multi", "--parallel=shard_map", f"--coordinator_address={address}",
               "--num_processes=2", f"--process_id={i}"),
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
      for i in range(2)]
  errors = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=600)
    finally:
      proc.kill()
    errors.append(err)
    assert proc.returncode == 0, err[-3000:]
  assert "shard_map over 2 device(s) in 2 process(es)" in errors[0]
  with open(tmp_path / "multi" / "results.json") as f:
    results = json.load(f)
  assert (results["num_processes"], results["num_devices"]) == (2, 2)
  multi, one = _records(tmp_path / "multi"), _records(tmp_path / "single")
  assert [(r["step"], r["split"]) for r in multi] == [(r["step"], r["split"]) for r in one]
  for a, b in zip(multi, one):
    for key in ("loss_nats", "grad_norm"):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{key} {a['step']}")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               trainer.load_trained(str(tmp_path / "multi"))[3],
               trainer.load_trained(str(tmp_path / "single"))[3])
