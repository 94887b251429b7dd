"""Shared pytest configuration.

Four fake CPU devices are requested before JAX initialises its backend, so that
parallel-equals-serial tests can run on a machine without accelerators.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
