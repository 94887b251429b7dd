"""Shared pytest configuration: devices, the compilation cache, matmul precision.

* Four fake CPU devices are requested before JAX initialises its backend, so that the
  multi-device cases (``parallel_test.py``, the ``shard_map``/``pmap`` cases of
  ``training_test.py``, ``distributed_test.py``) can run on a machine without accelerators.
  They are the only tests that use more than one: every end-to-end run elsewhere passes
  ``parallel="none"`` (what ``auto`` resolves to on one GPU), and scripts launched in a
  subprocess see one device.
* XLA's persistent compilation cache (``.jax_cache/`` in the checkout, or
  ``$LM_JAX_TEST_CACHE_DIR``) makes a second run of the suite skip most compilation. It is
  set through the environment so that subprocesses (the experiment scripts) share it.
* ``XLA_FLAGS`` (unless set): the backend's optimisation passes off, as compile time, not
  run time, is what a test of tiny arrays spends.
* ``jax_default_matmul_precision="highest"``: float32 matmuls are float32 on GPU and TPU
  too (there the default is bf16 passes or TF32), so the tolerances hold on every backend.
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests compile hundreds of tiny programs and run each a few times: XLA's backend
# optimisations cost more than they save (measured: two heads tests cold, 36.5 s -> 23.5 s).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("LM_JAX_TEST_CACHE_DIR", os.path.join(_REPO, ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# pytest-xdist workers (``-n 2``) share one accelerator: none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


# --- The fast tier: each test function once. ---
# `-m "not slow"` (CI's default) runs every test function, but a parametrized one with only
# one of its parameter sets: the one at index crc32(function name) mod (number of sets not
# already marked slow), so that across functions every head / axis / mode still comes up.
# The other sets get the `slow` mark and run in the full suite (`-m "slow or not slow"`).
# Deterministic, so pytest-xdist's workers collect the same tests.
import zlib  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  del config
  groups = {}
  for item in items:
    callspec = getattr(item, "callspec", None)
    if callspec is None or item.get_closest_marker("slow") is not None:
      continue
    groups.setdefault((item.path, item.originalname), []).append(item)
  for (_, name), group in groups.items():
    keep = zlib.crc32(name.encode()) % len(group)
    for index, item in enumerate(group):
      if index != keep:
        item.add_marker(pytest.mark.slow)
