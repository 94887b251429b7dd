"""Tests for lm_jax.heads.sampled: NCE, negative sampling and sampled softmax."""
import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax.heads import base
from lm_jax.heads import noise
from lm_jax.heads import sampled

N, H, V, K = 3, 3, 5, 4
TARGETS_N = np.array([0, 2, 4])
SHARED_K = np.array([1, 2, 2, 3])  # token 1's target (2) is drawn twice: accidental hits
PER_TOKEN_NxK = np.array([[0, 1, 3, 3], [2, 4, 1, 0], [4, 4, 4, 2]])
with np.errstate(divide="ignore"):
  LOG_Q_V = np.log(np.array([0.4, 0.3, 0.15, 0.15, 0.0]))  # id 4 has q = 0 (a zero-count id)

FACTORIES = {
    "nce": lambda d, k, **kw: sampled.nce(d, k, **kw),
    "nce_fixed": lambda d, k, **kw: sampled.nce(d, k, log_z=1.5, **kw),
    "nce_learned": lambda d, k, **kw: sampled.nce(d, k, log_z="learned", **kw),
    "neg": lambda d, k, **kw: sampled.negative_sampling(d, k, **kw),
    "sampled": lambda d, k, **kw: sampled.sampled_softmax(d, k, **kw),
    "sampled_keep_hits": lambda d, k, **kw: sampled.sampled_softmax(
        d, k, remove_accidental_hits=False, **kw),
}


def _fixed_noise(draws):
  """A noise distribution with ``LOG_Q_V`` whose 'draws' are always ``draws``."""
  log_q_V = jnp.asarray(LOG_Q_V, jnp.float32)
  return noise.NoiseDistribution(V, log_q_V, lambda key, shape: jnp.asarray(draws).reshape(shape),
                                 lambda ids: log_q_V[jnp.asarray(ids)])


def _params(head, seed=0, dtype=jnp.float32, hidden_size=H):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: head.init(k, hidden_size), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape), dtype), shapes)
  hidden_NxH = jnp.asarray(rng.normal(0, 1, (N, hidden_size)), dtype)
  return params, hidden_NxH


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _numpy_loss(name, params, hidden_NxH, targets_N, draws_NxK, log_q_V):
  """The losses written out token by token in float64."""
  w = np.asarray(params["weight_VxH"], np.float64)
  b = np.asarray(params["bias_V"], np.float64)
  log_z = {"nce": 0.0, "nce_fixed": 1.5}.get(name, float(params.get("log_z", 0.0)))
  log_kq = np.log(draws_NxK.shape[1]) + np.maximum(log_q_V, -50.0)
  out = []
  for n in range(len(targets_N)):
    s = w @ np.asarray(hidden_NxH[n], np.float64) + b
    t, js = targets_N[n], draws_NxK[n]
    if name.startswith("nce"):
      logit = lambda i: s[i] - log_z - log_kq[i]
      out.append(-_log_sigmoid(logit(t)) - sum(_log_sigmoid(-logit(j)) for j in js))
    elif name == "neg":
      out.append(-_log_sigmoid(s[t]) - sum(_log_sigmoid(-s[j]) for j in js))
    else:
      o = [s[t] - log_kq[t]] + [s[j] - log_kq[j] for j in js
                                if name == "sampled_keep_hits" or j != t]
      out.append(np.log(np.sum(np.exp(o))) - o[0])
  return np.array(out)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("name", FACTORIES)
def test_losses_equal_their_formulas_on_hand_made_draws(name, shared):
  draws = SHARED_K if shared else PER_TOKEN_NxK
  head = FACTORIES[name](_fixed_noise(draws), K, shared_samples=shared)
  params, hidden_NxH = _params(head)
  loss_N = head.loss(params, hidden_NxH, jnp.asarray(TARGETS_N))
  draws_NxK = np.broadcast_to(draws, (N, K))
  expected = _numpy_loss(name, params, hidden_NxH, TARGETS_N, draws_NxK, LOG_Q_V)
  assert np.all(np.isfinite(expected))  # the q = 0 target (id 4) is floored, not NaN
  np.testing.assert_allclose(loss_N, expected, rtol=1e-5, atol=1e-5)


