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
process keeps its peak heap size until it exits. It changes process-wide state, so
the library never calls it on import; the experiment scripts do (flag
``--keep_freed_memory``, on by default), and a researcher may call it at the top of their
own script. Elsewhere than glibc (macOS, musl) it does nothing and returns False.
"""
import ctypes
import ctypes.util
import functools

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
