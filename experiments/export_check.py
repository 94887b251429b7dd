r"""Which heads are fit for accelerators: export each head's functions for GPU and TPU from
this CPU host (``jax.export``) and count the while loops in the modules and their trip counts.

On GPU a while loop is driven from the host, one round trip per iteration, and on TPU serial
tiny matmuls leave the matrix unit idle, so a loop whose trip count grows with the number of
tokens or work items is what issue 23 removes; loops over a fixed number of vocabulary
chunks or tree levels are fine. No device is needed: ``jax.export`` lowers for
``platforms=["cuda"]`` and ``["tpu"]`` here, choosing each ``lax.platform_dependent`` branch
as those platforms would.

  python3 experiments/export_check.py                       # V = 100k, N = 16384, H = 64
  python3 experiments/export_check.py --heads=class,hsm --tokens=2048

Prints a table (head, function, platform, while loops, largest trip count, module size) and
writes JSON; a trip count of -1 means the bound is not a constant of the module.
"""
import json
import os
import re
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import heads
from lm_jax.ops import fused

_VOCAB = flags.DEFINE_integer("vocab_size", 100_000, "V")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "N")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "H")
_HEADS = flags.DEFINE_list("heads", list(heads.HEAD_NAMES), "heads to export")
_PLATFORMS = flags.DEFINE_list("platforms", ["cuda", "tpu"], "platforms to export for")
_LIMIT = flags.DEFINE_integer("limit", 128, "trip counts above this are flagged")
_JSON_OUT = flags.DEFINE_string("json_out", "results/export_check.json", "output JSON")

_CONSTANT = re.compile(r"(%c\w*) = stablehlo\.constant dense<(-?\d+)> : tensor<i(?:32|64)>")
_BOUND = re.compile(r"stablehlo\.while\(.*?\n\s*cond \{\n\s*%\S+ = stablehlo\.compare\s+"
                    r"(?:LT|NE), %\w+, (%\w+)", re.S)


def while_trip_counts(module_text: str) -> list[int]:
  """The trip count of every ``stablehlo.while`` in a module whose condition compares its
  counter against an integer constant of the same function (``lax.scan``, ``fori_loop``
  with static bounds); -1 where the bound is not such a constant."""
  counts = []
  for function in module_text.split("func.func")[1:]:
    constants = dict(_CONSTANT.findall(function))
    for loop in function.split("stablehlo.while(")[1:]:
      bound = _BOUND.match("stablehlo.while(" + loop)
      value = constants.get(bound.group(1)) if bound else None
      counts.append(int(value) if value is not None else -1)
  return counts


def _functions(head, params, tables, hidden, targets):
  key = jax.random.key(0)
  return {
      "loss+grad": (jax.value_and_grad(
          lambda p, t, h, y: head.loss(p, h, y, key=key, tables=t).mean()),
                    (params, tables, hidden, targets)),
      "log_prob": (lambda p, t, h, y: head.log_prob(p, h, y, tables=t),
                   (params, tables, hidden, targets)),
      "log_probs": (lambda p, t, h: head.log_probs(p, h, tables=t), (params, tables, hidden)),
      "sample": (lambda p, t, h: head.sample(p, h, key, tables=t), (params, tables, hidden))}


def main(argv):
  del argv
  v, n, h = _VOCAB.value, _TOKENS.value, _HIDDEN.value
  counts = (1e6 / np.arange(1, v + 1) ** 1.1).astype(np.int64) + 1  # Zipfian training counts
  hidden = jax.ShapeDtypeStruct((n, h), jnp.float32)
  targets = jax.ShapeDtypeStruct((n,), jnp.int32)
  jobs = []
  for name in _HEADS.value:
    head = heads.make_head(name, vocab_size=v, counts=counts)
    params = jax.eval_shape(lambda k, head=head: head.init(k, h), jax.random.key(0))
    for function, (fn, args) in _functions(head, params, head.tables, hidden, targets).items():
      if function in ("log_probs", "sample") and n * v > 2**31:
        args = (args[0], args[1], jax.ShapeDtypeStruct((1024, h), jnp.float32))  # [N, V] fits
      jobs.append((name, function, fn, args))
  weight = jax.ShapeDtypeStruct((v, h), jnp.float32)
  for reduction in ("none", "mean"):
    jobs.append(("fused", f"{reduction}+grad", jax.value_and_grad(
        lambda hh, w, y, r=reduction: jnp.mean(fused.linear_softmax_cross_entropy(
            hh, w, y, reduction=r)), argnums=(0, 1)), (hidden, weight, targets)))
  rows = []
  print(f"{'head':10s} {'function':12s} {'platform':8s} {'whiles':>6s} {'max trips':>9s} "
        f"{'KB':>6s} {'s':>5s}")
  for name, function, fn, args in jobs:
    for platform in _PLATFORMS.value:
      start = time.perf_counter()
      try:
        text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
      except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
        rows.append({"head": name, "function": function, "platform": platform,
                     "error": f"{type(e).__name__}: {e}"[:300]})
        print(f"{name:10s} {function:12s} {platform:8s} error: {rows[-1]['error'][:80]}")
        continue
      trips = while_trip_counts(text)
      worst = max(trips, default=0)
      rows.append({"head": name, "function": function, "platform": platform,
                   "while_loops": len(trips), "trip_counts": trips, "max_trip_count": worst,
                   "over_limit": worst > _LIMIT.value or -1 in trips,
                   "module_kb": len(text) / 1e3, "seconds": time.perf_counter() - start})
      flag = "  <-- over" if rows[-1]["over_limit"] else ""
      print(f"{name:10s} {function:12s} {platform:8s} {len(trips):6d} {worst:9d} "
            f"{len(text) / 1e3:6.0f} {rows[-1]['seconds']:5.1f}{flag}")
  os.makedirs(os.path.dirname(_JSON_OUT.value) or ".", exist_ok=True)
  with open(_JSON_OUT.value, "w") as f:
    json.dump({"vocab_size": v, "tokens": n, "hidden": h, "limit": _LIMIT.value,
               "jax": jax.__version__, "rows": rows}, f, indent=1)
  print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
