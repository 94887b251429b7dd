"""Shared pytest configuration: devices and the compilation cache.

* Four fake CPU devices are requested before JAX initialises its backend, so that the
  multi-device cases (``parallel_test.py``, the ``shard_map``/``pmap`` cases of
  ``training_test.py``, ``distributed_test.py``) can run on a machine without accelerators.
  They are the only tests that use more than one: every end-to-end run elsewhere passes
  ``parallel="none"`` (what ``auto`` resolves to on one GPU), and scripts launched in a
  subprocess see one device.
* XLA's persistent compilation cache (``.jax_cache/`` in the checkout, or
  ``$LM_JAX_TEST_CACHE_DIR``) makes a second run of the suite skip most compilation. It is
  set through the environment so that subprocesses (the experiment scripts) share it. It
  changes no result: a cached executable is the one XLA would compile.
* A ``dot_dtypes`` fixture: the operand dtypes of every matmul in a function's jaxpr (the
  mixed-precision tests).
* Nothing else: tests run at XLA's default optimisation level and JAX's default matmul
  precision, as users run them. A test that needs float64 or ``highest`` precision sets it
  itself, locally (``jax.enable_x64``, ``jax.default_matmul_precision``).

Every parameter set of every test runs in CI (``-m "not slow"``); ``slow`` marks only the
multi-process and real-corpus end-to-end runs (``FULL=1 bash .ci/run``).
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("LM_JAX_TEST_CACHE_DIR", os.path.join(_REPO, ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# pytest-xdist workers (``-n 2``) share one accelerator: none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


def _dot_dtypes(fn, *args):
  """The operand dtypes of every ``dot_general`` in ``fn(*args)``'s jaxpr, sub-jaxprs
  (scans, conds, custom_vjp rules) included."""
  import jax.extend  # pylint: disable=import-outside-toplevel
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.fixture
def dot_dtypes():
  """:func:`_dot_dtypes`: ``dot_dtypes(fn, *args)``."""
  return _dot_dtypes