def test_accidental_hits_change_sampled_softmax_only_where_they_occur():
  kept = FACTORIES["sampled_keep_hits"](_fixed_noise(SHARED_K), K)
  removed = FACTORIES["sampled"](_fixed_noise(SHARED_K), K)
  params, hidden_NxH = _params(kept)
  delta = removed.loss(params, hidden_NxH, TARGETS_N) - kept.loss(params, hidden_NxH, TARGETS_N)
  assert delta[1] < -1e-3  # removing the two hits of the target lowers the loss
  np.testing.assert_allclose(delta[jnp.array([0, 2])], 0.0, atol=1e-6)


@pytest.mark.parametrize("name, shared", [("nce_learned", True), ("neg", False),
                                          ("sampled", True), ("sampled", False)])
def test_real_draws_match_formula_and_key_semantics(name, shared):
  unigram = noise.unigram_noise([9, 5, 3, 2, 0])
  head = FACTORIES[name](unigram, 6, shared_samples=shared)
  params, hidden_NxH = _params(head)
  targets_N = jnp.asarray(TARGETS_N)
  key = jax.random.PRNGKey(7)
  _, index, ((_, draws, *_), _) = head.sparse.gather(params, targets_N, key)  # (aux, bad_N)
  assert draws.shape == ((6,) if shared else (N, 6))
  assert index["weight_VxH"].shape == ((N + 6,) if shared else (N * 7,))
  assert not np.any(np.asarray(draws) == 4)  # q = 0: never drawn
  expected = _numpy_loss(name, params, hidden_NxH, TARGETS_N,
                         np.broadcast_to(np.asarray(draws), (N, 6)), np.asarray(unigram.log_probs_V))
  loss_N = jax.jit(head.loss)(params, hidden_NxH, targets_N, key=key)
  np.testing.assert_allclose(loss_N, expected, rtol=1e-5, atol=1e-5)
  # key=None is a fixed key (PRNGKey(0)): deterministic, and other keys give other draws.
  np.testing.assert_array_equal(head.loss(params, hidden_NxH, targets_N),
                                head.loss(params, hidden_NxH, targets_N, key=jax.random.PRNGKey(0)))
  others = [head.loss(params, hidden_NxH, targets_N, key=jax.random.PRNGKey(i)) for i in range(3)]
  assert not np.allclose(others[1], others[2])


@pytest.mark.parametrize("name", FACTORIES)
def test_masking_gives_zero_loss_and_zero_gradient(name):
  head = FACTORIES[name](noise.uniform_noise(V), K, shared_samples=False)
  params, hidden_NxH = _params(head)
  where_N = jnp.array([True, False, True])
  loss_N = head.loss(params, hidden_NxH, TARGETS_N, where=where_N)
  np.testing.assert_array_equal(loss_N[1], 0.0)
  np.testing.assert_array_equal(loss_N[jnp.array([0, 2])],
                                head.loss(params, hidden_NxH, TARGETS_N)[jnp.array([0, 2])])
  grads = jax.grad(lambda p, h: jnp.sum(head.loss(p, h, TARGETS_N, where=jnp.zeros(N, bool))),
                   argnums=(0, 1))(params, hidden_NxH)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("name, shared", [
    ("nce_learned", True), pytest.param("neg", False),
    pytest.param("sampled", True), ("sampled", False)])
def test_check_grads(name, shared):
  with jax.enable_x64(True):
    head = FACTORIES[name](noise.log_uniform_noise(V), K, shared_samples=shared)
    params, hidden_NxH = _params(head, dtype=jnp.float64)
    weights_N = jnp.array([1.0, -2.0, 0.5])
    f = lambda p, h: jnp.sum(weights_N * head.loss(p, h, TARGETS_N, key=jax.random.PRNGKey(3),
                                                   where=jnp.array([True, True, False])))
    check_grads(f, (params, hidden_NxH), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("name", ["nce_learned", "neg", "sampled"])
def test_sparse_sgd_step_equals_dense_sgd_step(name, shared):
  head = FACTORIES[name](noise.uniform_noise(V), K, shared_samples=shared)
  params, hidden_NxH = _params(head)
  key, where_N, lr = jax.random.PRNGKey(11), jnp.array([True, True, False]), 0.3

  def mean_loss(p, h):
    return jnp.sum(head.loss(p, h, TARGETS_N, key=key, where=where_N)) / 2.0

  grad_params, grad_hidden = jax.grad(mean_loss, argnums=(0, 1))(params, hidden_NxH)
  dense = jax.tree.map(lambda p, g: p - lr * g, params, grad_params)
  step = jax.jit(functools.partial(base.sparse_sgd_step, head, key=key, where=where_N))
  new_params, loss_N, sparse_grad_hidden = step(params, hidden_NxH, TARGETS_N, lr)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(dense)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(sparse_grad_hidden, grad_hidden, atol=1e-6)
  np.testing.assert_allclose(loss_N, head.loss(params, hidden_NxH, TARGETS_N, key=key,
                                               where=where_N), atol=1e-6)


@pytest.mark.parametrize("name", FACTORIES)
def test_evaluation_is_the_exact_full_softmax(name):
  """Full softmax of the scores; for negative sampling of the scores plus log q."""
  counts = np.array([50, 20, 9, 1, 0])  # q(4) = 0: floored at q(3) for evaluation
  unigram = noise.unigram_noise(counts)
  head = FACTORIES[name](unigram, K)
  params, hidden_NxH = _params(head)
  full = base.full_softmax(V)
  offset_V = np.zeros(V)
  if name == "neg":
    q_V = counts ** 0.75 / np.sum(counts ** 0.75)
    offset_V = np.log(np.where(q_V > 0, q_V, q_V[3]))
  plain = {"weight_VxH": params["weight_VxH"], "bias_V": params["bias_V"] + offset_V}
  np.testing.assert_allclose(head.log_probs(params, hidden_NxH), full.log_probs(plain, hidden_NxH),
                             rtol=1e-6)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, TARGETS_N),
                             full.log_prob(plain, hidden_NxH, TARGETS_N), rtol=1e-6)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(head.sample(params, hidden_NxH, key),
                                full.sample(plain, hidden_NxH, key))


