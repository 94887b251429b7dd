r"""An explicit, process-wide glibc ``malloc`` setting that keeps XLA:CPU off fresh pages.

XLA:CPU takes its buffers from the C library's ``malloc``. With glibc's defaults a block of
more than 32 MiB at most (the dynamic ``M_MMAP_THRESHOLD``) is a fresh ``mmap`` that
``free`` unmaps again, and each of XLA's threads may get its own arena whose free top is
trimmed back to the kernel. A jitted step that creates the same large temporaries on
every call (the gathered rows of a class or hierarchical softmax, a ``[V, H]`` gradient)
then pays a page fault on first touch of each of their 4 KiB pages, every call: on this
project's 2-core VMs up to half the time of an output head at V = 100k.

:func:`keep_freed_memory` tells glibc to serve every block from one heap and to keep what
is freed for reuse, so a step's temporaries are faulted in once. **lm_jax never calls it by
itself**: importing lm_jax and calling its kernels and heads change nothing in the process.
An application chooses it, explicitly, once, early:

* what it changes: ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD = -1``, ``M_ARENA_MAX = 1`` for the
  whole process (every library's allocations, NumPy's too), overriding any ``MALLOC_*``
  environment settings;
* what it costs: the process keeps its peak heap until it exits (a transient 20 GB NumPy
  load stays resident), and all threads share one arena;
* it cannot be undone in-process: :func:`restore_glibc_defaults` puts the three values back,
  but threads that allocated meanwhile stay on the one arena (glibc fixes arena assignment);
* when: before the first JAX work. A thread that already has its own arena keeps it, and a
  block of more than 64 MiB there is still a fresh ``mmap`` (:func:`arena_count` tells).

The same setting without code, before the process starts:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 MALLOC_ARENA_MAX=1 python3 ...``.
lm_jax's experiment scripts call :func:`keep_freed_memory_on_cpu` unless given
``--nokeep_freed_memory``. Elsewhere than glibc (macOS, musl) nothing changes.
"""
import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os

import jax

_logger = logging.getLogger("lm_jax")
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


def keep_freed_memory_on_cpu() -> bool:
  """What an application calls first thing: :func:`keep_freed_memory` when the default JAX
  backend is (or will be) the CPU, known without starting a backend (``JAX_PLATFORMS``
  names ``cpu`` first, or backends already run on the CPU, or no accelerator plugin is
  installed); on a GPU or TPU the step's buffers live in device memory, which XLA pools
  itself, so nothing changes. Logs what it did on the ``lm_jax`` logger.

  Returns:
    True if the setting was applied.
  """
  if not _cpu_is_known_default():
    _logger.info("lm_jax: default backend not known to be the CPU; malloc left as it is")
    return False
  applied = keep_freed_memory()
  note = ""
  if applied and (_arenas_when_applied or 1) > 1:
    note = (f"; {_arenas_when_applied} malloc arenas existed by then (threads had allocated "
            "before), blocks over 64 MiB in the extra ones stay fresh mmaps: set "
            "MALLOC_ARENA_MAX=1 before starting Python to cover them")
  _logger.info("lm_jax: glibc malloc keeps freed memory for reuse (XLA:CPU): %s%s (the "
               "application's choice; see lm_jax.ops.allocator)", applied, note)
  return applied
