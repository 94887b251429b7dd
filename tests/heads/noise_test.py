"""Tests for lm_jax.heads.noise: alias tables, the three noise distributions and their samplers."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.heads import noise

DRAWS = 20000


def _implied(prob_V, alias_V):
  v = prob_V.size
  implied = prob_V.astype(np.float64).copy()
  np.add.at(implied, alias_V, 1.0 - prob_V)
  return implied / v


def _chi_square_pvalue(samples, probs_V):
  """p-value of the draws' counts against ``probs_V`` over its support; draws outside fail."""
  counts_V = np.bincount(np.asarray(samples).ravel(), minlength=probs_V.size)
  assert counts_V.size == probs_V.size, "a draw is out of range"
  support = probs_V > 0
  assert counts_V[~support].sum() == 0, "a zero-probability id was drawn"
  expected = probs_V[support] / probs_V[support].sum() * counts_V.sum()
  return scipy.stats.chisquare(counts_V[support], expected).pvalue


def test_alias_table_is_exact_on_a_hand_made_case():
  prob_V, alias_V = noise.alias_table([0.1, 0.2, 0.3, 0.4, 0.0])
  np.testing.assert_allclose(_implied(prob_V, alias_V), [0.1, 0.2, 0.3, 0.4, 0.0], atol=1e-12)
  assert prob_V[4] == 0.0 and 4 not in alias_V[prob_V < 1]
  assert np.all((prob_V >= 0) & (prob_V <= 1)) and alias_V.dtype == np.int32


@settings(deadline=None, max_examples=50)
@given(hnp.arrays(np.float64, st.integers(1, 60), elements=st.floats(0, 100)))
def test_alias_table_implied_distribution_equals_input(weights):
  weights[0] += 1.0  # at least one positive weight
  prob_V, alias_V = noise.alias_table(weights)
  np.testing.assert_allclose(_implied(prob_V, alias_V), weights / weights.sum(), atol=1e-6)
  assert np.all(prob_V[weights == 0] == 0)
  assert not np.isin(np.flatnonzero(weights == 0), alias_V[prob_V < 1]).any()


def test_unigram_probs_are_powered_counts_and_sampler_matches():
  counts = np.array([50, 0, 20, 7, 3, 1, 0, 12])
  dist = noise.unigram_noise(counts, power=0.75)
  expected = np.where(counts > 0, counts.astype(np.float64) ** 0.75, 0.0)
  expected /= expected.sum()
  np.testing.assert_allclose(np.exp(dist.log_probs_V), expected, rtol=1e-6, atol=1e-7)
  assert np.isneginf(dist.log_probs_V[1]) and np.isneginf(dist.log_prob(6))
  samples = jax.jit(dist.sample, static_argnums=1)(jax.random.PRNGKey(0), (DRAWS,))
  assert samples.dtype == jnp.int32
  assert _chi_square_pvalue(samples, expected) > 1e-3
  # The same draws reject the plain unigram (power 1).
  assert _chi_square_pvalue(samples, counts / counts.sum()) < 1e-6


def test_log_uniform_matches_tensorflow_formula_and_sums_to_one():
  for v in (1, 5, 1000, 100_000):
    dist = noise.log_uniform_noise(v)
    k = np.arange(v, dtype=np.float64)
    tf_formula = (np.log(k + 2) - np.log(k + 1)) / np.log(v + 1)
    np.testing.assert_allclose(np.exp(np.asarray(dist.log_probs_V, np.float64)), tf_formula,
                               rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(dist.log_probs_V, np.float64)).sum(), 1.0,
                               rtol=1e-5)


def test_log_uniform_sampler_chi_square_and_tail():
  dist = noise.log_uniform_noise(30)
  samples = dist.sample(jax.random.PRNGKey(1), (DRAWS,))
  probs = np.exp(np.asarray(dist.log_probs_V, np.float64))
  assert _chi_square_pvalue(samples, probs) > 1e-3
  assert _chi_square_pvalue(samples, np.full(30, 1 / 30)) < 1e-6
  # A large vocabulary: the mass beyond id 600k (about 3.7%) is reached, ids stay in range.
  big = noise.log_uniform_noise(1_000_000)
  samples = np.asarray(big.sample(jax.random.PRNGKey(2), (DRAWS,)))
  assert samples.min() >= 0 and samples.max() < 1_000_000
  tail = (np.log(1_000_001) - np.log(600_001)) / np.log(1_000_001)
  assert scipy.stats.binomtest(int((samples >= 600_000).sum()), DRAWS, tail).pvalue > 1e-3


def test_uniform_sampler_chi_square_and_log_prob():
  dist = noise.uniform_noise(9)
  np.testing.assert_allclose(dist.log_prob(jnp.array([0, 8])), -np.log(9), rtol=1e-6)
  samples = dist.sample(jax.random.PRNGKey(3), (100, 200))
  assert samples.shape == (100, 200)
  assert _chi_square_pvalue(samples, np.full(9, 1 / 9)) > 1e-3


@pytest.mark.parametrize("name", noise.NOISE_NAMES)
def test_make_noise_and_log_prob_is_gathered(name):
  counts = np.array([5, 4, 3, 0, 1])
  dist = noise.make_noise(name, vocab_size=5, counts=counts, power=0.5)
  assert dist.vocab_size == 5 and dist.log_probs_V.shape == (5,)
  ids = jnp.array([[0, 4], [2, 2]])
  np.testing.assert_array_equal(jax.jit(dist.log_prob)(ids), dist.log_probs_V[ids])
  np.testing.assert_allclose(jax.nn.logsumexp(dist.log_probs_V), 0.0, atol=1e-6)
  # Draws are reproducible with a key and in range under vmap too.
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  samples = jax.vmap(lambda k: dist.sample(k, (4,)))(keys)
  assert samples.shape == (3, 4) and int(samples.min()) >= 0 and int(samples.max()) < 5
  np.testing.assert_array_equal(dist.sample(keys[0], (4,)), samples[0])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"probs must be a non-empty \[V\] vector, got shape \(0,\)"):
    noise.alias_table([])
  with pytest.raises(ValueError, match="probs must be finite, non-negative and not all zero"):
    noise.alias_table([0.5, -0.1])
  with pytest.raises(ValueError, match="counts must be non-negative with at least one positive"):
    noise.unigram_noise([0, 0, 0])
  with pytest.raises(ValueError, match=r"counts must be a non-empty \[V\] vector, got shape \(2, 2\)"):
    noise.unigram_noise(np.ones((2, 2)))
  with pytest.raises(ValueError, match="power must be >= 0, got -1"):
    noise.unigram_noise([1, 2], power=-1)
  with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
    noise.log_uniform_noise(0)
  with pytest.raises(ValueError, match="vocab_size must be >= 1, got -3"):
    noise.uniform_noise(-3)
  with pytest.raises(ValueError, match="unknown noise 'zipf'"):
    noise.make_noise("zipf", vocab_size=3)
  with pytest.raises(ValueError, match="unigram noise needs the training counts"):
    noise.make_noise("unigram", vocab_size=3)
  with pytest.raises(ValueError, match=r"counts has shape \(2,\), expected \[V\] = \(3,\)"):
    noise.make_noise("unigram", vocab_size=3, counts=[1, 2])
