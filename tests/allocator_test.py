"""Tests for lm_jax.allocator."""
import ctypes.util
import platform

import pytest

from lm_jax import allocator


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="arenas"):
    allocator.keep_freed_memory(arenas=0)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings exist in glibc only")
def test_glibc_accepts_the_settings():
  assert ctypes.util.find_library("c") is not None
  assert allocator.keep_freed_memory() is True
  assert allocator.keep_freed_memory() is True  # idempotent


def test_returns_false_without_glibc(monkeypatch):
  monkeypatch.setattr(allocator, "_glibc", lambda: None)
  assert allocator.keep_freed_memory() is False


# What a user gets: a fresh process that imports lm_jax and calls a head, nothing else.
_USER_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import jax, jax.numpy as jnp
import lm_jax
from lm_jax import allocator, heads
print("after import:", allocator._cpu_default)
head = heads.make_head("hsm", vocab_size=5, counts=[5, 4, 3, 2, 1])
params = head.init(jax.random.PRNGKey(0), 3)
jax.jit(head.loss)(params, jnp.ones((2, 3)), jnp.array([0, 4])).block_until_ready()
head.loss(params, jnp.ones((2, 3)), jnp.array([0, 4]))
print("after a head call:", allocator._cpu_default, jax.default_backend())
"""


def _run_user_script(**env):
  import os
  import subprocess
  import sys
  environment = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
  environment.update(env, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _USER_SCRIPT], capture_output=True, text=True,
                        env=environment, timeout=300, check=True)
  return done.stdout


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings exist in glibc only")
def test_library_applies_the_cpu_setting_once_on_the_first_head_call_not_on_import():
  out = _run_user_script()
  assert "after import: None" in out  # importing lm_jax changes nothing
  assert "after a head call: True cpu" in out
  assert out.count("glibc malloc now keeps freed memory") == 1, out  # said once


def test_environment_variable_opts_out():
  out = _run_user_script(**{allocator.ENV_VAR: "0"})
  assert "after a head call: False cpu" in out
  assert "glibc malloc now keeps freed memory" not in out


def test_disable_before_first_call_and_other_backends_leave_malloc_alone(monkeypatch):
  calls = []
  monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(allocator, "_cpu_default", None)
  monkeypatch.setattr(allocator.jax, "default_backend", lambda: "gpu")
  assert allocator.apply_cpu_default() is False and not calls
  monkeypatch.setattr(allocator, "_cpu_default", None)
  monkeypatch.setattr(allocator.jax, "default_backend", lambda: "cpu")
  allocator.disable_cpu_default()
  assert allocator.apply_cpu_default() is False and not calls
  monkeypatch.setattr(allocator, "_cpu_default", None)
  assert allocator.apply_cpu_default() is True and calls == [1]
  assert allocator.apply_cpu_default() is True and calls == [1]  # once
