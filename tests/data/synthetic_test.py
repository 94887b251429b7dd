"""Tests for lm_jax.data.synthetic: the Markov language and its exact entropy rate."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.data import synthetic
from lm_jax.data import zipf


def entropy_bits(p):
  p = np.asarray(p, np.float64)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def block_entropy(lang, n):
  """H(X_1..X_n) of the stationary chain by enumerating all V^n sequences."""
  v, order = lang.vocab_size, lang.order
  probs = []
  for seq in itertools.product(range(v), repeat=n):
    context = 0
    for tok in seq[:order]:
      context = context * v + tok
    p = lang.stationary_S[context]
    for tok in seq[order:]:
      p *= lang.transitions_SxV[context, tok]
      context = (context * v + tok) % v ** order
    probs.append(p)
  assert abs(sum(probs) - 1) < 1e-12
  return entropy_bits(probs)


@pytest.mark.parametrize("order, v, k, n", [(1, 3, 2, 4), (1, 4, 1, 3), (2, 3, 2, 5)])
def test_entropy_rate_equals_brute_force_block_entropy_difference(order, v, k, n):
  lang = synthetic.make_language(v, seed=7, order=order, num_successors=k, mix=0.6)
  # For a stationary Markov chain of order m, H(X_1..X_n) - H(X_1..X_{n-1}) = H for n > m.
  brute = block_entropy(lang, n) - block_entropy(lang, n - 1)
  np.testing.assert_allclose(lang.entropy_rate_bits, brute, rtol=1e-10)


def test_stationary_distribution_matches_eigenvector():
  lang = synthetic.make_language(12, seed=1, num_successors=3)
  eigvals, eigvecs = np.linalg.eig(lang.transitions_SxV.T)
  top = eigvecs[:, np.argmin(np.abs(eigvals - 1))].real
  np.testing.assert_allclose(lang.stationary_S, top / top.sum(), atol=1e-13)
  np.testing.assert_allclose(lang.unigram_V, lang.stationary_S)


def test_order2_stationary_is_invariant():
  lang = synthetic.make_language(5, seed=2, order=2, num_successors=2)
  pi_VxV = lang.stationary_S.reshape(5, 5)
  moved = np.einsum("hi,hij->ij", pi_VxV, lang.transitions_SxV.reshape(5, 5, 5))
  np.testing.assert_allclose(moved, pi_VxV, atol=1e-15)
  np.testing.assert_allclose(pi_VxV.sum(0), pi_VxV.sum(1), atol=1e-14)  # shift-invariant
  np.testing.assert_allclose(lang.unigram_V, pi_VxV.sum(0))


@settings(deadline=None, max_examples=30)
@given(st.integers(2, 12), st.sampled_from([1, 2]), st.floats(0.0, 0.95), st.integers(1, 4),
       st.floats(0.0, 2.0), st.integers(0, 2**31))
def test_language_identities(v, order, mix, k, alpha, seed):
  k = min(k, v)
  lang = synthetic.make_language(v, seed=seed, order=order, mix=mix, num_successors=k,
                                 alpha=alpha)
  table = lang.transitions_SxV
  assert table.shape == (v ** order, v) and np.all(table > 0)
  np.testing.assert_allclose(table.sum(1), 1.0, rtol=1e-12)
  assert all(len(set(row)) == k for row in lang.successors_SxK)  # without replacement
  np.testing.assert_allclose(lang.stationary_S.sum(), 1.0, rtol=1e-12)
  # Conditioning cannot increase entropy: 0 <= H <= H(unigram) <= log2 V.
  assert 0 <= lang.entropy_rate_bits <= entropy_bits(lang.unigram_V) + 1e-9
  assert entropy_bits(lang.unigram_V) <= np.log2(v) + 1e-9
  if mix == 0.0:  # no structure: i.i.d. Zipf
    np.testing.assert_allclose(lang.entropy_rate_bits, entropy_bits(lang.background_V))


def test_sample_follows_the_transition_table():
  lang = synthetic.make_language(8, seed=4, num_successors=3)
  x = synthetic.sample(lang, 200_000, seed=5)
  assert x.dtype == np.int32 and x.shape == (200_000,) and x.min() >= 0 and x.max() < 8
  counts = np.zeros((8, 8))
  np.add.at(counts, (x[:-1], x[1:]), 1)
  expected = counts.sum(1, keepdims=True) * lang.transitions_SxV
  z = (counts - expected) / np.sqrt(expected)
  assert np.abs(z).max() < 5, np.abs(z).max()
  np.testing.assert_allclose(np.bincount(x, minlength=8) / len(x), lang.unigram_V, atol=5e-3)


def test_order2_sample_follows_the_table():
  lang = synthetic.make_language(4, seed=4, order=2, num_successors=2)
  x = synthetic.sample(lang, 100_000, seed=1)
  counts = np.zeros((16, 4))
  np.add.at(counts, (x[:-2] * 4 + x[1:-1], x[2:]), 1)
  expected = counts.sum(1, keepdims=True) * lang.transitions_SxV
  assert np.abs((counts - expected) / np.sqrt(expected)).max() < 5


def test_empirical_cross_entropy_approaches_entropy_rate():
  lang = synthetic.make_language(32, seed=0, num_successors=4)
  train = synthetic.sample(lang, 400_000, seed=1)
  valid = synthetic.sample(lang, 100_000, seed=2)
  # The true model's cross-entropy on a sample estimates H without bias.
  true_ce = -np.log2(lang.transitions_SxV[valid[:-1], valid[1:]]).mean()
  np.testing.assert_allclose(true_ce, lang.entropy_rate_bits, rtol=0.01)
  # A smoothed bigram count model trained on the sample gets close from above.
  counts = np.full((32, 32), 0.1)
  np.add.at(counts, (train[:-1], train[1:]), 1)
  bigram_ce = -np.log2((counts / counts.sum(1, keepdims=True))[valid[:-1], valid[1:]]).mean()
  assert lang.entropy_rate_bits - 0.02 < bigram_ce < lang.entropy_rate_bits * 1.01


def test_one_chain_is_exact_and_many_chains_agree():
  lang = synthetic.make_language(6, seed=3, num_successors=2)
  one = synthetic.sample(lang, 30_000, seed=0, num_chains=1)
  many = synthetic.sample(lang, 30_000, seed=0, num_chains=100)
  for x in (one, many):
    np.testing.assert_allclose(np.bincount(x, minlength=6) / len(x), lang.unigram_V, atol=0.02)


def test_default_language_is_zipfian_with_entropy_in_range():
  lang = synthetic.make_language(seed=0)
  assert lang.vocab_size == 256 and 4.5 < lang.entropy_rate_bits < 5.2
  assert entropy_bits(lang.unigram_V) - lang.entropy_rate_bits > 1.0  # structure to learn
  x = synthetic.sample(lang, 300_000, seed=0)
  alpha = zipf.fit_zipf(zipf.rank_frequency(x))
  assert 0.9 < alpha < 1.4, alpha


def test_deterministic_from_seed():
  a = synthetic.make_language(30, seed=1)
  b = synthetic.make_language(30, seed=1)
  c = synthetic.make_language(30, seed=2)
  np.testing.assert_array_equal(a.transitions_SxV, b.transitions_SxV)
  assert not np.array_equal(a.transitions_SxV, c.transitions_SxV)
  np.testing.assert_array_equal(synthetic.sample(a, 5000, seed=3),
                                synthetic.sample(b, 5000, seed=3))
  assert not np.array_equal(synthetic.sample(a, 5000, seed=3), synthetic.sample(a, 5000, seed=4))
  assert synthetic.sample(a, 0, seed=0).shape == (0,)
  assert synthetic.sample(a, 7, seed=0, num_chains=3).shape == (7,)


@pytest.mark.parametrize("kwargs, match", [
    ({"order": 3}, "order must be 1 or 2"),
    ({"vocab_size": 1}, "vocab_size must be >= 2"),
    ({"vocab_size": 200, "order": 2}, "dense table"),
    ({"mix": 1.0}, r"mix must be in \[0, 1\)"),
    ({"num_successors": 40}, r"num_successors must be in \[1, vocab_size=30\]"),
    ({"concentration": 0.0}, "concentration > 0"),
])
def test_bad_language_arguments(kwargs, match):
  kwargs = {"vocab_size": 30, **kwargs}
  with pytest.raises(ValueError, match=match):
    synthetic.make_language(seed=0, **kwargs)


def test_bad_sample_arguments():
  lang = synthetic.make_language(5, seed=0, num_successors=2)
  with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
    synthetic.sample(lang, -1, seed=0)
  with pytest.raises(ValueError, match="num_chains must be >= 1, got 0"):
    synthetic.sample(lang, 10, seed=0, num_chains=0)
