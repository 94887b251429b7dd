"""Tests for lm_jax.maxent.ngram: hashed n-gram contexts, merged examples and add-k count baselines."""
import collections

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.maxent import loglinear, ngram


@settings(deadline=None, max_examples=30)
@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=60), max_order=st.integers(1, 4))
def test_hashed_contexts_identify_histories(tokens, max_order):
  # Naive reference: a dict from (order, history tuple) to bucket must be a function, and with
  # a huge table distinct histories get distinct buckets (no collisions on tiny data).
  tokens = np.array(tokens)
  ctx = ngram.hashed_ngram_contexts(tokens, max_order=max_order, num_buckets=2**31)
  assert ctx.shape == (len(tokens), max_order) and ctx.dtype == np.int32
  seen = {}
  for t in range(len(tokens)):
    assert ctx[t, 0] == 0
    for k in range(1, max_order):
      if t < k:
        assert ctx[t, k] == -1
        continue
      key = (k, tuple(tokens[t - k:t]))
      assert seen.setdefault(key, ctx[t, k]) == ctx[t, k]
      assert ctx[t, k] >= 1
  assert len(set(seen.values())) == len(seen)


def test_hashed_contexts_buckets_in_range_and_golden():
  rng = np.random.default_rng(0)
  ctx = ngram.hashed_ngram_contexts(rng.integers(0, 50, 5000), max_order=5, num_buckets=97)
  assert ctx[4:, 1:].min() >= 1 and ctx.max() <= 96
  assert len(np.unique(ctx[4:, 4])) > 90  # the hash spreads over the table
  # Golden values: change them only if the hash function is changed on purpose (it changes
  # every fitted MaxEnt model's feature ids).
  np.testing.assert_array_equal(
      ngram.hashed_ngram_contexts(np.array([0, 1, 2]), max_order=3, num_buckets=1000),
      [[0, -1, -1], [0, 363, -1], [0, 122, 368]])


def _python_bucket(history, num_buckets):
  """The documented hash in plain Python ints: SplitMix64 chained from x_{t-1} back to x_{t-k}."""
  def mix(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)
  h = 0
  for k, token in enumerate(reversed(history), start=1):
    h = mix(h ^ mix((token + 1 + 0x9E3779B97F4A7C15 * k) % 2**64))
  return 1 + h % (num_buckets - 1)


def test_hash_matches_a_plain_python_reference():
  tokens = np.random.default_rng(3).integers(0, 1000, 50)
  ctx = ngram.hashed_ngram_contexts(tokens, max_order=4, num_buckets=12345)
  for t in range(3, 50):
    for k in range(1, 4):
      assert ctx[t, k] == _python_bucket([int(x) for x in tokens[t - k:t]], 12345), (t, k)


def test_unique_examples_and_char_ids():
  ctx = np.array([[0, 5], [0, 5], [0, 7], [0, 5]])
  rows, labels, counts = ngram.unique_examples(ctx, np.array([1, 1, 1, 2]))
  got = sorted((tuple(r), int(y), int(c)) for r, y, c in zip(rows, labels, counts))
  assert got == [((0, 5), 1, 2), ((0, 5), 2, 1), ((0, 7), 1, 1)]
  np.testing.assert_array_equal(ngram.char_ids("abca!", ["a", "b", "c"]), [0, 1, 2, 0, 3])


def test_counts_and_add_k_against_python_loops():
  tokens = np.random.default_rng(1).integers(0, 4, 300)
  bigrams = ngram.ngram_counts(tokens, order=2, vocab_size=4)
  ref = collections.Counter(zip(tokens[:-1], tokens[1:]))
  for (a, b), c in ref.items():
    assert bigrams[a, b] == c
  assert bigrams.sum() == 299
  np.testing.assert_array_equal(ngram.ngram_counts(tokens, order=1, vocab_size=4),
                                np.bincount(tokens, minlength=4))
  lp = ngram.add_k_log_probs(bigrams, k=0.5)
  np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0)
  np.testing.assert_allclose(lp[2, 3], np.log((bigrams[2, 3] + 0.5) / (bigrams[2].sum() + 2.0)))
  per_token = ngram.ngram_token_log_probs(lp, tokens, start=10)
  np.testing.assert_allclose(per_token, [lp[tokens[t - 1], tokens[t]] for t in range(10, 300)])
  unigram = ngram.ngram_token_log_probs(ngram.add_k_log_probs(bigrams.sum(0)), tokens, start=0)
  assert unigram.shape == (300,)


def test_maxent_bigram_without_collisions_or_l2_is_the_relative_frequency_bigram():
  # With exact features, the ML MaxEnt bigram matches every bigram count: p(y | h) = c(h, y) / c(h).
  with jax.enable_x64(True):
    tokens = np.random.default_rng(2).integers(0, 3, 400)
    ctx = ngram.hashed_ngram_contexts(tokens, max_order=2, num_buckets=2**31)[1:]
    rows, labels, counts = ngram.unique_examples(ctx, tokens[1:])
    uniq, ids = np.unique(rows[:, 1], return_inverse=True)  # compact the used buckets
    rows = np.stack([rows[:, 0], 1 + ids], 1)
    feats = loglinear.ContextFeatures(jnp.asarray(rows), 1 + len(uniq), 3)
    w, info = loglinear.fit(feats, jnp.asarray(labels), where=jnp.asarray(counts), tol=1e-10,
                            w0=jnp.zeros(loglinear.weights_shape(feats)))
    assert bool(info.converged)
    bigrams = ngram.ngram_counts(tokens, order=2, vocab_size=3)
    rel = bigrams / bigrams.sum(1, keepdims=True)
    p = np.exp(loglinear.log_probs(w, feats))
    prev = tokens[:-1][np.unique(np.concatenate([ctx, tokens[1:, None]], 1), axis=0,
                                 return_index=True)[1]]  # the history of each merged row
    np.testing.assert_allclose(p, rel[prev], atol=1e-7)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"tokens_T must be a rank-1 integer array, got shape \(2, 2\)"):
    ngram.hashed_ngram_contexts(np.zeros((2, 2), int), max_order=2, num_buckets=8)
  with pytest.raises(ValueError, match="non-negative ids, got -1"):
    ngram.ngram_counts(np.array([0, -1]), order=1, vocab_size=3)
  with pytest.raises(ValueError, match=r"need max_order >= 1 and 2 <= num_buckets <= 2\*\*31 \(int32 ids\), got 0, 8"):
    ngram.hashed_ngram_contexts(np.array([1]), max_order=0, num_buckets=8)
  with pytest.raises(ValueError, match="ids < vocab_size=3, got order 2, max id 3"):
    ngram.ngram_counts(np.array([0, 3]), order=2, vocab_size=3)
  with pytest.raises(ValueError, match="k must be > 0, got 0"):
    ngram.add_k_log_probs(np.ones(3), k=0.0)
  with pytest.raises(ValueError, match=r"start must lie in \[1, 3\] for an order-2 table, got 0"):
    ngram.ngram_token_log_probs(np.zeros((2, 2)), np.array([0, 1, 1]), start=0)
  with pytest.raises(ValueError, match=r"got shapes \(2, 1\) and \(3,\)"):
    ngram.unique_examples(np.zeros((2, 1), int), np.zeros(3, int))
  with pytest.raises(ValueError, match="chars must be distinct"):
    ngram.char_ids("ab", ["a", "a"])
