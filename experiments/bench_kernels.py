r"""Benchmarks the loss kernels: integer-label cross-entropy and the fused output layer + loss.

(a) ``losses.softmax_cross_entropy_with_integer_labels`` vs optax's vs a naive
    ``log_softmax`` + ``take_along_axis``: forward+backward (gradient of the
    summed loss w.r.t. the logits) at ``N`` tokens and several ``V``.
(b) ``fused.linear_softmax_cross_entropy`` with ``reduction="sum"`` (one pass, ``6NHV``)
    and the natural calls on its per-token losses (``reduction="none"``): ``.sum()``
    (``fused_none``), ``.mean()`` (``fused_none_mean``) and a masked mean over 90% of the
    tokens (``fused_masked_mean``), each ``6NHV`` when the cotangent is one number on the
    counted tokens (the unit-cotangent gradients formed in the forward), vs the unfused jitted
    ``hidden @ weight.T + bias`` followed by optax's loss (and by (a)'s kernel):
    forward+backward w.r.t. hidden, weight and bias, against the floor
    ``6 N H V / (matmul FLOP/s)``; peak memory is XLA's temporaries + outputs. When
    PyTorch is importable (a benchmark-only extra: ``pip install torch``), its
    ``F.linear_cross_entropy`` (reference path, and the chunked path with
    ``LinearCrossEntropyOptions()``) is timed in the same interleaved rounds.
(c) the machine's float32 matmul FLOP/s and memory bandwidth.

The contenders of each row are timed interleaved (round-robin, order alternating)
after a warm-up, so load from other jobs hits all of them; medians of wall and of
process CPU seconds are reported (CPU seconds are steadier on a shared machine).
Temporary memory is XLA's ``memory_analysis().temp_size_in_bytes``. Like the other scripts it
first calls :func:`lm_jax.ops.allocator.keep_freed_memory_on_cpu` (``--nokeep_freed_memory``:
glibc's defaults, under which every call's large temporaries are fresh pages).

  python experiments/bench_kernels.py --size=small   # seconds; the smoke run
  python experiments/bench_kernels.py --size=full    # N=4096, H=512, V up to 128k; minutes
  python experiments/bench_kernels.py --size=full --sections=fused --fused_vocab=32768
"""
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarking

from lm_jax.ops import allocator
from lm_jax.ops import fused
from lm_jax.ops import losses

_SIZE = flags.DEFINE_enum("size", "small", ["small", "full"], "small: tiny smoke run; full: the sizes of record")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_kernels.json", "where to write the results")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds per row (medians reported)")
_SECTIONS = flags.DEFINE_list("sections", ["cross_entropy", "fused"],
                              "which of (a) cross_entropy and (b) fused to run")
_KEEP_FREED = benchmarking.define_keep_freed_memory_flag()
_FUSED_VOCAB = flags.DEFINE_list("fused_vocab", [], "(b)'s V values (default: the size's)")

SIZES = {
    "small": {"n": 1024, "h": 64, "ce_vocab": [1000, 4000], "fused_vocab": [2000, 8000], "matmul": 512},
    "full": {"n": 4096, "h": 512, "ce_vocab": [10_000, 32_768, 131_072], "fused_vocab": [32_768, 131_072],
             "matmul": 2048},
}


def _naive_xent(logits_NxV, labels_N):
  log_probs_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  return -jnp.take_along_axis(log_probs_NxV, labels_N[:, None], axis=-1)[:, 0]


def _unfused_linear_xent(hidden_NxH, weight_VxH, bias_V, labels_N):
  return losses.softmax_cross_entropy_with_integer_labels(hidden_NxH @ weight_VxH.T + bias_V, labels_N)


def _unfused_optax(hidden_NxH, weight_VxH, bias_V, labels_N):
  return optax.softmax_cross_entropy_with_integer_labels(hidden_NxH @ weight_VxH.T + bias_V, labels_N)


def _fused_linear_xent(hidden_NxH, weight_VxH, bias_V, labels_N):
  return fused.linear_softmax_cross_entropy(hidden_NxH, weight_VxH, labels_N, bias_V=bias_V)


def _fused_none_mean(hidden_NxH, weight_VxH, bias_V, labels_N):
  return _fused_linear_xent(hidden_NxH, weight_VxH, bias_V, labels_N).mean()