@pytest.mark.parametrize("shared", [True, False])
def test_negative_sampling_evaluation_recovers_p_at_the_optimum(shared):
  """At s_w = log p(w|x) - log(k q(w)), NEG's minimiser, evaluation returns log p exactly."""
  rng = np.random.default_rng(3)
  unigram = noise.unigram_noise(np.array([40, 25, 10, 4, 1]))
  head = sampled.negative_sampling(unigram, K, shared_samples=shared)
  log_p_V = np.log(rng.dirichlet(np.ones(V)))
  params = {"weight_VxH": jnp.zeros((V, H)),
            "bias_V": jnp.asarray(log_p_V - np.log(K) - np.asarray(unigram.log_probs_V),
                                  jnp.float32)}
  hidden_NxH = jnp.asarray(rng.normal(size=(N, H)), jnp.float32)
  np.testing.assert_allclose(head.log_probs(params, hidden_NxH),
                             np.broadcast_to(log_p_V, (N, V)), atol=1e-5)
  # ... and it is the minimiser: the expected loss's gradient in each s_w is 0 there.
  s_V = params["bias_V"]
  expected = lambda s: jnp.sum(jnp.exp(log_p_V) * -jax.nn.log_sigmoid(s)
                               + K * jnp.exp(unigram.log_probs_V) * -jax.nn.log_sigmoid(-s))
  np.testing.assert_allclose(jax.grad(expected)(s_V), np.zeros(V), atol=1e-5)


def test_noise_log_prior_floors_zero_probability_ids():
  prior_V = sampled.noise_log_prior(noise.unigram_noise(np.array([8, 1, 0])))
  np.testing.assert_allclose(prior_V, np.log([8 ** 0.75 / (8 ** 0.75 + 1)] + [1 / (8 ** 0.75 + 1)] * 2),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="probability 0"):
    sampled.noise_log_prior(noise.NoiseDistribution(2, jnp.full(2, -jnp.inf), None, None))


def test_init_shapes_and_learned_log_z():
  for name, head in [("nce_learned", FACTORIES["nce_learned"](noise.uniform_noise(V), K)),
                     ("neg", FACTORIES["neg"](noise.uniform_noise(V), K))]:
    params = head.init(jax.random.PRNGKey(0), 8)
    assert params["weight_VxH"].shape == (V, 8) and params["bias_V"].shape == (V,)
    assert float(jnp.max(jnp.abs(params["weight_VxH"]))) <= 0.1
    assert ("log_z" in params) == (name == "nce_learned")
  head = FACTORIES["nce_learned"](noise.uniform_noise(V), K)
  params, hidden_NxH = _params(head)
  grads = jax.grad(lambda p: jnp.sum(head.loss(p, hidden_NxH, TARGETS_N)))(params)
  assert grads["log_z"].shape == () and abs(float(grads["log_z"])) > 1e-4


