"""Tests for lm_jax.ops.softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

# `lm_jax.ops.softmax` (the package attribute) is the re-exported function, so the
# module's names are imported from the module itself.
from lm_jax.ops.softmax import log_softmax, logsumexp, softmax

FUNCTIONS = {
    "softmax": (softmax, jax.nn.softmax),
    "log_softmax": (log_softmax, jax.nn.log_softmax),
    "logsumexp": (logsumexp, jax.nn.logsumexp),
}


def _random(shape, seed=0, scale=3.0, dtype=np.float32):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def _numpy_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


# Expected values and references.

def test_expected_values():
  np.testing.assert_allclose(softmax(jnp.log(jnp.array([1.0, 3.0]))), [0.25, 0.75],
                             rtol=1e-6)
  np.testing.assert_allclose(log_softmax(jnp.zeros(4)), np.log([0.25] * 4), rtol=1e-6)
  np.testing.assert_allclose(logsumexp(jnp.log(jnp.array([1.0, 2.0, 5.0]))),
                             np.log(8.0), rtol=1e-6)
  np.testing.assert_allclose(softmax(jnp.array([2.0, 0.0]), temperature=2.0),
                             _numpy_softmax([1.0, 0.0]), rtol=1e-6)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("axis", [-1, pytest.param(0),
                                  pytest.param(1), (0, 2), None])
def test_agrees_with_jax_nn(name, axis):
  ours, theirs = FUNCTIONS[name]
  logits = _random((3, 4, 5))
  np.testing.assert_allclose(ours(logits, axis), theirs(logits, axis), rtol=1e-5, atol=1e-6)
  where = np.random.default_rng(1).uniform(size=(3, 4, 5)) > 0.3
  where[0, 0, :] = where[:, 0, 0] = True  # every reduction keeps something
  np.testing.assert_allclose(ours(logits, axis, where=where),
                             theirs(logits, axis, where=where), rtol=1e-5, atol=1e-6)


def test_agrees_with_numpy_float64_reference():
  logits = _random((6, 9), scale=20.0)
  np.testing.assert_allclose(softmax(logits), _numpy_softmax(logits), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(softmax(logits, 0), _numpy_softmax(logits, 0), rtol=1e-5,
                             atol=1e-7)
  with jax.enable_x64(True):
    z = logits.astype(np.float64)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(logsumexp(z), lse, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(log_softmax(z), z - lse[:, None], rtol=1e-13,
                               atol=1e-13)


def test_temperature_divides_the_logits():
  logits = _random((4, 7))
  for t in (0.1, 0.5, 3.0):
    for ours, theirs in FUNCTIONS.values():
      np.testing.assert_allclose(ours(logits, temperature=t), theirs(logits / t, -1),
                                 rtol=1e-5, atol=1e-6)
  per_row = np.array([[0.5], [1.0], [2.0], [4.0]], np.float32)
  np.testing.assert_allclose(softmax(logits, temperature=per_row),
                             jax.nn.softmax(logits / per_row), rtol=1e-5, atol=1e-7)
  traced = jax.jit(lambda z, t: softmax(z, temperature=t))(logits, 0.5)
  np.testing.assert_allclose(traced, jax.nn.softmax(logits / 0.5), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"),
                                         np.array([1.0, 0.0])])
def test_bad_temperature_raises(temperature):
  for f in (softmax, log_softmax, logsumexp):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
      f(jnp.ones(3), temperature=temperature)


def test_non_boolean_mask_raises():
  for f in (softmax, log_softmax, logsumexp):
    with pytest.raises(ValueError, match="where must be a boolean mask, got dtype int"):
      f(jnp.ones(3), where=np.array([1, 0, 1]))


# Numerics, masks, dtypes.

def test_huge_and_negative_infinite_logits():
  logits = np.array([[1e4, 0.0, -1e4], [-np.inf, 1.0, 1.0], [-np.inf] * 3], np.float32)
  probs = softmax(logits)
  np.testing.assert_allclose(probs, [[1, 0, 0], [0, 0.5, 0.5], [0, 0, 0]], atol=1e-7)
  log_probs = np.asarray(log_softmax(logits))
  np.testing.assert_allclose(log_probs[0], [0.0, -1e4, -2e4], rtol=1e-6)
  assert log_probs[1, 0] == -np.inf and np.all(log_probs[2] == -np.inf)
  np.testing.assert_allclose(logsumexp(logits), [1e4, 1.0 + np.log(2.0), -np.inf],
                             rtol=1e-6)
  for f in (softmax, log_softmax, logsumexp):
    grad = jax.jit(jax.grad(
        lambda z, f=f: jnp.sum(jnp.where(jnp.isfinite(f(z)), f(z), 0.0))))(logits)
    assert np.all(np.isfinite(grad)), f.__name__
    np.testing.assert_array_equal(grad[2], 0.0)


def test_fully_masked_rows_give_zero_probability_and_finite_gradients():
  logits = _random((3, 4))
  where = np.array([[True, True, False, False], [False] * 4, [True] * 4])
  probs = np.asarray(softmax(logits, where=where))
  np.testing.assert_allclose(probs[0, :2], _numpy_softmax(logits[0, :2]), rtol=1e-6)
  np.testing.assert_array_equal(probs[0, 2:], 0.0)
  np.testing.assert_array_equal(probs[1], 0.0)
  assert np.all(np.asarray(log_softmax(logits, where=where))[1] == -np.inf)
  assert np.asarray(logsumexp(logits, where=where))[1] == -np.inf
  for f in (lambda z: softmax(z, where=where) ** 2,
            lambda z: jnp.where(where, log_softmax(z, where=where), 0.0),
            lambda z: jnp.where(where.any(-1), logsumexp(z, where=where), 0.0)):
    grad = np.asarray(jax.jit(jax.grad(lambda z, f=f: jnp.sum(f(z))))(logits))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_array_equal(grad[0, 2:], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_dtype(dtype):
  logits = jnp.asarray(_random((4, 50)), dtype)
  reference = jnp.asarray(logits, jnp.float32)
  for ours, _ in FUNCTIONS.values():
    out = ours(logits)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ours(reference),
                               rtol=2e-2, atol=2e-3)
  # A float16 logsumexp of 1e4-sized logits would overflow without float32 inside.
  assert np.isfinite(float(logsumexp(jnp.full((1000,), 60.0, jnp.float16))))
  assert softmax(jnp.arange(3)).dtype == jnp.float32  # integers become float32


def test_check_grads():
  with jax.enable_x64(True):
    logits = _random((3, 4), dtype=np.float64)
    where = np.array([[True, True, False, True]] * 3)
    for f in (softmax, log_softmax, logsumexp):
      check_grads(jax.jit(lambda z, f=f: f(z, temperature=0.7)), (logits,), order=1,
                  modes=["fwd", "rev"])
      check_grads(jax.jit(lambda z, f=f: f(z, 0, where=where)), (logits,), order=1,
                  modes=["rev"])
    check_grads(jax.jit(log_softmax), (logits,), order=2, modes=["rev"])
    check_grads(jax.jit(lambda t: log_softmax(logits, temperature=t)), (1.3,),
                order=1, modes=["fwd", "rev"])


def test_axis_permutations_jit_and_vmap():
  logits = _random((2, 5, 3))
  for ours, _ in FUNCTIONS.values():
    moved = ours(np.moveaxis(logits, 1, -1))
    along_1 = ours(logits, 1)
    np.testing.assert_allclose(along_1, moved if moved.ndim == 2 else
                               np.moveaxis(np.asarray(moved), -1, 1), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(ours)(logits), ours(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(ours)(logits), ours(logits), rtol=1e-6)


# Properties the lecture states.

_FINITE = st.floats(-30, 30, width=32)
_ROW = hnp.arrays(np.float32, (6,), elements=_FINITE)


@settings(deadline=None, max_examples=50)
@given(_ROW, st.floats(-1e3, 1e3))
def test_invariant_to_adding_a_constant_and_normalised(logits, constant):
  probs = softmax(logits)
  np.testing.assert_allclose(softmax(logits + np.float32(constant)), probs, atol=2e-5)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
  assert np.all(probs >= 0)
  np.testing.assert_allclose(jnp.exp(log_softmax(logits)), probs, atol=1e-6)
  np.testing.assert_allclose(log_softmax(logits), logits - logsumexp(logits),
                             atol=1e-5)


@settings(deadline=None, max_examples=50)
@given(_ROW, st.floats(1.5, 10.0))
def test_not_invariant_to_scaling(logits, scale):
  assume(np.ptp(logits) > 0.5)
  # Log-odds scale with the logits: log p_i - log p_j = scale * (z_i - z_j).
  assert not np.allclose(log_softmax(logits * np.float32(scale)),
                         log_softmax(logits), atol=1e-2)


@settings(deadline=None, max_examples=50)
@given(_ROW)
def test_temperature_limits(logits):
  """T -> inf gives the uniform distribution; T -> 0 the one-hot argmax."""
  np.testing.assert_allclose(softmax(logits, temperature=1e6), np.full(6, 1 / 6),
                             atol=1e-4)
  top2 = np.sort(logits)[-2:]
  assume(top2[1] - top2[0] > 0.05)  # a unique maximum
  np.testing.assert_allclose(softmax(logits, temperature=1e-3),
                             np.eye(6)[np.argmax(logits)], atol=1e-6)


@settings(deadline=None, max_examples=50)
@given(hnp.arrays(np.float64, (5,), elements=st.floats(-5, 5)),
       st.integers(0, 4), st.floats(0.01, 3.0))
def test_monotonic_in_its_own_logit(logits, i, delta):
  """Raising logit i raises p_i and lowers every other p_j."""
  with jax.enable_x64(True):
    before = np.asarray(softmax(logits))
    after = np.asarray(softmax(logits + delta * np.eye(5)[i]))
  assert after[i] > before[i]
  assert np.all(np.delete(after, i) < np.delete(before, i))


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31 - 1))
def test_decision_boundaries_are_linear(seed):
  """For logits = W x + b, p_i > p_j exactly where (w_i - w_j).x + b_i - b_j > 0."""
  rng = np.random.default_rng(seed)
  weights_CxF, bias_C = rng.normal(size=(4, 3)), rng.normal(size=4)
  points_KxF = rng.normal(size=(64, 3)) * 3
  i, j = rng.choice(4, size=2, replace=False)
  w, b = weights_CxF[i] - weights_CxF[j], bias_C[i] - bias_C[j]
  with jax.enable_x64(True):
    probs = np.asarray(softmax(points_KxF @ weights_CxF.T + bias_C))
    affine = points_KxF @ w + b
    clear = np.abs(affine) > 1e-9
    np.testing.assert_array_equal(np.sign(probs[clear, i] - probs[clear, j]),
                                  np.sign(affine[clear]))
    on_plane = points_KxF - np.outer(affine / (w @ w), w)  # projected onto it
    probs = np.asarray(softmax(on_plane @ weights_CxF.T + bias_C))
    np.testing.assert_allclose(probs[:, i], probs[:, j], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_masked_entries_never_enter_the_arithmetic(name, bad):
  # NaN or inf where `where` is False: the values and the gradients (logits and temperature)
  # are those of zeros there, and the gradients there are exactly 0.
  fn = FUNCTIONS[name][0]
  where = np.ones((3, 4), bool)
  where[0, 1] = where[1, :] = False
  logits = _random((3, 4), seed=7)
  poisoned, clean = np.where(where, logits, bad), np.where(where, logits, 0.0)
  weights = jnp.arange(1.0, 1.0 + (3 if name == "logsumexp" else 12)).reshape(
      (3,) if name == "logsumexp" else (3, 4))
  def objective(z, t):
    out = fn(z, temperature=t, where=where)
    return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * weights)
  np.testing.assert_array_equal(fn(poisoned, where=where), fn(clean, where=where))
  grads = jax.grad(objective, argnums=(0, 1))(poisoned, 1.5)
  want = jax.grad(objective, argnums=(0, 1))(clean, 1.5)
  for got, expected in zip(grads, want):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_array_equal(grads[0][~where], 0.0)
