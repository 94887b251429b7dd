"""Tests for experiments/export_check.py: while-loop trip counts read from exported modules."""
import importlib.util
import os

import jax
import jax.numpy as jnp

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "export_check.py")
_spec = importlib.util.spec_from_file_location("export_check", _PATH)
export_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_check)


def _module(fn, *args, platform="cuda"):
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def test_trip_counts_of_scans_fori_loops_and_dynamic_bounds():
  x = jnp.ones(3)
  scan7 = lambda x: jax.lax.scan(lambda c, _: (c * 2, None), x, None, length=7)[0]
  assert export_check.while_trip_counts(_module(scan7, x)) == [7]
  nested = lambda x: jax.lax.scan(lambda c, _: (scan7(c), None), x, None, length=300)[0]
  assert sorted(export_check.while_trip_counts(_module(nested, x, platform="tpu"))) == [7, 300]
  dynamic = lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c + i, x)
  assert export_check.while_trip_counts(_module(dynamic, x, jnp.int32(5))) == [-1]
  assert export_check.while_trip_counts(_module(lambda x: x * 2, x)) == []