def _fused_masked_mean(hidden_NxH, weight_VxH, bias_V, labels_N):
  where_N = jnp.arange(labels_N.shape[0]) % 10 != 9  # 90% counted, as padded batches
  loss_N = fused.linear_softmax_cross_entropy(hidden_NxH, weight_VxH, labels_N, bias_V=bias_V,
                                              where=where_N)
  return jnp.sum(loss_N) / jnp.sum(where_N)


def _fused_sum(hidden_NxH, weight_VxH, bias_V, labels_N):
  return fused.linear_softmax_cross_entropy(hidden_NxH, weight_VxH, labels_N, bias_V=bias_V,
                                            reduction="sum")


def _torch_contenders(args):
  """``{name: fn}`` and ``{name: args}`` timing PyTorch's ``F.linear_cross_entropy`` forward +
  backward (sum reduction) on the same data, or empty dicts when torch is not installed."""
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return {}, {}
  hidden, weight, bias, labels = (np.asarray(a) for a in args)
  leaves = [torch.tensor(x, requires_grad=True) for x in (hidden, weight, bias)]
  targets = torch.tensor(labels.astype(np.int64))

  def step(options):
    def run(h, w, b, y):
      for t in (h, w, b):
        t.grad = None
      F.linear_cross_entropy(h, w, y, linear_bias=b, reduction="sum", options=options).backward()
      return h.grad, w.grad, b.grad
    return run

  chunked = getattr(F, "LinearCrossEntropyOptions", None) or torch.nn.LinearCrossEntropyOptions
  fns = {"torch_reference": step(None), "torch_chunked": step(chunked())}
  return fns, {name: (*leaves, targets) for name in fns}


def _summed(loss_fn):
  return lambda *args: jnp.sum(loss_fn(*args))


def _measure(contenders, args, argnums, repeats, torch=({}, {})):
  """Times, temp (and temp + output) bytes and residuals of ``grad(sum(loss))`` for each
  contender; ``torch`` adds ``({name: fn}, {name: args})`` timed in the same rounds."""
  grads = {name: jax.grad(_summed(fn), argnums=argnums) for name, fn in contenders.items()}
  torch_fns, torch_args = torch
  fns = {**{name: jax.jit(g) for name, g in grads.items()}, **torch_fns}
  samples = benchmarking.time_interleaved_wall_and_cpu(
      fns, {**{name: args for name in grads}, **torch_args}, repeats=repeats, warmup=1)
  out = {}
  for name in fns:
    out[name] = {"wall_s": statistics.median(samples[name]["wall"]),
                 "cpu_s": statistics.median(samples[name]["cpu"]),
                 "wall_samples_s": samples[name]["wall"], "cpu_samples_s": samples[name]["cpu"],
                 "temp_bytes": float("nan"), "peak_bytes": float("nan"), "residuals": []}
    if name in grads:
      memory = jax.jit(grads[name]).lower(*args).compile().memory_analysis()
      out[name].update(temp_bytes=memory.temp_size_in_bytes,
                       peak_bytes=memory.temp_size_in_bytes + memory.output_size_in_bytes,
                       residuals=benchmarking.residual_shapes(_summed(contenders[name]), *args))
  return out


def _cross_entropy_rows(n, vocab_sizes, repeats):
  contenders = {"lm_jax": losses.softmax_cross_entropy_with_integer_labels,
                "optax": optax.softmax_cross_entropy_with_integer_labels, "naive": _naive_xent}
  rows = []
  for v in vocab_sizes:
    k_logits, k_labels = jax.random.split(jax.random.key(v))
    args = (jax.random.normal(k_logits, (n, v)), jax.random.randint(k_labels, (n,), 0, v))
    print(f"(a) measuring N={n} V={v}", flush=True)
    result = _measure(contenders, args, 0, repeats)
    for name, r in result.items():
      rows.append({"kernel": name, "N": n, "V": v, **r,
                   "wall_vs_optax": r["wall_s"] / result["optax"]["wall_s"],
                   "cpu_vs_optax": r["cpu_s"] / result["optax"]["cpu_s"],
                   "temp_MiB": r["temp_bytes"] / 2**20})
    del args
  return rows


