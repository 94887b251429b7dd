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
  python3 experiments/export_check.py --implementation=cpu   # the CPU forms, for comparison

Prints a table (head, function, platform, while loops, largest trip count, module size) and
writes JSON; a trip count of -1 means the bound is not a constant of the module.
"""
import json
import os
import time

from absl import app
from absl import flags
import jax

from lm_jax import heads
from lm_jax.ops import platform as lm_platform
from lm_jax.train import portability

_VOCAB = flags.DEFINE_integer("vocab_size", 100_000, "V")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "N")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "H")
_HEADS = flags.DEFINE_list("heads", list(heads.HEAD_NAMES), "heads to export")
_PLATFORMS = flags.DEFINE_list("platforms", ["cuda", "tpu"], "platforms to export for")
_TRAIN_HEADS = flags.DEFINE_list("train_heads", ["full", "class"],
                                  "heads of the exported train steps")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", "auto", ["auto", "cpu", "accelerator"],
                                    "the heads' implementation (auto: per platform)")
_LIMIT = flags.DEFINE_integer("limit", 128, "trip counts above this are flagged")
_JSON_OUT = flags.DEFINE_string("json_out", "results/export_check.json", "output JSON")


def main(argv):
  del argv
  options = {name: {"implementation": _IMPLEMENTATION.value}
             for name, takes in heads.HEAD_OPTIONS.items() if "implementation" in takes}
  jobs = portability.export_jobs(vocab_size=_VOCAB.value, tokens=_TOKENS.value,
                                 hidden=_HIDDEN.value, head_names=_HEADS.value,
                                 train_heads=_TRAIN_HEADS.value, **options)
  rows = []
  print(f"{'head':10s} {'function':12s} {'platform':8s} {'whiles':>6s} {'max trips':>9s} "
        f"{'KB':>6s} {'s':>5s}")
  for name, function, fn, args in jobs:
    for platform in _PLATFORMS.value:
      start = time.perf_counter()
      try:
        trips, size = lm_platform.exported_trip_counts(fn, args, platform)
      except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
        rows.append({"head": name, "function": function, "platform": platform,
                     "error": f"{type(e).__name__}: {e}"[:300]})
        print(f"{name:10s} {function:12s} {platform:8s} error: {rows[-1]['error'][:80]}")
        continue
      worst = max(trips, default=0)
      rows.append({"head": name, "function": function, "platform": platform,
                   "while_loops": len(trips), "trip_counts": trips, "max_trip_count": worst,
                   "over_limit": worst > _LIMIT.value or -1 in trips,
                   "module_kb": size / 1e3, "seconds": time.perf_counter() - start})
      flag = "  <-- over" if rows[-1]["over_limit"] else ""
      print(f"{name:10s} {function:12s} {platform:8s} {len(trips):6d} {worst:9d} "
            f"{size / 1e3:6.0f} {rows[-1]['seconds']:5.1f}{flag}")
  os.makedirs(os.path.dirname(_JSON_OUT.value) or ".", exist_ok=True)
  with open(_JSON_OUT.value, "w") as f:
    json.dump({"vocab_size": _VOCAB.value, "tokens": _TOKENS.value, "hidden": _HIDDEN.value,
               "implementation": _IMPLEMENTATION.value, "limit": _LIMIT.value,
               "jax": jax.__version__, "rows": rows}, f, indent=1)
  print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
