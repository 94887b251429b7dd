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
