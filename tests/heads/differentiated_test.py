"""Tests for lm_jax.heads.differentiated: the D-softmax head."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax.heads import differentiated

N, H = 5, 6
COUNTS_V = np.array([3, 40, 0, 7, 7, 100, 1, 2])  # ids not in frequency order; a tie (3, 4)
V = COUNTS_V.size
BANDS = [(2, 3), (3, 2), (-1, 1)]  # ranks 0-1: {5, 1}; ranks 2-4: {3, 4, 0}; rest: {7, 6, 2}


def _setup(bands=BANDS, seed=0, dtype=jnp.float32):
  head = differentiated.differentiated_softmax(COUNTS_V, bands)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape), dtype), shapes)
  hidden_NxH = jnp.asarray(rng.normal(0, 1.5, (N, H)), dtype)
  targets_N = jnp.asarray(rng.integers(0, V, N), jnp.int32)
  return head, params, hidden_NxH, targets_N


def _numpy_log_probs(params, hidden_NxH):
  """The per-band formula, word by word, in float64."""
  band_of_id = {5: (0, 0), 1: (0, 1), 3: (1, 0), 4: (1, 1), 0: (1, 2), 7: (2, 0), 6: (2, 1),
                2: (2, 2)}
  slices = [slice(0, 3), slice(3, 5), slice(5, 6)]
  h = np.asarray(hidden_NxH, np.float64)
  logits = np.zeros((N, V))
  for w, (band, row) in band_of_id.items():
    weight = np.asarray(params["band_weights"][band], np.float64)[row]
    logits[:, w] = h[:, slices[band]] @ weight + float(params["bias_V"][w])
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_equals_explicit_per_band_formula_and_is_normalised():
  head, params, hidden_NxH, targets_N = _setup()
  assert [w.shape for w in params["band_weights"]] == [(2, 3), (3, 2), (3, 1)]
  logp_NxV = head.log_probs(params, hidden_NxH)
  np.testing.assert_allclose(logp_NxV, _numpy_log_probs(params, hidden_NxH), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_NxV, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, targets_N),
                             logp_NxV[jnp.arange(N), targets_N], rtol=1e-5, atol=1e-6)


def test_loss_is_exact_and_masks():
  head, params, hidden_NxH, targets_N = _setup()
  where_N = jnp.array([True, False, True, True, False])
  loss_N = head.loss(params, hidden_NxH, targets_N, key=jax.random.PRNGKey(3), where=where_N)
  expected = -head.log_prob(params, hidden_NxH, targets_N)
  np.testing.assert_allclose(loss_N, jnp.where(where_N, expected, 0.0), rtol=1e-6)
  grads = jax.grad(lambda p, h: jnp.sum(head.loss(p, h, targets_N, where=jnp.zeros(N, bool))),
                   argnums=(0, 1))(params, hidden_NxH)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


def test_check_grads():
  with jax.enable_x64(True):
    head, params, hidden_NxH, targets_N = _setup(dtype=jnp.float64)
    where_N = jnp.array([True, True, False, True, True])
    f = lambda p, h: jnp.sum(jnp.arange(1.0, N + 1) * head.loss(p, h, targets_N, where=where_N))
    # Reverse mode only: the loss goes through the CE kernel's custom_vjp.
    check_grads(f, (params, hidden_NxH), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_token_chunked_loss_equals_one_chunk(monkeypatch):
  """Above 2^24 logits the loss runs over rematerialised token chunks; same values, grads."""
  head, params, hidden_NxH, targets_N = _setup()
  f = lambda p, h: jnp.sum(jnp.arange(1.0, N + 1) * head.loss(p, h, targets_N))
  value, grads = jax.value_and_grad(f, argnums=(0, 1))(params, hidden_NxH)
  monkeypatch.setattr(differentiated.base, "_UNFUSED_MAX_LOGITS", 2 * V)  # chunks of 2 tokens
  value_c, grads_c = jax.value_and_grad(f, argnums=(0, 1))(params, hidden_NxH)
  np.testing.assert_allclose(value_c, value, rtol=1e-6)
  for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_c, g, rtol=1e-5, atol=1e-6)


def test_sample_frequencies_match_probabilities():
  head, params, hidden_NxH, _ = _setup()
  draws = 4000
  samples_M = jax.jit(head.sample)(params, jnp.repeat(hidden_NxH[:1], draws, 0),
                                   jax.random.PRNGKey(5))
  probs_V = np.exp(np.asarray(head.log_probs(params, hidden_NxH[:1])[0], np.float64))
  counts_V = np.bincount(np.asarray(samples_M), minlength=V)
  assert scipy.stats.chisquare(counts_V, probs_V / probs_V.sum() * draws).pvalue > 1e-3
  assert scipy.stats.chisquare(counts_V, np.full(V, draws / V)).pvalue < 1e-6


def test_jit_and_vmap():
  head, params, hidden_NxH, targets_N = _setup()
  expected = head.loss(params, hidden_NxH, targets_N)
  np.testing.assert_allclose(jax.jit(head.loss)(params, hidden_NxH, targets_N), expected, rtol=1e-6)
  batched = jax.vmap(head.log_prob, in_axes=(None, 0, 0))(
      params, hidden_NxH[:4].reshape(2, 2, H), targets_N[:4].reshape(2, 2))
  np.testing.assert_allclose(batched.ravel(), -expected[:4], rtol=1e-5)


@settings(deadline=None, max_examples=30)
@given(hidden=hnp.arrays(np.float32, (3, H), elements=st.floats(-5, 5, width=32)),
       shift=st.floats(-10, 10, width=32))
def test_normalised_and_invariant_to_a_constant_bias_shift(hidden, shift):
  head, params, _, _ = _setup()
  logp = head.log_probs(params, hidden)
  np.testing.assert_allclose(jax.nn.logsumexp(logp, axis=-1), 0.0, atol=1e-5)
  shifted = {**params, "bias_V": params["bias_V"] + shift}
  np.testing.assert_allclose(head.log_probs(shifted, hidden), logp, atol=1e-4)


def test_default_bands_and_fewer_flops_than_full_softmax():
  head = differentiated.differentiated_softmax(np.arange(100, 0, -1))
  params = head.init(jax.random.PRNGKey(0), 16)
  shapes = [w.shape for w in params["band_weights"]]
  assert shapes == [(10, 8), (20, 4), (70, 4)]
  assert sum(n * d for n, d in shapes) == 440  # 0.275 V H < V H = 1600
  assert float(jnp.max(jnp.abs(params["band_weights"][0]))) <= 0.1
  assert params["bias_V"].shape == (100,)
  # Tiny vocabularies merge the empty bands' dims into the last band.
  assert [w.shape for w in differentiated.differentiated_softmax([4]).init(
      jax.random.PRNGKey(0), 5)["band_weights"]] == [(1, 5)]
  assert [w.shape for w in differentiated.differentiated_softmax([4, 2]).init(
      jax.random.PRNGKey(0), 8)["band_weights"]] == [(1, 4), (1, 4)]


def test_parse_bands():
  assert differentiated.parse_bands("2000:100,3000:60,-1:40") == ((2000, 100), (3000, 60), (-1, 40))
  with pytest.raises(ValueError, match=r"band '2000' in '2000,-1:40' is not 'num_words:dims'"):
    differentiated.parse_bands("2000,-1:40")
  with pytest.raises(ValueError, match=r"band 'a:3' in 'a:3' is not 'num_words:dims'"):
    differentiated.parse_bands("a:3")


def test_bad_bands_and_inputs_raise():
  make = differentiated.differentiated_softmax
  with pytest.raises(ValueError, match=r"band dims \(3, 2, 1\) sum to 6, but hidden_size is 7"):
    make(COUNTS_V, BANDS).init(jax.random.PRNGKey(0), 7)
  with pytest.raises(ValueError, match="bands take 8 words before the rest band .-1., but the "
                                       "vocabulary has only 8"):
    make(COUNTS_V, [(5, 3), (3, 2), (-1, 1)])
  with pytest.raises(ValueError, match=r"band num_words \(5, 5\) sum to 10, but the vocabulary has 8"):
    make(COUNTS_V, [(5, 3), (5, 3)])
  with pytest.raises(ValueError, match=r"every band needs num_words >= 1 .* got num_words \(0, -1\)"):
    make(COUNTS_V, [(0, 3), (-1, 3)])
  with pytest.raises(ValueError, match=r"every band needs num_words >= 1 .* got num_words \(-1, 8\)"):
    make(COUNTS_V, [(-1, 3), (8, 3)])
  with pytest.raises(ValueError, match=r"every band needs dims >= 1, got dims \(6, 0\)"):
    make(COUNTS_V, [(4, 6), (-1, 0)])
  with pytest.raises(ValueError, match="bands must be a non-empty sequence"):
    make(COUNTS_V, [])
  with pytest.raises(ValueError, match="counts must be a non-empty .V. vector of non-negative"):
    make([3, -1])
  head, params, hidden_NxH, targets_N = _setup()
  with pytest.raises(ValueError, match=r"hidden_NxH has width H=4, but the head's params were made for H=6 \(shape \(5, 4\)\)"):
    head.log_probs(params, hidden_NxH[:, :4])
  with pytest.raises(ValueError, match="target 8 at index 0 is out of range for vocabulary size V=8"):
    head.loss(params, hidden_NxH, targets_N.at[0].set(8))
