r"""Data-parallel scaling of the train step: tokens/s on 1, 2, 4 fake CPU devices and 2 processes.

Each configuration runs in its own subprocess (device counts are fixed when JAX starts):
``--parallel=none`` on 1 device, ``shard_map`` over 2 and 4 fake CPU devices
(``jax_num_cpu_devices``), and ``shard_map`` over 2 processes of 1 device each joined
by ``jax.distributed`` (gloo over loopback). Throughput is the global batch's tokens
per second of the jitted LSTM train step, after warm-up, as ratios to 1 device.

Caveat, recorded in the JSON: fake CPU devices are threads of one process sharing this
machine's cores, so ratios here measure overhead (collectives, partitioning), not the
speed-up that real devices give; more devices on the same cores cannot be faster.

  python experiments/bench_scaling.py                 # table + results/bench_scaling.json
"""
import json
import os
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

_WORKER = flags.DEFINE_string("worker", "", "internal: run one configuration (none|shard_map)")
_DEVICES = flags.DEFINE_integer("devices", 1, "internal: fake CPU devices of a worker")
_PROCESS = flags.DEFINE_string("process", "", "internal: coordinator,num_processes,process_id")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per configuration")
_BATCH = flags.DEFINE_integer("batch_size", 32, "global batch rows")
_BPTT = flags.DEFINE_integer("bptt", 32, "unroll")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "LSTM hidden size (= embedding size)")
_VOCAB = flags.DEFINE_integer("vocab", 2000, "vocabulary size")
_OUT = flags.DEFINE_string("out", "results/bench_scaling.json", "JSON output")

CAVEAT = ("fake CPU devices (jax_num_cpu_devices) and local processes share this machine's "
          "cores, so these ratios measure data-parallel overhead, not real multi-device speed-up")


def _worker() -> dict:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if _PROCESS.value:
    from lm_jax.train import parallel  # pylint: disable=g-import-not-at-top
    address, num, pid = _PROCESS.value.split(",")
    parallel.initialize_distributed(address, int(num), int(pid))
  else:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lm_jax.data import batching  # pylint: disable=g-import-not-at-top
  from lm_jax.models import language_model  # pylint: disable=g-import-not-at-top
  from lm_jax.train import optimizers, parallel, training  # pylint: disable=g-import-not-at-top
  B, T = _BATCH.value, _BPTT.value
  model = language_model.make_language_model(vocab_size=_VOCAB.value, embed_size=_HIDDEN.value,
                                             hidden_size=_HIDDEN.value, cell="lstm")
  opt = optimizers.make_optimizer("sgd", 0.1, clip=5.0)
  dp = parallel.make_data_parallel(
      _WORKER.value, functools.partial(training.train_step, model=model, optimizer=opt),
      functools.partial(training.eval_step, model=model))
  state = dp.put_state(training.create_train_state(model, opt, seed=0, batch_size=B))
  tokens = np.random.default_rng(0).integers(0, _VOCAB.value, B * T * 8 + T).astype(np.int32)
  rows = dp.row_range(B)
  batches = [dp.put_batch(batching.get_batch(tokens, batching.BatchPosition(0, i), batch_size=B,
                                             bptt=T, strategy="sequential", seed=0, rows=rows), B)
             for i in range(8)]
  for i in range(3):
    state, metrics = dp.train_step(state, batches[i % 8])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = dp.train_step(state, batches[i % 8])
  float(metrics["loss_sum"])
  seconds = time.perf_counter() - start
  return {"mode": dp.mode, "devices": dp.num_devices, "processes": jax.process_count(),
          "tokens_per_sec": B * T * _STEPS.value / seconds, "step_ms": 1e3 * seconds / _STEPS.value}


def _spawn(*extra):
  args = [sys.executable, os.path.abspath(__file__), *extra, f"--steps={_STEPS.value}",
          f"--batch_size={_BATCH.value}", f"--bptt={_BPTT.value}", f"--hidden={_HIDDEN.value}",
          f"--vocab={_VOCAB.value}"]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(proc) -> dict:
  out, err = proc.communicate(timeout=900)
  if proc.returncode:
    raise RuntimeError(f"worker failed:\n{err[-3000:]}")
  return json.loads(out.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_worker()), flush=True)
    return
  import benchmarking  # pylint: disable=g-import-not-at-top
  rows = [_result(_spawn("--worker=none", "--devices=1"))]
  for n in (2, 4):
    rows.append(_result(_spawn("--worker=shard_map", f"--devices={n}")))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_spawn("--worker=shard_map", f"--process=localhost:{port},2,{i}") for i in range(2)]
  rows.append([_result(p) for p in procs][0])
  for row in rows:
    row["ratio_to_1_device"] = row["tokens_per_sec"] / rows[0]["tokens_per_sec"]
  benchmarking.print_table(rows, ["mode", "devices", "processes", "tokens_per_sec", "step_ms",
                                  "ratio_to_1_device"])
  print("caveat:", CAVEAT)
  benchmarking.write_json(_OUT.value, {
      "caveat": CAVEAT, "rows": rows, "load_average_1_5_15_min": list(os.getloadavg()),
      "setup": {"cell": "lstm", "hidden": _HIDDEN.value, "vocab": _VOCAB.value,
                "batch_size": _BATCH.value, "bptt": _BPTT.value, "steps": _STEPS.value},
      "command": "python3 experiments/bench_scaling.py " + " ".join(sys.argv[1:])})
  print("wrote", _OUT.value)


if __name__ == "__main__":
  app.run(main)
