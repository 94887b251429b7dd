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
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _THREAD_ARENA_SCRIPT], capture_output=True,
                       text=True, timeout=120, check=True).stdout.split()
  assert out == ["1", "2"], out


def test_extra_arenas_at_apply_time_are_reported(monkeypatch, caplog):
  monkeypatch.setattr(allocator, "_mallopt", lambda settings: True)  # leave this process be
  monkeypatch.setattr(allocator, "_cpu_is_known_default", lambda: True)
  monkeypatch.setattr(allocator, "_arenas_when_applied", 3)
  with caplog.at_level("INFO", logger="lm_jax"):
    assert allocator.keep_freed_memory_on_cpu() is True
  assert "3 malloc arenas existed" in caplog.text and "MALLOC_ARENA_MAX=1" in caplog.text


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="arenas"):
    allocator.keep_freed_memory(arenas=0)


def test_returns_false_without_glibc(monkeypatch):
  monkeypatch.setattr(allocator, "_glibc", lambda: None)
  assert allocator.keep_freed_memory() is False


# Each scenario runs in a fresh process (the settings are process-wide) and prints the minor
# page faults of five 100 MB blocks, each written whole and freed, after a first such block.
# With glibc's defaults each block is a fresh mmap: 5 x 24,414 pages, ~122,000 faults. With
# keep_freed_memory's settings the freed block stays in the heap and is reused: ~0.
_FAULTS_SCRIPT = """
import ctypes, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever THP is set to
import resource
import numpy as np

def faults(label):
  def blocks(repeats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
      block = np.ones(12_500_000)
      del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  blocks(1)
  print(label, blocks(5))

"""
_MANY, _FEW = "many", "few"
_SCENARIOS = {
    # The library changes nothing: import, a head's gradient, the fused loss; then the
    # application's explicit call, and glibc's defaults put back.
    "library-then-explicit": ("""
faults("before-import")
import jax, jax.numpy as jnp
import lm_jax
from lm_jax import heads
from lm_jax.ops import allocator
faults("after-import")
head = heads.make_head("class", vocab_size=1000, counts=list(range(1000, 0, -1)))
params = head.init(jax.random.PRNGKey(0), 16)
jax.block_until_ready(jax.jit(jax.grad(
    lambda p: head.loss(p, jnp.ones((8, 16)), jnp.arange(8)).sum()))(params))
jax.block_until_ready(lm_jax.linear_softmax_cross_entropy(
    jnp.ones((8, 16)), jnp.ones((1000, 16)), jnp.arange(8)))
faults("after-head-calls")
assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
faults("kept")
assert allocator.restore_glibc_defaults()
faults("restored")
""", {"before-import": _MANY, "after-import": _MANY, "after-head-calls": _MANY,
      "kept": _FEW, "restored": _MANY}),
    # The application's call on the CPU applies it.
    "on-cpu": ("""
from lm_jax.ops import allocator
assert allocator.keep_freed_memory_on_cpu() is True
faults("applied")
""", {"applied": _FEW}),
    # Where the default backend is not known to be the CPU, the call changes nothing.
    "not-cpu": ("""
from lm_jax.ops import allocator
allocator._cpu_is_known_default = lambda: False
assert allocator.keep_freed_memory_on_cpu() is False
faults("untouched")
""", {"untouched": _MANY}),
}


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist in glibc only")
@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_settings_change_the_page_faults_of_a_repeated_large_block(scenario):
  import os
  import subprocess
  import sys
  code, expected = _SCENARIOS[scenario]
  environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  environment.update(JAX_PLATFORMS="cpu", NUMPY_MADVISE_HUGEPAGE="0")
  done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT + code], capture_output=True,
                        text=True, env=environment, timeout=120)
  assert done.returncode == 0, done.stderr
  faults = {label: int(count) for label, count in (line.split() for line in
                                                   done.stdout.splitlines())}
  assert sorted(faults) == sorted(expected), done.stdout
  for label, kind in expected.items():  # ~0 against ~122,000: margins of 20x either way
    assert (faults[label] < 5_000) if kind == _FEW else (faults[label] > 60_000), faults


# What the application's call buys: a head's [V, H] gradient (100 MB, > 64 MiB) in a fresh
# process that calls keep_freed_memory_on_cpu() first is faulted in once, not every call.
_HEAD_SCRIPT = """
import resource, sys
from lm_jax.ops import allocator
if sys.argv[1] == "call":
  assert allocator.keep_freed_memory_on_cpu()
import jax, jax.numpy as jnp
from lm_jax import heads
vocab_size, hidden = 100_000, 256
counts = [vocab_size - i for i in range(vocab_size)]
head = heads.make_head("sampled", vocab_size=vocab_size, counts=counts, num_samples=8)
params = head.init(jax.random.PRNGKey(0), hidden)
hidden_NxH, targets_N = jnp.ones((16, hidden)), jnp.arange(16)
grad = jax.jit(jax.grad(lambda p: head.loss(p, hidden_NxH, targets_N).sum()))
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(params))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]), faults, allocator.arena_count())
"""


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist in glibc only")
@pytest.mark.parametrize("call", ["call", "no-call"])
def test_the_explicit_call_keeps_a_heads_large_gradient_off_fresh_pages(call):
  import os
  import subprocess
  import sys
  environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  environment.update(JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _HEAD_SCRIPT, call], capture_output=True,
                       text=True, env=environment, timeout=300, check=True).stdout
  least = int(out.split()[0])
  # 100 MB in 4 KiB pages is 25,000 faults when the gradient is a fresh mmap every call.
  assert (least < 2500) if call == "call" else (least > 20_000), out


@pytest.mark.parametrize("platforms, plugins, expected", [
    ("cpu", ["cuda"], True), ("cuda,cpu", [], False), ("", [], True), ("", ["cuda"], False)])
def test_cpu_is_predicted_without_starting_a_backend(monkeypatch, platforms, plugins, expected):
  monkeypatch.setattr(allocator, "_configured_platforms", lambda: platforms)
  monkeypatch.setattr(allocator, "_backends_started", lambda: False)
  monkeypatch.setattr(allocator.importlib.metadata, "entry_points", lambda group: plugins)
  assert allocator._cpu_is_known_default() is expected