@pytest.mark.parametrize("name", FACTORIES)
def test_init_is_the_uniform_model_at_its_own_optimum(name):
  """Initial scores (bias offsets, log Z) minimise each loss's expectation for p = 1/V,
  up to the +-init_scale random part, and evaluate to the uniform distribution."""
  counts = np.array([50, 20, 9, 1, 3])
  unigram = noise.unigram_noise(counts)
  head = FACTORIES[name](unigram, K, init_scale=1e-6)
  params = head.init(jax.random.PRNGKey(0), H)
  zero_NxH = jnp.zeros((1, H))
  np.testing.assert_allclose(head.log_probs(params, zero_NxH), np.full((1, V), -np.log(V)),
                             atol=1e-5)
  log_kq_V = np.log(K) + np.asarray(unigram.log_probs_V)
  s_V = np.asarray(params["bias_V"], np.float64)
  if name.startswith("nce"):
    z = {"nce": 0.0, "nce_fixed": 1.5}.get(name, float(params.get("log_z", 0.0)))
    logit_V = s_V - z - log_kq_V
  elif name == "neg":
    logit_V = s_V
  else:
    return  # sampled softmax: any constant score is its uniform optimum (checked above)
  # expected loss sum_w (1/V) (-log sig(l_w)) + k q(w) (-log sig(-l_w)) is stationary:
  grad_V = -(1 / V) / (1 + np.exp(logit_V)) + np.exp(log_kq_V) / (1 + np.exp(-logit_V))
  np.testing.assert_allclose(grad_V, np.zeros(V), atol=1e-5)


def test_sampled_softmax_gradient_approaches_full_softmax_with_many_uniform_draws():
  head = sampled.sampled_softmax(noise.uniform_noise(V), 8000, remove_accidental_hits=False)
  params, hidden_NxH = _params(head)
  full = base.full_softmax(V)
  sampled_grad = jax.grad(lambda h: jnp.sum(head.loss(params, h, TARGETS_N)))(hidden_NxH)
  full_grad = jax.grad(lambda h: jnp.sum(full.loss(params, h, TARGETS_N)))(hidden_NxH)
  np.testing.assert_allclose(sampled_grad, full_grad, atol=0.05)
  assert np.abs(np.asarray(full_grad)).max() > 0.2


@settings(deadline=None, max_examples=30)
@given(scores=hnp.arrays(np.float32, (N, H), elements=st.floats(-3, 3, width=32)),
       shift=st.floats(-5, 5, width=32))
def test_nce_logit_shift_by_log_z_equals_bias_shift(scores, shift):
  """The NCE loss depends on s - log Z only: a fixed log Z equals the opposite bias shift."""
  with_z = sampled.nce(_fixed_noise(SHARED_K), K, log_z=float(shift))
  without = sampled.nce(_fixed_noise(SHARED_K), K, log_z=0.0)
  params, _ = _params(without)
  shifted = {**params, "bias_V": params["bias_V"] - shift}
  np.testing.assert_allclose(with_z.loss(params, scores, TARGETS_N),
                             without.loss(shifted, scores, TARGETS_N), rtol=1e-4, atol=1e-4)


def test_bf16_inputs_compute_in_float32():
  head = sampled.sampled_softmax(_fixed_noise(SHARED_K), K)
  params, hidden_NxH = _params(head, dtype=jnp.bfloat16)
  loss_N = head.loss(params, hidden_NxH, TARGETS_N)
  assert loss_N.dtype == jnp.float32
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  np.testing.assert_allclose(loss_N, head.loss(as_f32, hidden_NxH.astype(jnp.float32), TARGETS_N),
                             rtol=1e-5)


def test_bad_inputs_raise():
  uniform = noise.uniform_noise(V)
  with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
    sampled.nce(uniform, 0)
  with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 2.5"):
    sampled.sampled_softmax(uniform, 2.5)
  with pytest.raises(ValueError, match="log_z must be a float or 'learned', got 'learn'"):
    sampled.nce(uniform, 3, log_z="learn")
  with pytest.raises(ValueError, match="noise must be a NoiseDistribution, got ndarray"):
    sampled.negative_sampling(np.ones(V), 3)
  head = sampled.negative_sampling(uniform, 3)
  params, hidden_NxH = _params(head)
  with pytest.raises(ValueError, match="target 5 at index 2 is out of range for vocabulary size V=5"):
    head.loss(params, hidden_NxH, jnp.array([0, 1, 5]))
  with pytest.raises(ValueError, match=r"targets_N has shape \(2,\), expected \[N\]"):
    head.loss(params, hidden_NxH, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"hidden_NxH must have rank 2 \[N, H\]"):
    head.loss(params, hidden_NxH[0], jnp.array([0, 1, 2]))
