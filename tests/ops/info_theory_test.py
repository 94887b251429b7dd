"""Tests for lm_jax.ops.info_theory."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from lm_jax.ops import info_theory as it


def _dirichlet(shape, seed=0):
  return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1])


# Expected values and references.

def test_expected_values():
  p = np.array([0.5, 0.25, 0.25, 0.0])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  np.testing.assert_allclose(it.entropy(p), 1.5, rtol=1e-6)
  np.testing.assert_allclose(it.cross_entropy(p, q), 2.0, rtol=1e-6)
  np.testing.assert_allclose(it.relative_entropy(p, q), 0.5, rtol=1e-6)
  np.testing.assert_allclose(it.bits_per_token(np.log([0.5, 0.25])), 1.5, rtol=1e-6)
  np.testing.assert_allclose(it.perplexity(np.log([0.5, 0.25])), 2**1.5, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_entropy_of_uniform_is_log2_n(n):
  np.testing.assert_allclose(it.entropy(np.full(n, 1.0 / n)), math.log2(n), atol=1e-5)
  # A uniform model over n words has perplexity n.
  np.testing.assert_allclose(it.perplexity(np.full((3, 5), -math.log(n))), n, rtol=1e-5)


def test_agrees_with_scipy_in_every_base():
  p, q = _dirichlet((4, 6)), _dirichlet((4, 6), seed=1)
  p[0, :3] = 0.0
  p[0] /= p[0].sum()
  with jax.enable_x64(True):
    for base in (2.0, math.e, 10.0):
      np.testing.assert_allclose(it.entropy(p, base=base),
                                 scipy.stats.entropy(p, base=base, axis=-1), rtol=1e-12)
      np.testing.assert_allclose(it.relative_entropy(p, q, base=base),
                                 scipy.stats.entropy(p, q, base=base, axis=-1), rtol=1e-12)
      np.testing.assert_allclose(
          it.cross_entropy(p, q, base=base),
          -scipy.special.xlogy(p, q).sum(-1) / math.log(base), rtol=1e-12)
    # Changing the base rescales: H_b = H_2 * ln 2 / ln b.
    np.testing.assert_allclose(it.entropy(p, base=math.e), it.entropy(p) * math.log(2),
                               rtol=1e-12)


def test_axes():
  p, q = _dirichlet((3, 5)), _dirichlet((3, 5), seed=1)
  np.testing.assert_allclose(it.entropy(p.T, axis=0), it.entropy(p), rtol=1e-6)
  np.testing.assert_allclose(it.relative_entropy(p.T, q.T, 0), it.relative_entropy(p, q),
                             rtol=1e-6)
  joint = p / p.sum()  # a joint distribution over two axes
  np.testing.assert_allclose(it.entropy(joint, axis=(0, 1)), it.entropy(joint, axis=None),
                             rtol=1e-6)
  np.testing.assert_allclose(it.entropy(joint, axis=None), scipy.stats.entropy(
      joint.ravel(), base=2), rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(it.entropy)(p), it.entropy(p), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(it.cross_entropy)(p, q), it.cross_entropy(p, q),
                             rtol=1e-6)


def test_kl_of_nearby_distributions_is_accurate_in_float32():
  """One log of the ratio; log p - log q would be ~10% off here."""
  p = _dirichlet((8, 50)).astype(np.float32)
  q = p * (1 + 1e-3 * np.random.default_rng(3).normal(size=p.shape))
  q = (q / q.sum(-1, keepdims=True)).astype(np.float32)
  expected = scipy.special.rel_entr(p.astype(np.float64), q).sum(-1) / math.log(2)
  np.testing.assert_allclose(it.relative_entropy(p, q), expected, rtol=0.03)


# Zeros and infinities.

def test_zero_log_zero_is_zero_with_finite_gradients():
  p = jnp.array([0.0, 0.3, 0.7])
  q = jnp.array([0.0, 0.5, 0.5])
  for f in (it.entropy, lambda x: it.cross_entropy(x, q), lambda x: it.relative_entropy(x, q)):
    assert np.isfinite(f(p))
    grad = jax.jit(jax.grad(f))(p)
    assert np.all(np.isfinite(grad)), grad
  grad_q = jax.jit(jax.grad(lambda y: it.cross_entropy(p, y)))(q)
  assert np.all(np.isfinite(grad_q))
  # p > 0 where q = 0: q cannot encode the outcome at all.
  no_support = jnp.array([0.5, 0.5, 0.0])
  assert it.cross_entropy(p, no_support) == np.inf
  assert it.relative_entropy(p, no_support) == np.inf


def test_check_grads():
  with jax.enable_x64(True):
    # Bounded away from 0, where the curvature -1/p defeats finite differences.
    p, q = 0.5 * _dirichlet((2, 4)) + 0.125, 0.5 * _dirichlet((2, 4), seed=1) + 0.125
    for f, args in ((it.entropy, (p,)), (it.cross_entropy, (p, q)),
                    (it.relative_entropy, (p, q))):
      check_grads(jax.jit(f), args, order=2, modes=["rev"])
      check_grads(jax.jit(f), args, order=1, modes=["fwd"])
    log_probs = np.log(p)
    where = np.array([[True, False, True, True]] * 2)
    check_grads(jax.jit(lambda x: it.perplexity(x, where)), (log_probs,), order=1,
                modes=["fwd", "rev"])
    check_grads(jax.jit(it.bits_per_token), (log_probs,), order=1, modes=["rev"])


# Perplexity.

def test_perplexity_is_two_to_the_cross_entropy_rate():
  """Equations 8.4 and 8.5 with a toy sentence scored by a toy model."""
  probs_T = np.array([0.1, 0.5, 0.02, 0.3, 0.25])  # p(w_t | w_<t)
  h_w = -np.sum(np.log2(probs_T)) / len(probs_T)  # eq. 8.4, bits per word
  np.testing.assert_allclose(it.bits_per_token(np.log(probs_T)), h_w, rtol=1e-6)
  np.testing.assert_allclose(it.perplexity(np.log(probs_T)), 2.0**h_w, rtol=1e-6)
  # The same from the sentence probability: PPL = p(w_1..w_M) ** (-1/M).
  np.testing.assert_allclose(it.perplexity(np.log(probs_T)),
                             np.prod(probs_T) ** (-1 / len(probs_T)), rtol=1e-6)


def test_masks_and_fully_masked_input():
  log_probs = np.log(np.array([[0.5, 0.25, 1e-9], [0.125, 1e-9, 1e-9]]))
  where = np.array([[True, True, False], [True, False, False]])
  np.testing.assert_allclose(it.bits_per_token(log_probs, where), 2.0, rtol=1e-6)
  np.testing.assert_allclose(it.perplexity(log_probs, where), 4.0, rtol=1e-6)
  row_mask = np.array([[True], [False]])  # broadcasts over time
  np.testing.assert_allclose(it.bits_per_token(log_probs, row_mask),
                             it.bits_per_token(log_probs[0]), rtol=1e-6)
  none = np.zeros_like(where)
  assert np.isnan(it.perplexity(log_probs, none))
  assert np.isnan(it.bits_per_token(log_probs, none))
  grad = jax.jit(jax.grad(lambda x: it.perplexity(x, where)))(log_probs)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0.0)


def test_low_precision_inputs_reduce_in_float32():
  log_probs = jnp.log(jnp.full((64, 64), 1 / 50.0, jnp.bfloat16))
  ppl = it.perplexity(log_probs)
  assert ppl.dtype == jnp.float32
  np.testing.assert_allclose(ppl, 50.0, rtol=1e-2)
  assert it.entropy(jnp.full(8, 0.125, jnp.float16)).dtype == jnp.float32


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="base must be a finite positive number other than 1"):
    it.entropy(np.ones(2) / 2, base=1.0)
  with pytest.raises(ValueError, match="base must be a finite positive number"):
    it.relative_entropy(np.ones(2) / 2, np.ones(2) / 2, base=-2.0)
  with pytest.raises(ValueError, match="where must be a boolean mask, got dtype float"):
    it.perplexity(np.zeros(3), np.ones(3))
  with pytest.raises(ValueError, match=r"where has shape \(4,\).*shape \(3,\)"):
    it.bits_per_token(np.zeros(3), np.ones(4, bool))


# Properties the maths promises.

_WEIGHTS = hnp.arrays(np.float64, (6,), elements=st.floats(0.0, 1.0))


def _normalise(weights):
  weights = weights.copy()
  weights[0] += 1e-3  # never all zero
  return weights / weights.sum()


@settings(deadline=None, max_examples=50)
@given(_WEIGHTS, _WEIGHTS)
def test_gibbs_inequality_and_kl_identity(p_weights, q_weights):
  """H(p) <= H(p, q) (eq. 8.3); D(p || q) = H(p, q) - H(p) >= 0."""
  p, q = _normalise(p_weights), _normalise(q_weights)
  with jax.enable_x64(True):
    h_p, h_pq, kl = it.entropy(p), it.cross_entropy(p, q), it.relative_entropy(p, q)
    assert h_p <= h_pq + 1e-12
    assert kl >= -1e-12
    if np.isfinite(h_pq):
      np.testing.assert_allclose(kl, h_pq - h_p, rtol=1e-9, atol=1e-9)
    else:
      assert kl == np.inf
    assert 0.0 <= h_p <= math.log2(6) + 1e-12


@settings(deadline=None, max_examples=50)
@given(_WEIGHTS, st.integers(0, 5), st.floats(0.05, 0.5))
def test_kl_is_zero_iff_distributions_are_equal(p_weights, i, mass):
  p = _normalise(p_weights)
  with jax.enable_x64(True):
    assert abs(float(it.relative_entropy(p, p))) < 1e-12
    q = (1 - mass) * p + mass * np.eye(6)[i]  # moved some mass: q != p
    if np.abs(q - p).max() > 1e-3:
      assert it.relative_entropy(p, q) > 1e-9


# The KL divergence keeps its own name: optax's kl_divergence means something else.

def test_relative_entropy_is_optax_kl_divergence_with_probabilities_and_a_base():
  import optax  # pylint: disable=g-import-not-at-top
  import lm_jax  # pylint: disable=g-import-not-at-top
  p, q = _dirichlet((3, 5), seed=20), _dirichlet((3, 5), seed=21)
  nats = optax.losses.kl_divergence(np.log(q), p)  # (log_predictions, targets), in nats
  np.testing.assert_allclose(it.relative_entropy(p, q, base=math.e), nats, rtol=1e-5)
  np.testing.assert_allclose(it.relative_entropy(p, q), nats / math.log(2.0), rtol=1e-5)
  assert lm_jax.relative_entropy is it.relative_entropy
  # lm_jax borrows optax's names only with optax's meaning; this one it does not borrow.
  for module in (lm_jax, lm_jax.ops, it):
    assert not hasattr(module, "kl_divergence"), module
