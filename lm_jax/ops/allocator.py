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

The library applies it itself, so that the documented call is as fast as the reported one.
The setting only helps if it comes before XLA's worker threads first allocate: a thread
that already has its own glibc arena keeps it, and a block of more than 64 MiB in such an
arena is always a fresh ``mmap`` (measured: the dense ``[V, H]`` gradient of a head at V =
100k, 25,000 page faults and ~20 ms a call applied late, none and ~4 ms applied early). So:

* ``import lm_jax`` calls :func:`keep_freed_memory` when the default backend will be the
  CPU and that is known without starting a backend: ``JAX_PLATFORMS`` (or
  ``jax_platforms``) names ``cpu`` first, or backends already run on the CPU, or no
  accelerator plugin is installed (no ``jax_plugins`` entry point or package, no
  ``libtpu``). This is the only thing importing lm_jax changes.
* Otherwise :func:`apply_cpu_default` decides at the first call of an output head or of the
  fused loss, once the backend is known (late, so it helps less); it also undoes an
  import-time setting if the backend turns out not to be the CPU (on a GPU or TPU the step's
  buffers live in device memory, which XLA pools itself).

What was done is logged once, on the ``lm_jax`` logger, at that first call. Opt out with the
environment variable ``LM_JAX_KEEP_FREED_MEMORY=0`` (before importing lm_jax), or call
:func:`disable_cpu_default` (glibc's defaults come back).
"""
import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os

import jax

ENV_VAR = "LM_JAX_KEEP_FREED_MEMORY"
_logger = logging.getLogger("lm_jax")
_cpu_default = None  # None: not decided yet; then True/False, what apply_cpu_default did.
_applied_at_import = False  # whether apply_at_import called keep_freed_memory.
_arenas_when_applied = None  # malloc arenas that existed when keep_freed_memory first ran.

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
  global _arenas_when_applied
  if _arenas_when_applied is None:
    _arenas_when_applied = arena_count()
  return _mallopt(((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, arenas)))


def restore_glibc_defaults() -> bool:
  """Puts back glibc's documented defaults for the three settings of :func:`keep_freed_memory`
  (``M_MMAP_MAX`` 65536, ``M_TRIM_THRESHOLD`` 128 KiB, ``M_ARENA_MAX`` 0: by core count). The
  mmap and trim thresholds then stay fixed instead of adapting. Returns False off glibc."""
  return _mallopt(((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_ARENA_MAX, 0)))


def _mallopt(settings) -> bool:
  """``mallopt(param, value)`` for each pair; True if glibc accepted all, False off glibc."""
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def arena_count():
  """How many glibc malloc arenas the process has (from ``malloc_info``); None off glibc.

  More than one when :func:`keep_freed_memory` runs means that threads allocated before it:
  they keep their arenas, glibc hands those to new threads too, and a block of more than 64
  MiB in such an arena is still a fresh ``mmap``. ``MALLOC_ARENA_MAX=1`` in the environment
  before Python starts covers that case as well.
  """
  libc = _glibc()
  if libc is None:
    return None
  # malloc_info writes XML to a FILE*; an in-memory stream keeps import free of file I/O.
  libc.open_memstream.restype = ctypes.c_void_p
  libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_size_t)]
  libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.fclose.argtypes = [ctypes.c_void_p]
  libc.free.argtypes = [ctypes.c_void_p]
  buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
  stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
  if not stream:
    return None
  libc.malloc_info(0, stream)
  libc.fclose(stream)  # flushes: buffer and size are now set
  try:
    return ctypes.string_at(buffer, size.value).decode("ascii", "replace").count("<heap nr=")
  finally:
    libc.free(buffer)


def _opted_out() -> bool:
  return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def _configured_platforms() -> str:
  return jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")


def _cpu_is_known_default() -> bool:
  """True when the default backend will be the CPU, decided without starting a backend."""
  platforms = _configured_platforms()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if _backends_started():
    return jax.default_backend() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def _backends_started() -> bool:
  try:  # No public equivalent; if it moves, fall back on the plugin check (starts nothing).
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def apply_at_import() -> None:
  """Called by ``import lm_jax``: :func:`keep_freed_memory` now if the CPU is known to be the
  default backend (see the module docstring); otherwise nothing until
  :func:`apply_cpu_default`. Logs nothing (logging is rarely set up at import time)."""
  global _applied_at_import
  if _cpu_default is None and not _opted_out() and _cpu_is_known_default():
    _applied_at_import = keep_freed_memory()


def apply_cpu_default() -> bool:
  """Once per process: decides the allocator setting now that the backend is known.

  Keeps an import-time :func:`keep_freed_memory` (or applies it now, late) when the default
  backend is the CPU; undoes an import-time one on any other backend. Skipped (returns
  False) when ``LM_JAX_KEEP_FREED_MEMORY`` is ``0``/``false``/``no``, after
  :func:`disable_cpu_default`, or off glibc. Later calls return the first decision without
  doing anything.
  """
  global _cpu_default
  if _cpu_default is not None:
    return _cpu_default
  if _opted_out():
    _cpu_default = False
    _logger.info("lm_jax: %s=0, glibc malloc settings left as they are", ENV_VAR)
  elif jax.default_backend() != "cpu":
    if _applied_at_import:
      restore_glibc_defaults()
      _logger.info("lm_jax: backend %s, glibc malloc settings of import time undone",
                   jax.default_backend())
    _cpu_default = False
  else:
    when = ("since import" if _applied_at_import else
            "from now on (late: threads that already allocated keep their own arenas; "
            "import lm_jax before the first JAX work)")
    _cpu_default = _applied_at_import or keep_freed_memory()
    if _cpu_default and (_arenas_when_applied or 1) > 1:
      when += (f"; {_arenas_when_applied} malloc arenas existed by then (threads had allocated "
               "before), blocks over 64 MiB in the extra ones stay fresh mmaps: set "
               "MALLOC_ARENA_MAX=1 before starting Python to cover them")
    _logger.info("lm_jax: XLA:CPU backend, glibc malloc keeps freed memory for reuse %s "
                 "(applied: %s; opt out with %s=0)", when, _cpu_default, ENV_VAR)
  return _cpu_default


def disable_cpu_default() -> None:
  """Opts this process out of :func:`apply_cpu_default` and puts back glibc's defaults if
  ``import lm_jax`` had applied :func:`keep_freed_memory`."""
  global _cpu_default, _applied_at_import
  if _applied_at_import:
    restore_glibc_defaults()
    _applied_at_import = False
  _cpu_default = False
