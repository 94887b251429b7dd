r"""Host-memory allocator settings that keep XLA:CPU from page-faulting on every large buffer.

XLA:CPU takes its buffers from the C library's ``malloc``. With glibc's defaults a block of
more than 32 MiB at most (the dynamic ``M_MMAP_THRESHOLD``) is a fresh ``mmap`` that
``free`` unmaps again, and each of XLA's threads may get its own arena whose free top is
trimmed back to the kernel. A jitted step that creates the same large temporaries on
every call (the gathered rows of a class or hierarchical softmax, a ``[N, V]`` logits
block) then pays a page fault on first touch of each of their 4 KiB pages, every call:
on this project's 2-core VM that was about half the time of the class head at V = 100k.

:func:`keep_freed_memory` tells glibc to serve every block from one heap and to keep what is
freed for reuse, so a step's temporaries are faulted in once. The cost is that the
process keeps its peak heap size until it exits. Elsewhere than glibc (macOS, musl) it
does nothing and returns False.

The library applies it itself, so that the documented call is as fast as the reported one:
:func:`apply_cpu_default` runs once per process, the first time an output head's function
is called or traced, and calls :func:`keep_freed_memory` only when JAX's default backend is
the CPU (on a GPU or TPU the step's buffers live in device memory, which XLA pools
itself). It logs what it did once, on the ``lm_jax`` logger. Opt out with the environment
variable ``LM_JAX_KEEP_FREED_MEMORY=0``, or by calling :func:`disable_cpu_default` before
the first head call. Never on import: importing ``lm_jax`` changes nothing.
"""
import ctypes
import ctypes.util
import functools
import logging
import os

import jax

ENV_VAR = "LM_JAX_KEEP_FREED_MEMORY"
_logger = logging.getLogger("lm_jax")
_cpu_default = None  # None: not decided yet; then True/False, what apply_cpu_default did.

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=None)
def _glibc():
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory(*, arenas: int = 1) -> bool:
  r"""Makes glibc ``malloc`` reuse freed blocks instead of returning them to the kernel.

  Sets ``M_MMAP_MAX`` to 0 (every block comes from the heap, none from its own
  ``mmap``), ``M_TRIM_THRESHOLD`` to -1 (the heap's free top is never given back) and
  ``M_ARENA_MAX`` (one shared heap, so memory freed by one XLA thread is reused by
  another). Call it before the first large JAX computation; later allocations follow the
  new settings.

  Measured on this project's 2-core VM (``WORKSPACE_NOTES.md``, issue 4): the class-based
  head's forward and backward at V = 100k, N = 4096 ran about twice as fast.

  Args:
    arenas: the most malloc arenas (1: one heap for all threads).

  Returns:
    True if every setting was accepted (glibc), else False (not glibc: nothing changed).
  """
  if arenas < 1:
    raise ValueError(f"need arenas >= 1, got {arenas}")
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1
             for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                                  (_M_ARENA_MAX, arenas)))


def apply_cpu_default() -> bool:
  """Once per process: :func:`keep_freed_memory` if the default backend is the CPU.

  Skipped (returns False) when ``LM_JAX_KEEP_FREED_MEMORY`` is ``0``/``false``/``no``, after
  :func:`disable_cpu_default`, on any other backend, or off glibc. Later calls return the
  first decision without doing anything.
  """
  global _cpu_default
  if _cpu_default is not None:
    return _cpu_default
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    _cpu_default = False
    _logger.info("lm_jax: %s=0, glibc malloc settings left as they are", ENV_VAR)
  elif jax.default_backend() != "cpu":
    _cpu_default = False
  else:
    _cpu_default = keep_freed_memory()
    _logger.info("lm_jax: XLA:CPU backend, glibc malloc now keeps freed memory for reuse "
                 "(applied: %s; opt out with %s=0)", _cpu_default, ENV_VAR)
  return _cpu_default


def disable_cpu_default() -> None:
  """Opts this process out of :func:`apply_cpu_default` (call before the first head call;
  settings already applied stay)."""
  global _cpu_default
  if _cpu_default is None:
    _cpu_default = False
