r"""One implementation per backend, chosen when the program is lowered.

Several kernels have a CPU-tuned form (a ``lax.scan`` over work items or token chunks,
each item small enough to stay in cache) and an accelerator form whose loops run a fixed
number of times whatever the number of tokens (vocabulary chunks, tree levels, masked
dense math, one batched gather). On a GPU a ``while`` loop is driven from the host, one
round trip per iteration, and on a TPU serial tiny matmuls leave the matrix unit idle, so
the CPU form would be the slow one there; on a CPU the accelerator form's larger
temporaries leave the caches.

:func:`per_platform` picks with :func:`jax.lax.platform_dependent`: the choice is made at
lowering time, so a program exported (``jax.export``) or cross-compiled for ``cuda`` or
``tpu`` from a CPU host gets the accelerator form, and the compiled program never holds
a conditional. ``implementation`` lets a user (or a test on a CPU) force either form.
"""
import re
from typing import Callable, Sequence

import jax

IMPLEMENTATIONS = ("auto", "cpu", "accelerator")


def check_implementation(implementation: str) -> str:
  """``implementation`` if it is one of :data:`IMPLEMENTATIONS`, else ``ValueError``."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


def per_platform(cpu: Callable, accelerator: Callable, *args, implementation: str = "auto"):
  """``cpu(*args)`` on a CPU and ``accelerator(*args)`` on every other platform, chosen at
  lowering time (``"auto"``), or the one named by ``implementation`` everywhere.

  Both must return the same structure, shapes and dtypes.

  >>> import jax.numpy as jnp
  >>> per_platform(lambda x: x + 1, lambda x: x + 2, jnp.zeros(()), implementation="accelerator")
  Array(2., dtype=float32)
  """
  check_implementation(implementation)
  if implementation == "cpu":
    return cpu(*args)
  if implementation == "accelerator":
    return accelerator(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)


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


def exported_trip_counts(fn: Callable, args: Sequence, platform: str) -> tuple[list[int], int]:
  """``(trip counts, module size in characters)`` of ``jax.jit(fn)`` exported for
  ``platform`` (``"cuda"``, ``"tpu"``, ``"cpu"``) from this host with ``args`` (arrays or
  ``jax.ShapeDtypeStruct``): how many times each ``while`` loop would run there, no device
  needed."""
  text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  return while_trip_counts(text), len(text)
