r"""StableHLO size and compile time of ``jit(grad(head.loss))``, tables as arguments or not.

A head's host-built tables (tree paths, class maps, alias tables) are ``[V]``-sized arrays.
Passed as an argument (``head.loss(..., tables=tables)`` inside a function that takes
``tables``), the compiled program's size does not depend on ``V``; closed over (the
default ``tables=None`` inside ``jit``), they are embedded as constants. For each head and
``V`` this lowers and compiles ``jit(grad(mean loss))`` w.r.t. the params at ``N`` tokens
of width ``H`` (abstract shapes: nothing is run), both ways, and reports the StableHLO text
size and the lower + compile seconds (median of ``--repeats``, each on a fresh ``jit`` so
no cache is hit). The closed-over variant is skipped above ``--closed_over_max_vocab``.

  python experiments/bench_compile.py                     # V = 10k, 100k, 1M
  python experiments/bench_compile.py --vocab_sizes=10000 --heads=hsm --repeats=1
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarking

from lm_jax import heads

_VOCAB_SIZES = flags.DEFINE_list("vocab_sizes", ["10000", "100000", "1000000"], "V values")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "H")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "N")
_HEADS = flags.DEFINE_list("heads", ["hsm", "class", "nce", "neg", "sampled"], "heads")
_CLOSED_OVER_MAX_VOCAB = flags.DEFINE_integer(
    "closed_over_max_vocab", 100_000, "largest V at which the closed-over tables are lowered "
    "too (at 1M they are hundreds of MB of StableHLO)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "lower + compile repeats (median reported)")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_compile.json", "output JSON")


def zipf_counts(vocab_size: int) -> np.ndarray:
  return np.maximum(1, np.round(1e9 / np.arange(1, vocab_size + 1))).astype(np.int64)


def measure(head, tables_as_argument: bool, hidden: int, tokens: int, repeats: int) -> dict:
  """``{hlo_bytes, compile_s}`` of ``jit(grad(mean head.loss))`` on abstract inputs."""
  params = jax.eval_shape(lambda k: head.init(k, hidden), jax.random.PRNGKey(0))
  hidden_NxH = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
  targets_N = jax.ShapeDtypeStruct((tokens,), jnp.int32)
  tables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), head.tables)
  seconds, size = [], 0
  for _ in range(repeats):
    if tables_as_argument:
      fn = jax.jit(jax.grad(lambda p, t, h, y: jnp.mean(head.loss(p, h, y, tables=t))))
      args = (params, tables, hidden_NxH, targets_N)
    else:
      fn = jax.jit(jax.grad(lambda p, h, y: jnp.mean(head.loss(p, h, y))))
      args = (params, hidden_NxH, targets_N)
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered.compile()
    seconds.append(time.perf_counter() - start)
    size = len(lowered.as_text())
  return {"hlo_bytes": size, "compile_s": statistics.median(seconds)}


def main(argv):
  del argv
  rows = []
  for vocab_size in (int(v) for v in _VOCAB_SIZES.value):
    counts = zipf_counts(vocab_size)
    for name in _HEADS.value:
      head = heads.make_head(name, vocab_size=vocab_size, counts=counts)
      for as_argument in (True, False):
        if not as_argument and vocab_size > _CLOSED_OVER_MAX_VOCAB.value:
          continue
        row = {"head": name, "V": vocab_size,
               "tables": "argument" if as_argument else "closed over",
               **measure(head, as_argument, _HIDDEN.value, _TOKENS.value, _REPEATS.value)}
        row["hlo_MB"] = row["hlo_bytes"] / 1e6
        rows.append(row)
        print(row, flush=True)
  smallest = min(r["V"] for r in rows)
  for row in rows:
    base = next(r for r in rows if (r["head"], r["tables"], r["V"]) == (row["head"], "argument",
                                                                       smallest))
    row["compile_vs_smallest_V"] = row["compile_s"] / base["compile_s"]
  benchmarking.print_table(rows, ["head", "V", "tables", "hlo_MB", "compile_s",
                                  "compile_vs_smallest_V"])
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_compile", "rows": rows,
      "flags": {k: flags.FLAGS[k].value for k in (
          "vocab_sizes", "hidden", "tokens", "heads", "closed_over_max_vocab", "repeats")},
      "machine": benchmarking.machine_facts()})
  print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
