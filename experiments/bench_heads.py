r"""Loss forward+backward time per token of every output head against the full softmax.

Synthetic Zipfian targets (ids in decreasing frequency, counts proportional to 1/rank),
``N`` tokens of hidden size ``H``, at each vocabulary size ``V``. Two ways to apply the
gradient of the head's output matrices:

* ``dense``: ``jax.grad`` of the mean loss w.r.t. all head params and the hidden states.
  Whatever the head reads, the gradient of a ``[V, H]`` matrix is a ``[V, H]`` array, so
  this costs at least O(V H) per step (zero-fill plus scatter).
  ``hsm_autodiff`` is the hierarchical softmax differentiated by autodiff of the plain walk,
  timed beside the default chunked backward (:func:`lm_jax.heads.hierarchical.path_nll`);
  ``class_autodiff`` is the class head differentiated through its gathered windows, beside
  the default scan over windows sliced in place.
* ``sparse``: :func:`lm_jax.heads.sparse_sgd_step`, gradients w.r.t. the gathered rows
  only, applied by an in-place scatter-add (params donated), as word2vec's SGD does. Only
  heads whose loss reads few rows have it (not ``full`` or ``dsoftmax``).

``adaptive`` is the adaptive softmax with :func:`lm_jax.heads.make_head`'s cutoffs from the
counts (the fewest words holding 80% of the mass, then clusters 4x larger),
``adaptive_fixed`` with cutoffs at V/50, V/10, V/2 (PyTorch comparison's [2000, 10000, 50000]
at V = 100k), both div_value 4; ``classtree`` and ``classtree_3`` the class hierarchy with
two and three class levels.

Every head at a given ``V`` is timed in the same interleaved rounds as the full softmax,
and reported as a ratio to it. The O(V H) heads (full softmax, D-softmax) at large ``V``
are timed on fewer tokens (``--full_max_logits``) and reported per token (their cost is
linear in ``N``). The summary gives each head's growth in time per token from the first to
the last ``V`` and the least-squares slope ``b`` of log time on log V (time ~ V^b), also in
the plot's legend.

  python experiments/bench_heads.py                                   # V = 10k, 100k, 1M
  python experiments/bench_heads.py --vocab_sizes=10000,100000 --repeats=3

The script first calls :func:`lm_jax.ops.allocator.keep_freed_memory_on_cpu`
(``--nokeep_freed_memory`` skips it); since that setting cannot be undone in-process, the
columns without it (``*_no_call``) come from a second run of the script in a fresh process
(``--nono_call_column`` skips that).
"""
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarking

from lm_jax import heads
from lm_jax.ops import allocator

_VOCAB_SIZES = flags.DEFINE_list("vocab_sizes", ["10000", "100000", "1000000"], "V values")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "H")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "N, tokens per step")
_HEADS = flags.DEFINE_list("heads", list(heads.HEAD_NAMES), "heads to time")
_MODES = flags.DEFINE_list("modes", ["dense", "sparse"], "gradient application")
_SAMPLES = flags.DEFINE_integer("num_samples", 64, "K for nce / neg / sampled")
_CLASS_BINNINGS = flags.DEFINE_list(
    "class_binnings", ["equal"],
    "class head: time one variant per binning (rows 'class' for the default equal, "
    "'class_<binning>' for the others)")
_FULL_MAX_LOGITS = flags.DEFINE_integer(
    "full_max_logits", 2048 * 100_000, "the full softmax is timed on N = this / V tokens "
    "when that is fewer than --tokens")
_KEEP_FREED = benchmarking.define_keep_freed_memory_flag()
_NO_CALL = flags.DEFINE_bool(
    "no_call_column", True,
    "when the call was applied, also time every row in a second process without it (the "
    "setting cannot be undone in-process) and report us_per_token_no_call and "
    "speedup_vs_full_no_call beside each row")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed rounds (medians reported)")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_heads.json", "output JSON")
_PLOT_OUT = flags.DEFINE_string("plot_out", "results/bench_heads.png", "log-log plot")


def zipf_counts(vocab_size: int, total: float = 1e9) -> np.ndarray:
  """Counts proportional to ``1 / rank``, decreasing with the id, at least 1."""
  ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
  weights = 1.0 / ranks
  return np.maximum(1, np.round(total * weights / weights.sum())).astype(np.int64)


def _inputs(vocab_size, num_tokens, hidden, counts, seed=0):
  rng = np.random.default_rng(seed)
  targets_N = rng.choice(vocab_size, size=num_tokens, p=counts / counts.sum()).astype(np.int32)
  hidden_NxH = rng.normal(0.0, 1.0, (num_tokens, hidden)).astype(np.float32)
  return jnp.asarray(hidden_NxH), jnp.asarray(targets_N)


