r"""Forward+backward throughput of one recurrent layer: hoisted input projection vs naive scan.

For each cell, times ``jax.grad`` (w.r.t. params and inputs) of one layer over a
``[B, T, E]`` batch with :func:`lm_jax.models.rnn.scan_layer` (input projection for all
steps as one matmul before the scan) and :func:`lm_jax.models.rnn.scan_layer_unhoisted`
(projection inside the scan), interleaved in one run so machine load hits both.
FLOPs per token for forward+backward are ``6 (E H + H H) g`` with gate multiplier
``g`` = 1 (Elman), 3 (GRU), 4 (LSTM); the achieved FLOP/s is compared with the
best measured FLOP/s of square float32 matmuls (the machine's ceiling, measured
before and after the layers; the larger is used, since load only slows a run).

  python experiments/bench_rnn.py --cells=elman,gru,lstm --repeats=20
"""
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import benchmarking

from lm_jax.models import rnn

_CELLS = flags.DEFINE_list("cells", ["elman", "gru", "lstm"], "lm_jax.models.rnn.get_cell names")
_BATCH = flags.DEFINE_integer("batch_size", 32, "B")
_BPTT = flags.DEFINE_integer("bptt", 35, "T, unrolled steps")
_SIZE = flags.DEFINE_integer("size", 256, "E = H")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed rounds (median reported)")
_UNROLL = flags.DEFINE_integer("unroll", 1, "lax.scan unroll for both versions")
_MATMUL_SIZES = flags.DEFINE_list("matmul_sizes", ["512", "1024", "2048"],
                                  "square matmul sizes whose best FLOP/s is the ceiling")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_rnn.json", "where to write the results")

GATES = {"elman": 1, "rnn_tanh": 1, "rnn_relu": 1, "elman_direct": 1, "gru": 3, "lstm": 4}


def _fwd_bwd(cell, layer_fn, carry, unroll):
  def loss(params, x_BxTxE, cotangent_BxTxH):
    out_BxTxH, _ = layer_fn(cell, params, x_BxTxE, carry, unroll=unroll)
    return jnp.vdot(out_BxTxH, cotangent_BxTxH)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _ceiling(repeats):
  """The best float32 matmul FLOP/s over a few sizes (load only ever slows a run down)."""
  sizes = map(int, _MATMUL_SIZES.value)
  return max(benchmarking.measure_matmul_flops(size=n, repeats=repeats) for n in sizes)


def main(argv):
  del argv
  b, t, size, repeats = _BATCH.value, _BPTT.value, _SIZE.value, _REPEATS.value
  ceilings = [_ceiling(repeats)]
  rows, results = [], {}
  for name in _CELLS.value:
    cell, g = rnn.get_cell(name), GATES[name]
    k_p, k_x, k_c = jax.random.split(jax.random.PRNGKey(0), 3)
    args = (cell.init(k_p, size, size), jax.random.normal(k_x, (b, t, size)),
            jax.random.normal(k_c, (b, t, size)))
    carry = cell.initial_carry(b, size)
    fns = {"hoisted": _fwd_bwd(cell, rnn.scan_layer, carry, _UNROLL.value),
           "naive": _fwd_bwd(cell, rnn.scan_layer_unhoisted, carry, _UNROLL.value)}
    samples = benchmarking.time_interleaved(fns, args, repeats=repeats, warmup=2)
    results[name] = {"gates": g, "flops_per_token": 6.0 * (size * size + size * size) * g,
                     "samples_s": samples}
  ceilings.append(_ceiling(repeats))
  ceiling = max(ceilings)
  for name, result in results.items():
    seconds = {impl: statistics.median(s) for impl, s in result["samples_s"].items()}
    for impl, sec in seconds.items():
      tokens_per_s = b * t / sec
      achieved = tokens_per_s * result["flops_per_token"]
      row = {"cell": name, "impl": impl, "ms": 1e3 * sec, "tokens/s": tokens_per_s,
             "GFLOP/s": achieved / 1e9, "frac_of_matmul": achieved / ceiling,
             "speedup_vs_naive": seconds["naive"] / sec}
      rows.append(row)
      result[impl] = {k: v for k, v in row.items() if k not in ("cell", "impl")}
  print(f"B={b} T={t} E=H={size}; matmul ceiling {ceiling / 1e9:.1f} GFLOP/s (best float32 matmul "
        f"of sizes {_MATMUL_SIZES.value}, measured before and after)")
  benchmarking.print_table(rows, ["cell", "impl", "ms", "tokens/s", "GFLOP/s", "frac_of_matmul",
                                  "speedup_vs_naive"])
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_rnn", "batch_size": b, "bptt": t, "size": size, "repeats": repeats,
      "unroll": _UNROLL.value, "matmul_flops_per_s": ceiling,
      "matmul_flops_per_s_before_after": ceilings, "cells": results})


if __name__ == "__main__":
  app.run(main)
