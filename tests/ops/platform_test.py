"""Tests for lm_jax.ops.platform and lm_jax.train.portability: one form per backend, chosen at
lowering time, and no loop on GPU or TPU whose trip count grows with the number of tokens."""
import functools

import jax
import jax.numpy as jnp
import pytest

from lm_jax import heads
from lm_jax.ops import platform
from lm_jax.train import portability

V, N, H = 100_000, 16384, 64  # the sizes; exporting allocates nothing
LIMIT = 128


def _module(fn, *args, target="cuda"):
  return jax.export.export(jax.jit(fn), platforms=[target])(*args).mlir_module()


def test_per_platform_picks_the_branch_of_the_platform_it_is_lowered_for():
  fn = lambda x, implementation="auto": platform.per_platform(
      jnp.sin, jnp.cos, x, implementation=implementation)
  x = jnp.float32(0.5)
  assert fn(x) == jnp.sin(x) and jax.jit(fn)(x) == jnp.sin(x)  # this host is a CPU
  assert fn(x, "accelerator") == jnp.cos(x) and fn(x, "cpu") == jnp.sin(x)
  for target in ("cuda", "tpu"):
    text = _module(fn, x, target=target)
    assert "stablehlo.cosine" in text and "stablehlo.sine" not in text, target
  text = _module(fn, x, target="cpu")
  assert "stablehlo.sine" in text and "stablehlo.cosine" not in text
  # Forced, the other form is what every platform gets.
  assert "stablehlo.sine" in _module(functools.partial(fn, implementation="cpu"), x)


def test_gradients_flow_through_either_branch():
  fn = lambda x, implementation: jnp.sum(platform.per_platform(
      lambda x: x ** 2, lambda x: x ** 3, x, implementation=implementation))
  x = jnp.arange(3.0)
  assert jax.grad(fn)(x, "auto").tolist() == [0.0, 2.0, 4.0]
  assert jax.grad(fn)(x, "accelerator").tolist() == [0.0, 3.0, 12.0]


def test_an_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="implementation must be one of .*'gpu'"):
    platform.per_platform(jnp.sin, jnp.cos, 1.0, implementation="gpu")
  with pytest.raises(ValueError, match="implementation must be one of"):
    heads.make_head("class", vocab_size=4, counts=[1, 2, 3, 4], implementation="tpu")


def test_trip_counts_of_scans_fori_loops_and_dynamic_bounds():
  x = jnp.ones(3)
  scan7 = lambda x: jax.lax.scan(lambda c, _: (c * 2, None), x, None, length=7)[0]
  assert platform.while_trip_counts(_module(scan7, x)) == [7]
  nested = lambda x: jax.lax.scan(lambda c, _: (scan7(c), None), x, None, length=300)[0]
  assert sorted(platform.while_trip_counts(_module(nested, x, target="tpu"))) == [7, 300]
  dynamic = lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c + i, x)
  assert platform.while_trip_counts(_module(dynamic, x, jnp.int32(5))) == [-1]
  assert platform.while_trip_counts(_module(lambda x: x * 2, x)) == []
  assert platform.exported_trip_counts(scan7, (x,), "tpu")[0] == [7]


def _trip_counts(jobs, target):
  return {(name, function): platform.exported_trip_counts(fn, args, target)[0]
          for name, function, fn, args in jobs}


def _jobs(name, tokens=N):
  if name == "fused":
    return list(portability.fused_jobs(vocab_size=V, tokens=tokens, hidden=H))
  if name.startswith("train_step"):
    head_name = name.split(":")[1]
    head = heads.make_head(head_name, vocab_size=V, counts=portability.zipf_counts(V))
    return [portability.train_step_job(head, vocab_size=V, tokens=tokens, hidden=H)]
  head = heads.make_head(name, vocab_size=V, counts=portability.zipf_counts(V))
  return list(portability.head_jobs(name, head, vocab_size=V, tokens=tokens, hidden=H))


@pytest.mark.parametrize("name", list(heads.HEAD_NAMES) + ["fused", "train_step:full",
                                                            "train_step:class",
                                                            "train_step:adaptive"])
def test_no_loop_on_gpu_or_tpu_grows_with_the_number_of_tokens(name):
  """Every head's loss + gradient, log_prob, log_probs and sample, the fused loss (every
  reduction) and the train step, exported for cuda and tpu at N = 16384, V = 100k: no while
  loop runs more than 128 times, every bound is a constant, and halving N changes none."""
  jobs = _jobs(name)
  expected = {"fused": 3, "train_step:full": 1, "train_step:class": 1, "train_step:adaptive": 1}
  assert len(jobs) == expected.get(name, len(portability.HEAD_FUNCTIONS))
  for target in ("cuda", "tpu"):
    for (head, function), trips in _trip_counts(jobs, target).items():
      assert all(0 <= t <= LIMIT for t in trips), (head, function, target, trips)
  half = _trip_counts(_jobs(name, N // 2), "cuda")
  assert half == _trip_counts(jobs, "cuda"), "a trip count changed with N"


@pytest.mark.parametrize("name,worst", [("class", 819), ("adaptive", 512)])
def test_the_cpu_forms_would_fail_the_export_check(name, worst):
  """The check can fail: the CPU-tuned item scans, forced on a GPU export, run once per item."""
  head = heads.make_head(name, vocab_size=V, counts=portability.zipf_counts(V),
                         implementation="cpu")
  (_, _, fn, args), *_ = portability.head_jobs(name, head, vocab_size=V, tokens=N, hidden=H)
  trips, _ = platform.exported_trip_counts(fn, args, "cuda")
  assert max(trips) == worst > LIMIT