def _head_variants(name):
  """``[(row label, make_head options)]`` for one head name."""
  if name in ("nce", "neg", "sampled"):
    return [(name, {"num_samples": _SAMPLES.value})]
  if name == "class":  # The scan backward (default) per binning, and autodiff of the
    # gathered windows beside the default binning.
    return ([("class" if b == "equal" else f"class_{b}", {"binning": b})
             for b in _CLASS_BINNINGS.value]
            + [("class_autodiff", {"binning": _CLASS_BINNINGS.value[0], "backward": "autodiff"})])
  if name == "hsm":  # The chunked backward (default) and autodiff of the same walk.
    return [("hsm", {}), ("hsm_autodiff", {"backward": "autodiff"})]
  if name == "adaptive":  # make_head's cutoffs (80% of the mass in the shortlist, then x4),
    # and PyTorch-style fixed fractions of V ([2000, 10000, 50000] at V = 100k).
    return [("adaptive", {}), ("adaptive_fixed", {"cutoffs": "fixed", "div_value": 4.0})]
  if name == "classtree":  # two and three class levels above the words
    return [("classtree", {"levels": 2}), ("classtree_3", {"levels": 3})]
  return [(name, {})]


def _make_head(name, vocab_size, counts, options):
  if name == "hsm" and "backward" in options:  # Not a make_head option: a factory keyword.
    return heads.hierarchical_softmax(heads.huffman_tree(counts), backward=options["backward"])
  if name == "class" and "backward" in options:
    return heads.class_softmax(counts, binning=options["binning"], backward=options["backward"])
  if options.get("cutoffs") == "fixed":
    options = {**options, "cutoffs": [vocab_size // 50, vocab_size // 10, vocab_size // 2]}
  return heads.make_head(name, vocab_size=vocab_size, counts=counts, **options)


def _dense_fn(head, params, hidden_NxH, targets_N, key):
  def objective(params, hidden_NxH):
    return jnp.mean(head.loss(params, hidden_NxH, targets_N, key=key))

  grad_fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
  return lambda: grad_fn(params, hidden_NxH)


def _sparse_fn(head, params, hidden_NxH, targets_N, key):
  step = jax.jit(functools.partial(heads.sparse_sgd_step, head), donate_argnums=0)
  holder = [params]

  def run():
    holder[0], loss_N, grad_hidden_NxH = step(holder[0], hidden_NxH, targets_N, 1e-3, key=key)
    return holder[0], loss_N, grad_hidden_NxH

  return run


def bench_vocab_size(vocab_size):
  """Rows ``{head, mode, V, tokens, us_per_token, vs_full}`` for one ``V``."""
  counts = zipf_counts(vocab_size)
  hidden, num_tokens = _HIDDEN.value, _TOKENS.value
  full_tokens = min(num_tokens, max(64, _FULL_MAX_LOGITS.value // vocab_size))
  key = jax.random.PRNGKey(1)
  fns, tokens = {}, {}
  shared = {}  # (shape, dtype) -> one array for every dense-mode head's param of that shape
  for name, label, options in [(n, l, o) for n in _HEADS.value for l, o in _head_variants(n)]:
    head = _make_head(name, vocab_size, counts, options)
    n = full_tokens if name in ("full", "dsoftmax") else num_tokens  # the O(V H) heads
    hidden_NxH, targets_N = _inputs(vocab_size, n, hidden, counts)
    for mode in _MODES.value:
      if mode == "sparse" and (head.sparse is None or label.endswith("_autodiff")):
        continue  # (the sparse rows do not depend on the dense backward)
      params = head.init(jax.random.PRNGKey(0), hidden)
      if mode == "dense":
        # Dense-mode params are only read, so heads share one array per shape (their values
        # do not change the work done): at V = 1M, ~13 GB of copies less, which kept the
        # three-V run inside a 23 GB machine. Sparse mode donates and updates its own.
        params = jax.tree.map(lambda x: shared.setdefault((x.shape, x.dtype), x), params)
      make = _dense_fn if mode == "dense" else _sparse_fn
      fns[(label, mode)] = make(head, params, hidden_NxH, targets_N, key)
      tokens[(label, mode)] = n
  start = time.time()
  samples = benchmarking.time_interleaved({k: f for k, f in fns.items()}, (),
                                          repeats=_REPEATS.value, warmup=1)
  print(f"V={vocab_size}: timed {len(fns)} functions in {time.time() - start:.0f} s")
  rows = []
  for (name, mode), secs in samples.items():
    us = 1e6 * float(np.median(secs)) / tokens[(name, mode)]
    rows.append({"head": name, "mode": mode, "V": vocab_size, "tokens": tokens[(name, mode)],
                 "us_per_token": us})
  full_us = next((r["us_per_token"] for r in rows if r["head"] == "full"), float("nan"))
  for row in rows:
    row["speedup_vs_full"] = full_us / row["us_per_token"]
  del fns, samples, shared
  gc.collect()  # this V's params and executables, before the next V allocates its own
  return rows


def loglog_slopes(rows):
  """``{head/mode: b}``, the least-squares slope of log(time per token) on log(V): time per
  token grows like V^b (1 for the full softmax, 1/2 for O(sqrt V), ~0 for O(log V))."""
  slopes = {}
  for (name, mode) in sorted({(r["head"], r["mode"]) for r in rows}):
    pts = sorted((r["V"], r["us_per_token"]) for r in rows if (r["head"], r["mode"]) == (name, mode))
    if len(pts) >= 2:
      log_v, log_us = np.log(np.array(pts, np.float64)).T
      slopes[f"{name}/{mode}"] = float(np.polyfit(log_v, log_us, 1)[0])
  return slopes


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  names = sorted({r["head"] for r in rows})
  colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}  # one colour a head
  slopes = loglog_slopes(rows)
  for (name, mode) in sorted({(r["head"], r["mode"]) for r in rows}):
    pts = sorted((r["V"], r["us_per_token"]) for r in rows if (r["head"], r["mode"]) == (name, mode))
    vs, us = zip(*pts)
    slope = slopes.get(f"{name}/{mode}")
    ax.plot(vs, us, "-o" if mode == "dense" else "--s", color=colors[name],
            label=f"{name} ({mode})" + ("" if slope is None else f", slope {slope:.2f}"))
  vs = np.array(sorted({r["V"] for r in rows}), np.float64)
  anchor = min(r["us_per_token"] for r in rows if r["V"] == vs[0])
  for label, shape in (("O(V)", vs / vs[0]), ("O(sqrt V)", np.sqrt(vs / vs[0])),
                       ("O(log V)", np.log(vs) / np.log(vs[0]))):
    ax.plot(vs, anchor * shape, ":", color="gray", linewidth=1)
    ax.annotate(label, (vs[-1], anchor * shape[-1]), fontsize=8, color="gray")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("vocabulary size V")
  ax.set_ylabel("loss fwd+bwd, microseconds per token")
  ax.set_title(f"output heads, H={_HIDDEN.value}, N={_TOKENS.value} "
               "(solid: dense gradient, dashed: sparse rows)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


_SHARED_FLAGS = ("vocab_sizes", "hidden", "tokens", "heads", "modes", "num_samples",
                 "class_binnings", "full_max_logits", "repeats")


def no_call_rows() -> list[dict]:
  """The same rows timed by this script in a fresh process with ``--nokeep_freed_memory``."""
  def value(name):
    v = flags.FLAGS[name].value
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)

  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "no_call.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--nokeep_freed_memory",
                    "--nono_call_column", f"--json_out={out}",
                    f"--plot_out={os.path.join(tmp, 'no_call.png')}",
                    *(f"--{name}={value(name)}" for name in _SHARED_FLAGS)], check=True)
    with open(out, encoding="utf-8") as f:
      return json.load(f)["rows"]


def main(argv):
  del argv
  applied = _KEEP_FREED.value and allocator.keep_freed_memory_on_cpu()
  rows = []
  for v in (int(v) for v in _VOCAB_SIZES.value):
    rows.extend(bench_vocab_size(v))
  columns = ["V", "head", "mode", "tokens", "us_per_token", "speedup_vs_full"]
  if applied and _NO_CALL.value:
    other = {(r["V"], r["head"], r["mode"]): r for r in no_call_rows()}
    for r in rows:
      twin = other.get((r["V"], r["head"], r["mode"]), {})
      r["us_per_token_no_call"] = twin.get("us_per_token", float("nan"))
      r["speedup_vs_full_no_call"] = twin.get("speedup_vs_full", float("nan"))
    columns += ["us_per_token_no_call", "speedup_vs_full_no_call"]
  growth = {}
  sizes = sorted({r["V"] for r in rows})
  for (name, mode) in sorted({(r["head"], r["mode"]) for r in rows}):
    by_v = {r["V"]: r["us_per_token"] for r in rows if (r["head"], r["mode"]) == (name, mode)}
    if sizes[0] in by_v and sizes[-1] in by_v:
      growth[f"{name}/{mode}"] = by_v[sizes[-1]] / by_v[sizes[0]]
  print("with keep_freed_memory_on_cpu() (this process) and, where shown, without it (a second "
        "process):")
  benchmarking.print_table(rows, columns)
  slopes = loglog_slopes(rows)
  print(f"time per token at V={sizes[-1]} / at V={sizes[0]}, and the log-log slope b "
        "(time per token ~ V^b):")
  benchmarking.print_table([{"head/mode": k, "growth": g, "slope": slopes.get(k, float("nan"))}
                            for k, g in growth.items()], ["head/mode", "growth", "slope"])
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_heads", "rows": rows, "growth_first_to_last_V": growth,
      "loglog_slopes": slopes,
      "notes": "full softmax timed on min(N, full_max_logits / V) tokens, reported per token",
      "flags": {k: flags.FLAGS[k].value for k in (
          "vocab_sizes", "hidden", "tokens", "heads", "modes", "num_samples", "class_binnings",
          "full_max_logits", "repeats", "keep_freed_memory", "no_call_column")},
      "keep_freed_memory_applied": applied})
  print(f"glibc malloc keeps freed memory (keep_freed_memory_on_cpu, this script's call): "
        f"{applied}")
  plot(rows, _PLOT_OUT.value)
  print(f"wrote {_JSON_OUT.value} and {_PLOT_OUT.value}")


if __name__ == "__main__":
  app.run(main)
