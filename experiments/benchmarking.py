r"""Small timing and memory utilities shared by the ``experiments/bench_*.py`` scripts.

Timings are wall-clock medians of ``block_until_ready`` calls after warm-up, so
compilation and dispatch queues are excluded. Compare several functions with
:func:`time_interleaved`, which alternates them repeat by repeat, so that a slow
spell on a shared machine hits every contender alike instead of one of them.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
import jax
import jax.ad_checkpoint
import jax.numpy as jnp


def _call_blocking(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds of all threads) of one blocking call."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall-clock seconds of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  return statistics.median(_call_blocking(fn, args)[0] for _ in range(repeats))


def time_interleaved_wall_and_cpu(
    fns: Mapping[str, Callable[..., Any]],
    args: Mapping[str, Sequence[Any]] | Sequence[Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, dict[str, list[float]]]:
  """Like :func:`time_interleaved`, also recording process CPU time: ``{name: {"wall": [...], "cpu": [...]}}``.

  On a machine shared with other jobs, CPU seconds (summed over this process's
  threads) vary less than wall seconds, since waiting for a core is not counted;
  they still include time lost to contention for caches and memory bandwidth.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
  per_name = args if isinstance(args, Mapping) else {name: args for name in fns}
  for _ in range(warmup):
    for name, fn in fns.items():
      jax.block_until_ready(fn(*per_name[name]))
  samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
  for round_index in range(repeats):
    # Alternate the order too, so no function always runs right after the same one.
    names = list(fns) if round_index % 2 == 0 else list(reversed(list(fns)))
    for name in names:
      wall, cpu = _call_blocking(fns[name], per_name[name])
      samples[name]["wall"].append(wall)
      samples[name]["cpu"].append(cpu)
  return samples


def time_interleaved(
    fns: Mapping[str, Callable[..., Any]],
    args: Mapping[str, Sequence[Any]] | Sequence[Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, list[float]]:
  """Times several functions in round-robin order; returns every wall-clock sample, by name.

  Args:
    fns: name -> function (usually jitted).
    args: the positional arguments, either shared by all functions or given per name.
    repeats: rounds of timing; each round calls every function once.
    warmup: untimed rounds first (compilation happens here).

  Returns:
    name -> list of ``repeats`` wall-clock seconds; take ``statistics.median``.
  """
  samples = time_interleaved_wall_and_cpu(fns, args, repeats=repeats, warmup=warmup)
  return {name: s["wall"] for name, s in samples.items()}


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Temporary (scratch) bytes XLA allocates for ``jax.jit(fn)(*args)``, excluding inputs and outputs."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise ValueError(f"the {jax.default_backend()} backend reports no memory analysis")
  return int(analysis.temp_size_in_bytes)


def residual_shapes(fn: Callable[..., Any], *args: Any) -> list[str]:
  """The arrays reverse-mode autodiff of ``fn`` saves for the backward pass, as ``"f32[4096,512] (origin)"``.

  Differentiates w.r.t. the floating-point arguments only (the others are closed
  over), through the public ``jax.ad_checkpoint.print_saved_residuals``.
  """
  float_argnums = [i for i, a in enumerate(args) if jnp.issubdtype(jnp.result_type(a), jnp.floating)]

  def of_floats(*float_args):
    full = list(args)
    for i, a in zip(float_argnums, float_args):
      full[i] = a
    return fn(*full)

  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    jax.ad_checkpoint.print_saved_residuals(of_floats, *(args[i] for i in float_argnums))
  return [_short_residual(line.strip()) for line in text.getvalue().splitlines() if line.strip()]


def _short_residual(line: str) -> str:
  """``"f32[8,5] output of exp from file:1:2 (fn)"`` -> ``"f32[8,5] (exp)"``; arguments and constants likewise."""
  shape, _, origin = line.partition(" ")
  if origin.startswith("from the argument"):
    origin = "argument"
  elif origin.startswith("from a "):
    origin = origin[len("from a "):]
  elif origin.startswith("output of "):
    origin = origin[len("output of "):].split(" from ")[0].replace("jitted function ", "").strip("'")
  return f"{shape} ({origin})"


def _best_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  return min(_call_blocking(fn, args)[0] for _ in range(repeats))


def measure_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """The machine's float32 matmul FLOP/s: a jitted ``[size, size] @ [size, size]``, best of ``repeats``.

  The best rather than the median, since load from other jobs only ever slows a run.
  """
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  return 2.0 * size**3 / _best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)


def measure_memory_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
  """Read bandwidth in bytes/s: a jitted ``jnp.sum`` over ``num_bytes`` of float32, best of ``repeats``.

  A sum reads without writing; an ``x + 1`` would mostly time the page faults of its fresh output.
  """
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  return num_bytes / _best_seconds(jax.jit(jnp.sum), x, repeats=repeats)


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): ratios move
  between machines, so every result file names the one it came from."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
  """Versions, device and date to store next to any measurement."""
  device = jax.devices()[0]
  return {
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "cpu_model": cpu_model(),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """Renders ``rows`` as a fixed-width text table with the given ``columns`` (floats to 4 significant digits).

  >>> print(format_table([{"name": "a", "seconds": 0.123456}], ["name", "seconds"]))
  name  seconds
  ----  -------
  a     0.1235
  """

  def cell(value: Any) -> str:
    if isinstance(value, float):
      return f"{value:.4g}"
    return "" if value is None else str(value)

  cells = [[cell(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
  lines.append("  ".join("-" * w for w in widths))
  lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)
  return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
  """Prints :func:`format_table`."""
  print(format_table(rows, columns), flush=True)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Writes ``payload`` plus ``machine_facts()`` (under ``"machine"``) as indented JSON, creating folders."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"machine": machine_facts(), **payload}, f, indent=2, sort_keys=False)
    f.write("\n")


def define_keep_freed_memory_flag() -> flags.FlagHolder:
  """The scripts' ``--[no]keep_freed_memory`` (default on): whether ``main`` first calls
  :func:`lm_jax.ops.allocator.keep_freed_memory_on_cpu`."""
  return flags.DEFINE_bool(
      "keep_freed_memory", True,
      "call lm_jax.ops.allocator.keep_freed_memory_on_cpu() first (XLA:CPU only: glibc malloc "
      "keeps freed blocks, a process-wide setting); --nokeep_freed_memory: glibc's defaults")
