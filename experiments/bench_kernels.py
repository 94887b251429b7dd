r"""Benchmarks the loss kernels: integer-label cross-entropy and the fused output layer + loss.

(a) ``losses.softmax_cross_entropy_with_integer_labels`` vs optax's vs a naive
    ``log_softmax`` + ``take_along_axis``: forward+backward (gradient of the
    summed loss w.r.t. the logits) at ``N`` tokens and several ``V``.
(b) ``fused.linear_softmax_cross_entropy`` vs the unfused ``hidden @ weight.T +
    bias`` followed by (a)'s kernel: forward+backward w.r.t. hidden, weight and
    bias, against the floor ``6 N H V / (matmul FLOP/s)``.
(c) the machine's float32 matmul FLOP/s and memory bandwidth.

The contenders of each row are timed interleaved (round-robin, order alternating)
after a warm-up, so load from other jobs hits all of them; medians of wall and of
process CPU seconds are reported (CPU seconds are steadier on a shared machine).
Temporary memory is XLA's ``memory_analysis().temp_size_in_bytes``.

  python experiments/bench_kernels.py --size=small   # seconds; the smoke run
  python experiments/bench_kernels.py --size=full    # N=4096, H=512, V up to 128k; minutes
"""
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from lm_jax import benchmarking
from lm_jax import fused
from lm_jax import losses

_SIZE = flags.DEFINE_enum("size", "small", ["small", "full"], "small: tiny smoke run; full: the sizes of record")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_kernels.json", "where to write the results")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds per row (medians reported)")

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


def _fused_linear_xent(hidden_NxH, weight_VxH, bias_V, labels_N):
  return fused.linear_softmax_cross_entropy(hidden_NxH, weight_VxH, labels_N, bias_V=bias_V)


def _summed(loss_fn):
  return lambda *args: jnp.sum(loss_fn(*args))


def _measure(contenders, args, argnums, repeats):
  """Times, temp bytes and residuals of ``grad(sum(loss))`` for each contender."""
  grads = {name: jax.grad(_summed(fn), argnums=argnums) for name, fn in contenders.items()}
  samples = benchmarking.time_interleaved_wall_and_cpu(
      {name: jax.jit(g) for name, g in grads.items()}, args, repeats=repeats, warmup=1)
  return {name: {"wall_s": statistics.median(samples[name]["wall"]),
                 "cpu_s": statistics.median(samples[name]["cpu"]),
                 "wall_samples_s": samples[name]["wall"], "cpu_samples_s": samples[name]["cpu"],
                 "temp_bytes": benchmarking.temp_bytes(grads[name], *args),
                 "residuals": benchmarking.residual_shapes(_summed(contenders[name]), *args)}
          for name in contenders}


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
  contenders = {"fused": _fused_linear_xent, "unfused": _unfused_linear_xent}
  rows = []
  for v in vocab_sizes:
    k_h, k_w, k_b, k_y = jax.random.split(jax.random.key(v), 4)
    args = (jax.random.normal(k_h, (n, h)), jax.random.normal(k_w, (v, h)) / h**0.5,
            jax.random.normal(k_b, (v,)), jax.random.randint(k_y, (n,), 0, v))
    print(f"(b) measuring N={n} H={h} V={v}", flush=True)
    result = _measure(contenders, args, (0, 1, 2), repeats)
    for name, r in result.items():
      rows.append({"kernel": name, "N": n, "H": h, "V": v, **r,
                   "wall_vs_unfused": r["wall_s"] / result["unfused"]["wall_s"],
                   "cpu_vs_unfused": r["cpu_s"] / result["unfused"]["cpu_s"],
                   "temp_MiB": r["temp_bytes"] / 2**20,
                   "temp_vs_unfused": r["temp_bytes"] / max(result["unfused"]["temp_bytes"], 1)})
    del args
  return rows


def main(argv):
  del argv
  sizes, repeats = SIZES[_SIZE.value], _REPEATS.value
  # The ceiling is measured before and after the kernels; load only slows a run, so the better counts.
  matmul_flops = [benchmarking.measure_matmul_flops(size=sizes["matmul"])]
  bandwidth = benchmarking.measure_memory_bandwidth()
  ce_rows = _cross_entropy_rows(sizes["n"], sizes["ce_vocab"], repeats)
  fused_rows = _fused_rows(sizes["n"], sizes["h"], sizes["fused_vocab"], repeats)
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
  benchmarking.print_table(fused_rows, ["kernel", "N", "H", "V", "wall_s", "cpu_s", "wall_vs_unfused",
                                        "cpu_vs_unfused", "temp_MiB", "temp_vs_unfused",
                                        "frac_of_matmul_ceiling"])
  for row in fused_rows:
    print(f"  residuals {row['kernel']} V={row['V']}: {', '.join(row['residuals'])}")
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_kernels", "size": _SIZE.value, "repeats": repeats,
      "matmul_flops_per_s": max(matmul_flops), "matmul_flops_per_s_before_after": matmul_flops,
      "memory_bandwidth_bytes_per_s": bandwidth, "cross_entropy": ce_rows, "fused_linear_cross_entropy": fused_rows})
  print(f"\nwrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
