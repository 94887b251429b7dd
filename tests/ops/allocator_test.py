"""Tests for lm_jax.ops.allocator."""
import platform

import pytest

from lm_jax.ops import allocator

_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_THREAD_ARENA_SCRIPT = """
import threading
from lm_jax.ops import allocator
before = allocator.arena_count()
thread = threading.Thread(target=lambda: bytearray(1 << 20))  # a new thread's first malloc
thread.start(); thread.join()
print(before, allocator.arena_count())
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc_info exists in glibc only")
def test_arena_count_sees_a_new_threads_arena_under_glibc_defaults():
  import os
  import subprocess
  import sys
  env = dict(os.environ, **{allocator.ENV_VAR: "0"})
  out = subprocess.run([sys.executable, "-c", _THREAD_ARENA_SCRIPT], capture_output=True,
                       text=True, env=env, timeout=120, check=True).stdout.split()
  assert out == ["1", "2"], out


def test_extra_arenas_at_apply_time_are_reported(monkeypatch, caplog):
  monkeypatch.setattr(allocator, "_cpu_default", None)
  monkeypatch.setattr(allocator, "_applied_at_import", True)
  monkeypatch.setattr(allocator, "_arenas_when_applied", 3)
  monkeypatch.setattr(allocator.jax, "default_backend", lambda: "cpu")
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  with caplog.at_level("INFO", logger="lm_jax"):
    assert allocator.apply_cpu_default() is True
  assert "3 malloc arenas existed" in caplog.text and "MALLOC_ARENA_MAX=1" in caplog.text


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="arenas"):
    allocator.keep_freed_memory(arenas=0)


def test_returns_false_without_glibc(monkeypatch):
  monkeypatch.setattr(allocator, "_glibc", lambda: None)
  assert allocator.keep_freed_memory() is False


# What a user gets: a fresh process that imports lm_jax, builds its arrays, calls a head.
_USER_SCRIPT = """
import logging, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import jax, jax.numpy as jnp
from lm_jax import heads
from lm_jax.ops import allocator
import lm_jax
print("after import:", allocator._applied_at_import, allocator._cpu_default)
print("malloc arenas at import:", allocator.arena_count())
vocab_size, hidden = 100_000, 256  # a [V, H] gradient of 100 MB: > 64 MiB, one mmap each call
counts = [vocab_size - i for i in range(vocab_size)]
head = heads.make_head("sampled", vocab_size=vocab_size, counts=counts, num_samples=8)
params = head.init(jax.random.PRNGKey(0), hidden)  # backend and XLA threads start here
hidden_NxH, targets_N = jnp.ones((16, hidden)), jnp.arange(16)
grad = jax.jit(jax.grad(lambda p: head.loss(p, hidden_NxH, targets_N).sum()))
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(params))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("after a head call:", allocator._cpu_default, jax.default_backend())
print("malloc arenas after the calls:", allocator.arena_count())
print("page faults per call:", faults)
print("page faults per call after the first two:", min(faults[2:]))
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


def _faults(out):
  return int(out.split("page faults per call after the first two:")[1].split()[0])


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist in glibc only")
def test_importing_lm_jax_on_cpu_keeps_a_heads_large_gradient_off_fresh_pages():
  out = _run_user_script()
  assert "after import: True None" in out  # applied on import, decided at the first call
  assert "after a head call: True cpu" in out
  assert out.count("glibc malloc keeps freed memory for reuse since import") == 1, out
  # 100 MB in 4 KiB pages is 25,000 faults when the gradient is a fresh mmap every call.
  assert _faults(out) < 2500, out


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist in glibc only")
def test_environment_variable_opts_out():
  out = _run_user_script(**{allocator.ENV_VAR: "0"})
  assert "after import: False None" in out
  assert "after a head call: False cpu" in out
  assert "keeps freed memory" not in out
  assert _faults(out) > 20_000, out  # the behaviour the default avoids, shown to exist


# Each scenario runs in a fresh process (the settings are process-wide) and prints the minor
# page faults of five 80 MB blocks, each written whole and freed, after a first such block.
# With glibc's defaults each block is a fresh mmap: 5 x 19,531 pages, ~97,700 faults. With
# keep_freed_memory's settings the freed block stays in the heap and is reused: ~0.
_FAULTS_SCRIPT = """
import ctypes, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever THP is set to
import resource
import numpy as np
from lm_jax.ops import allocator

def faults(label):
  def blocks(repeats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
      block = np.ones(10_000_000)
      del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  blocks(1)
  print(label, blocks(5))

"""
_MANY, _FEW = "many", "few"
_SCENARIOS = {
    # LM_JAX_KEEP_FREED_MEMORY=0 (import changes nothing), then the functions called directly.
    "direct": ("0", """
faults("glibc-defaults")
assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
faults("kept")
assert allocator.restore_glibc_defaults()
faults("restored")
""", {"glibc-defaults": _MANY, "kept": _FEW, "restored": _MANY}),
    # import lm_jax on the CPU applies it; disable_cpu_default puts glibc's defaults back.
    "import-then-disable": (None, """
assert allocator._applied_at_import
faults("imported")
allocator.disable_cpu_default()
assert allocator.apply_cpu_default() is False
faults("disabled")
""", {"imported": _FEW, "disabled": _MANY}),
    # A backend other than the CPU at the first head call undoes the import-time setting.
    "other-backend": (None, """
allocator.jax.default_backend = lambda: "gpu"
assert allocator.apply_cpu_default() is False
faults("undone")
""", {"undone": _MANY}),
    # Opted out at import, opted in by the first head call: applied late, once.
    "late": ("0", """
import os
os.environ[allocator.ENV_VAR] = "1"
assert not allocator._applied_at_import
assert allocator.apply_cpu_default() is True and allocator.apply_cpu_default() is True
faults("late")
""", {"late": _FEW}),
}


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist in glibc only")
@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_settings_change_the_page_faults_of_a_repeated_large_block(scenario):
  import os
  import subprocess
  import sys
  opt_out, code, expected = _SCENARIOS[scenario]
  environment = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
  environment.update(JAX_PLATFORMS="cpu", NUMPY_MADVISE_HUGEPAGE="0")
  if opt_out is not None:
    environment[allocator.ENV_VAR] = opt_out
  done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT + code], capture_output=True,
                        text=True, env=environment, timeout=60)
  assert done.returncode == 0, done.stderr
  faults = {label: int(count) for label, count in (line.split() for line in
                                                   done.stdout.splitlines())}
  assert sorted(faults) == sorted(expected), done.stdout
  for label, kind in expected.items():  # ~0 against ~97,700: margins of 20x either way
    assert (faults[label] < 5_000) if kind == _FEW else (faults[label] > 50_000), faults


@pytest.mark.parametrize("platforms, plugins, expected", [
    ("cpu", ["cuda"], True), ("cuda,cpu", [], False), ("", [], True), ("", ["cuda"], False)])
def test_cpu_is_predicted_without_starting_a_backend(monkeypatch, platforms, plugins, expected):
  monkeypatch.setattr(allocator, "_configured_platforms", lambda: platforms)
  monkeypatch.setattr(allocator, "_backends_started", lambda: False)
  monkeypatch.setattr(allocator.importlib.metadata, "entry_points", lambda group: plugins)
  assert allocator._cpu_is_known_default() is expected