def _fused_rows(n, h, vocab_sizes, repeats):
  contenders = {"fused_sum": _fused_sum, "fused_none": _fused_linear_xent,
                "fused_none_mean": _fused_none_mean, "fused_masked_mean": _fused_masked_mean,
                "unfused_optax": _unfused_optax, "unfused_lm_jax": _unfused_linear_xent}
  rows = []
  for v in vocab_sizes:
    k_h, k_w, k_b, k_y = jax.random.split(jax.random.key(v), 4)
    args = (jax.random.normal(k_h, (n, h)), jax.random.normal(k_w, (v, h)) / h**0.5,
            jax.random.normal(k_b, (v,)), jax.random.randint(k_y, (n,), 0, v))
    print(f"(b) measuring N={n} H={h} V={v}", flush=True)
    result = _measure(contenders, args, (0, 1, 2), repeats, torch=_torch_contenders(args))
    base = result["unfused_optax"]
    for name, r in result.items():
      rows.append({"kernel": name, "N": n, "H": h, "V": v, **r,
                   "wall_vs_unfused": r["wall_s"] / base["wall_s"],
                   "cpu_vs_unfused": r["cpu_s"] / base["cpu_s"],
                   "temp_MiB": r["temp_bytes"] / 2**20, "peak_MiB": r["peak_bytes"] / 2**20,
                   "peak_vs_unfused": r["peak_bytes"] / max(base["peak_bytes"], 1),
                   "temp_vs_unfused": r["temp_bytes"] / max(base["temp_bytes"], 1)})
    del args
  return rows


def main(argv):
  del argv
  sizes, repeats = SIZES[_SIZE.value], _REPEATS.value
  applied = bool(_KEEP_FREED.value and allocator.keep_freed_memory_on_cpu())
  print(f"CPU: {benchmarking.cpu_model()}; keep_freed_memory_on_cpu() applied: {applied} "
        "(--nokeep_freed_memory: glibc's defaults)")
  # The ceiling is measured before and after the kernels; load only slows a run, so the better counts.
  matmul_flops = [benchmarking.measure_matmul_flops(size=sizes["matmul"])]
  bandwidth = benchmarking.measure_memory_bandwidth()
  ce_rows = (_cross_entropy_rows(sizes["n"], sizes["ce_vocab"], repeats)
             if "cross_entropy" in _SECTIONS.value else [])
  fused_vocab = [int(v) for v in _FUSED_VOCAB.value] or sizes["fused_vocab"]
  fused_rows = (_fused_rows(sizes["n"], sizes["h"], fused_vocab, repeats)
                if "fused" in _SECTIONS.value else [])
  matmul_flops.append(benchmarking.measure_matmul_flops(size=sizes["matmul"]))
  for row in fused_rows:  # the matmul floor: 6NHV FLOPs (forward matmul, two backward matmuls)
    row["floor_s"] = 6.0 * row["N"] * row["H"] * row["V"] / max(matmul_flops)
    row["frac_of_matmul_ceiling"] = row["floor_s"] / row["wall_s"]
  print(f"(c) float32 matmul {max(matmul_flops) / 1e9:.1f} GFLOP/s (best of before/after: "
        f"{', '.join(f'{f / 1e9:.1f}' for f in matmul_flops)}); memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
  print("\n(a) integer-label cross-entropy, forward+backward w.r.t. logits")
  benchmarking.print_table(ce_rows, ["kernel", "N", "V", "wall_s", "cpu_s", "wall_vs_optax", "cpu_vs_optax",
                                     "temp_MiB"])
  for row in ce_rows:
    print(f"  residuals {row['kernel']} V={row['V']}: {', '.join(row['residuals'])}")
  print("\n(b) output layer + cross-entropy, forward+backward w.r.t. hidden, weight, bias")
  print("  (ratios against unfused_optax: the jitted matmul + optax's loss; peak = XLA temporaries"
        " + outputs)")
  benchmarking.print_table(fused_rows, ["kernel", "N", "H", "V", "wall_s", "cpu_s", "wall_vs_unfused",
                                        "cpu_vs_unfused", "peak_MiB", "peak_vs_unfused",
                                        "temp_vs_unfused", "frac_of_matmul_ceiling"])
  for row in fused_rows:
    if row["residuals"]:
      print(f"  residuals {row['kernel']} V={row['V']}: {', '.join(row['residuals'])}")
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_kernels", "size": _SIZE.value, "repeats": repeats,
      "keep_freed_memory": applied,
      "matmul_flops_per_s": max(matmul_flops), "matmul_flops_per_s_before_after": matmul_flops,
      "memory_bandwidth_bytes_per_s": bandwidth, "cross_entropy": ce_rows, "fused_linear_cross_entropy": fused_rows})
  print(f"\nwrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
