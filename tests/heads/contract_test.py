"""Tests for lm_jax.heads: the OutputHead contract, checked on every head factory."""
import platform
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax import heads

N, H, V = 6, 4, 7
COUNTS_V = np.array([0, 3, 1, 9, 5, 2, 7])  # a zero count (like <pad>), ids not sorted
# Every head gets the contract tests; the sampled heads' loss is a training objective, not
# -log_prob, so the exactness test skips them.
HEAD_FACTORIES = {
    "full_softmax": lambda v: heads.full_softmax(v, init_scale=0.5),
    "class_mass": lambda v: heads.make_head("class", vocab_size=v, counts=COUNTS_V,
                                            binning="mass"),
    "class_sqrt": lambda v: heads.make_head("class", vocab_size=v, counts=COUNTS_V,
                                            binning="sqrt", num_classes=2),
    "class_equal": lambda v: heads.make_head("class", vocab_size=v, counts=COUNTS_V,
                                             binning="equal", num_classes=3),
    "hsm_huffman": lambda v: heads.make_head("hsm", vocab_size=v, counts=COUNTS_V),
    "hsm_balanced": lambda v: heads.make_head("hsm", vocab_size=v, counts=COUNTS_V,
                                              tree="balanced"),
    "hsm_class_tree": lambda v: heads.make_head("hsm", vocab_size=v, counts=COUNTS_V,
                                                tree="class", num_classes=3),
    "dsoftmax": lambda v: heads.make_head("dsoftmax", vocab_size=v, counts=COUNTS_V),
    "nce": lambda v: heads.make_head("nce", vocab_size=v, counts=COUNTS_V, num_samples=3),
    "neg": lambda v: heads.make_head("neg", vocab_size=v, counts=COUNTS_V, num_samples=3,
                                     noise="log_uniform"),
    "sampled": lambda v: heads.make_head("sampled", vocab_size=v, counts=COUNTS_V,
                                         num_samples=3, noise="uniform"),
    "adaptive": lambda v: heads.make_head("adaptive", vocab_size=v, counts=COUNTS_V,
                                          cutoffs=[2, 4], div_value=2.0),
    "adaptive_default": lambda v: heads.make_head("adaptive", vocab_size=v, counts=COUNTS_V),
    "classtree": lambda v: heads.make_head("classtree", vocab_size=v, counts=COUNTS_V, levels=2),
    "classtree_3": lambda v: heads.make_head("classtree", vocab_size=v, counts=COUNTS_V,
                                             levels=3),
}
# The accelerator forms (what GPU and TPU run; lm_jax.ops.platform), forced on this CPU so
# that CI tests them too: the gathered class windows, one-chunk tree paths, the banded fused
# D-softmax, the adaptive clusters as masked dense math (the full softmax's fused form is
# tested in tests/ops/fused_test.py; at these sizes the head materialises its logits).
HEAD_FACTORIES.update({
    f"{name}_accelerator": (lambda v, make=make: make(v, "accelerator"))
    for name, make in {
        "class_equal": lambda v, i: heads.make_head("class", vocab_size=v, counts=COUNTS_V,
                                                    num_classes=3, implementation=i),
        "hsm_huffman": lambda v, i: heads.make_head("hsm", vocab_size=v, counts=COUNTS_V,
                                                    implementation=i),
        "dsoftmax": lambda v, i: heads.make_head("dsoftmax", vocab_size=v, counts=COUNTS_V,
                                                 implementation=i),
        "adaptive": lambda v, i: heads.make_head("adaptive", vocab_size=v, counts=COUNTS_V,
                                                 cutoffs=[2, 4], div_value=2.0,
                                                 implementation=i),
        "adaptive_default": lambda v, i: heads.make_head("adaptive", vocab_size=v,
                                                         counts=COUNTS_V, implementation=i),
    }.items()})
SAMPLED = ("nce", "neg", "sampled")
ALL_HEADS = list(HEAD_FACTORIES)  # every variant runs in CI
# Where lm_jax.ops.allocator's CPU default takes effect (the benchmarks report what it did).
_GLIBC_CPU = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _setup(factory_name, seed=0, dtype=jnp.float32):
  """Params shaped like ``head.init``'s, drawn with NumPy (compiling threefry for every
  test's init would dominate run time; ``init`` is tested on its own)."""
  head = HEAD_FACTORIES[factory_name](V)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(-0.5, 0.5, s.shape), dtype), shapes)
  hidden_NxH = jnp.asarray(rng.normal(0.0, 2.0, (N, H)), dtype)
  targets_N = jnp.asarray(rng.integers(0, V, (N,)), jnp.int32)
  return head, params, hidden_NxH, targets_N


@pytest.mark.parametrize("name", ALL_HEADS)
def test_log_probs_normalised_and_log_prob_is_gathered(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  logp_NxV = head.log_probs(params, hidden_NxH)
  assert logp_NxV.shape == (N, V)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_NxV, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, targets_N),
                             logp_NxV[jnp.arange(N), targets_N], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_deterministic_loss_is_minus_log_prob_and_masks_to_zero(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  where_N = jnp.array([True, False, True, True, False, True])
  loss_N = head.loss(params, hidden_NxH, targets_N, where=where_N)
  expected_N = -head.log_prob(params, hidden_NxH, targets_N)
  assert np.all(np.asarray(expected_N) > 0)
  if name in SAMPLED:  # a training objective: deterministic without a key, masked, finite
    np.testing.assert_array_equal(loss_N, head.loss(params, hidden_NxH, targets_N, where=where_N))
    np.testing.assert_array_equal(np.asarray(loss_N)[~np.asarray(where_N)], 0.0)
    assert np.all(np.isfinite(np.asarray(loss_N)))
  else:
    np.testing.assert_allclose(loss_N, jnp.where(where_N, expected_N, 0.0), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(head.loss(p, hidden_NxH, targets_N, where=jnp.zeros(N, bool))))(params)
  for g in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


def test_full_softmax_matches_numpy_float64():
  head, params, hidden_NxH, targets_N = _setup("full_softmax")
  logits = np.asarray(hidden_NxH, np.float64) @ np.asarray(params["weight_VxH"], np.float64).T
  logits += np.asarray(params["bias_V"], np.float64)
  logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  np.testing.assert_allclose(head.log_probs(params, hidden_NxH), logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                             -logp[np.arange(N), np.asarray(targets_N)], rtol=1e-5, atol=1e-5)
  assert set(params) == {"weight_VxH", "bias_V"} and params["weight_VxH"].shape == (V, H)


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_frequencies_match_probabilities(name, temperature):
  head, params, hidden_NxH, _ = _setup(name)
  draws = 4000
  hidden_MxH = jnp.repeat(hidden_NxH[:1], draws, axis=0)
  samples_M = jax.jit(lambda h, k: head.sample(params, h, k, temperature=temperature))(
      hidden_MxH, jax.random.PRNGKey(42))
  assert samples_M.shape == (draws,) and samples_M.dtype == jnp.int32
  probs_V = np.asarray(jax.nn.softmax(head.log_probs(params, hidden_NxH[:1])[0] / temperature),
                       np.float64)
  counts_V = np.bincount(np.asarray(samples_M), minlength=V)
  assert scipy.stats.chisquare(counts_V, probs_V / probs_V.sum() * draws).pvalue > 1e-3
  # The same counts reject the untempered (or, at temperature 1, a flattened) distribution.
  other_scale = 0.5 if temperature == 1.0 else 1.0
  other_V = np.asarray(jax.nn.softmax(head.log_probs(params, hidden_NxH[:1])[0] * other_scale),
                       np.float64)
  assert scipy.stats.chisquare(counts_V, other_V / other_V.sum() * draws).pvalue < 1e-6


@pytest.mark.parametrize("name", ALL_HEADS)
def test_temperature_zero_is_argmax_even_when_traced(name):
  head, params, hidden_NxH, _ = _setup(name)
  expected_N = jnp.argmax(head.log_probs(params, hidden_NxH), axis=-1)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(head.sample(params, hidden_NxH, key, temperature=0.0), expected_N)
  traced = jax.jit(lambda t: head.sample(params, hidden_NxH, key, temperature=t))
  np.testing.assert_array_equal(traced(0.0), expected_N)
  # A tiny positive temperature is (almost surely) greedy too; a huge one is not.
  np.testing.assert_array_equal(traced(1e-4), expected_N)
  spread_M = head.sample(params, jnp.repeat(hidden_NxH[:1], 200, 0), key, temperature=1e4)
  assert len(np.unique(np.asarray(spread_M))) == V
  with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
    head.sample(params, hidden_NxH, key, temperature=-1.0)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_check_grads_of_loss(name):
  with jax.enable_x64(True):
    head, params, hidden_NxH, targets_N = _setup(name, dtype=jnp.float64)
    where_N = jnp.array([True, True, False, True, True, True])
    f = lambda p, h: jnp.sum(head.loss(p, h, targets_N, where=where_N))
    check_grads(f, (params, hidden_NxH), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    # A non-uniform cotangent takes the other backward path of the fused kernel.
    g = lambda p, h: jnp.sum(jnp.arange(N) * head.loss(p, h, targets_N, where=where_N))
    check_grads(g, (params, hidden_NxH), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_jit_and_vmap(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  np.testing.assert_allclose(jax.jit(head.loss)(params, hidden_NxH, targets_N),
                             head.loss(params, hidden_NxH, targets_N), rtol=1e-6)
  expected_N = -head.log_prob(params, hidden_NxH, targets_N)
  batched = jax.vmap(head.log_prob, in_axes=(None, 0, 0))(
      params, hidden_NxH.reshape(2, N // 2, H), targets_N.reshape(2, N // 2))
  np.testing.assert_allclose(batched.ravel(), -expected_N, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_bfloat16_inputs_computed_in_float32_and_per_token_vmap(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  loss_N = head.loss(params, hidden_NxH, targets_N)
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hidden_bf16 = hidden_NxH.astype(jnp.bfloat16)
  loss_bf16 = head.loss(params_bf16, hidden_bf16, targets_N)
  logp_bf16 = head.log_prob(params_bf16, hidden_bf16, targets_N)
  assert loss_bf16.dtype == jnp.float32 and logp_bf16.dtype == jnp.float32
  # Against the float32 result on the same (rounded) inputs: only the rounding of the inputs
  # differs, so float32 arithmetic inside gives agreement to float32 accuracy.
  rounded = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  np.testing.assert_allclose(loss_bf16, head.loss(rounded(params_bf16), rounded(hidden_bf16),
                                                  targets_N), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_bf16, loss_N, rtol=0.05)
  grads = jax.grad(lambda p: jnp.sum(head.loss(p, hidden_bf16, targets_N)))(params_bf16)
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  vmapped = jax.jit(jax.vmap(lambda h, t: head.loss(params, h, t)))(
      hidden_NxH[:, None], targets_N[:, None])[:, 0]
  if name not in SAMPLED:  # a sampled loss depends on the rows drawn with it
    np.testing.assert_allclose(vmapped, loss_N, rtol=1e-6)


# The target contract (heads.base.check_targets), for every head in HEAD_NAMES.

def test_contract_suite_covers_every_head_name():
  kinds = {name.split("_")[0] for name in HEAD_FACTORIES} | {"full"}
  assert set(heads.HEAD_NAMES) <= kinds, set(heads.HEAD_NAMES) - kinds


@pytest.mark.parametrize("name", ALL_HEADS)
def test_padding_under_where_false_gives_zero_loss_and_gradient_whatever_its_id_and_hidden(name):
  """Ignored rows carry padding ids (-1, V, 10**6) and NaN / +Inf / -Inf hidden states (a
  fully masked attention row): loss 0 there, and the loss and every gradient (params and
  hidden) equal those of clean inputs, finite, with exactly zero hidden gradient there."""
  head, params, hidden_NxH, targets_N = _setup(name)
  where_N = jnp.array([True, False, True, False, True, False])
  ignored = ~np.asarray(where_N)
  padded_N = jnp.where(where_N, targets_N, jnp.array([0, -1, 0, V, 0, 10**6]))
  poisoned_NxH = hidden_NxH.at[1, 0].set(jnp.nan).at[3].set(jnp.inf).at[5, 1].set(-jnp.inf)
  key = jax.random.PRNGKey(3)

  def total(p, h, t):
    return jnp.sum(head.loss(p, h, t, key=key, where=where_N))

  reference = head.loss(params, hidden_NxH, targets_N, key=key, where=where_N)
  want, _ = jax.grad(total, argnums=(0, 1))(params, hidden_NxH, targets_N)
  for loss_fn in (head.loss, jax.jit(head.loss)):
    loss_N = loss_fn(params, poisoned_NxH, padded_N, key=key, where=where_N)
    np.testing.assert_array_equal(np.asarray(loss_N)[ignored], 0.0)
    np.testing.assert_allclose(loss_N, reference, rtol=1e-6)
  for grad_fn in (jax.grad(total, argnums=(0, 1)), jax.jit(jax.grad(total, argnums=(0, 1)))):
    grads, dhidden_NxH = grad_fn(params, poisoned_NxH, padded_N)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
      assert np.all(np.isfinite(np.asarray(g)))
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dhidden_NxH)[ignored], 0.0)
    assert np.all(np.isfinite(np.asarray(dhidden_NxH)))


@pytest.mark.parametrize("name", ALL_HEADS)
def test_counted_out_of_range_target_is_nan_under_jit_and_an_error_eagerly(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  jit_loss, jit_log_prob = jax.jit(head.loss), jax.jit(head.log_prob)

  @jax.jit
  def sparse_loss(params, hidden_NxH, targets_N):
    rows, _, aux = head.sparse.gather(params, targets_N, None)
    return head.sparse.loss(rows, hidden_NxH, aux)

  for bad in (-1, V, 10**6):
    bad_N = targets_N.at[2].set(bad)
    message = rf"target {bad} at index 2 is out of range for vocabulary size V={V}"
    with pytest.raises(ValueError, match=message):
      head.loss(params, hidden_NxH, bad_N)
    with pytest.raises(ValueError, match=message):
      head.log_prob(params, hidden_NxH, bad_N)
    with pytest.raises(ValueError, match=message):  # counted: where is True there
      head.loss(params, hidden_NxH, bad_N, where=jnp.ones(N, bool))
    computed = [jit_loss(params, hidden_NxH, bad_N), jit_log_prob(params, hidden_NxH, bad_N)]
    if head.sparse is not None:
      with pytest.raises(ValueError, match=message):
        head.sparse.gather(params, bad_N, None)
      computed.append(sparse_loss(params, hidden_NxH, bad_N))
    for values in computed:
      assert np.isnan(values[2]) and np.all(np.isfinite(np.delete(np.asarray(values), 2)))
  # The gradient is poisoned too, so that NaN guards (optax.apply_if_finite) see the bad id.
  grad_fn = jax.jit(jax.grad(lambda p, h, y: jnp.sum(head.loss(p, h, y, key=jax.random.key(1)))))
  clean = grad_fn(params, hidden_NxH, targets_N)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(clean))
  poisoned = grad_fn(params, hidden_NxH, targets_N.at[2].set(V))
  assert not all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(poisoned))


@pytest.mark.parametrize("name", [n for n in HEAD_FACTORIES if HEAD_FACTORIES[n](V).sparse])
def test_sparse_sgd_step_equals_dense_sgd_step(name):
  """Gradients w.r.t. the gathered rows, scatter-added, are the dense gradient (repeated
  targets and noise draws add up); the hidden-state gradient is the dense one too."""
  head, params, hidden_NxH, targets_N = _setup(name)
  where_N = jnp.array([True, True, False, True, True, True])
  # A repeated target; padding (-1 and a NaN hidden state) where the token is ignored.
  targets_N = targets_N.at[1].set(targets_N[0]).at[2].set(-1)
  hidden_NxH = hidden_NxH.at[2].set(jnp.nan)
  key, learning_rate = jax.random.PRNGKey(5), 0.3
  eager = heads.sparse_sgd_step(head, params, hidden_NxH, targets_N, learning_rate, key=key,
                                where=where_N)  # padding accepted eagerly too
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(eager))

  def mean_loss(p, h):
    return jnp.sum(head.loss(p, h, targets_N, key=key, where=where_N)) / 5.0

  grads, grad_h = jax.grad(mean_loss, argnums=(0, 1))(params, hidden_NxH)
  new_params, loss_N, sparse_grad_h = jax.jit(lambda p, h: heads.sparse_sgd_step(
      head, p, h, targets_N, learning_rate, key=key, where=where_N))(params, hidden_NxH)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(
      new, old - learning_rate * g, atol=1e-6), new_params, params, grads)
  np.testing.assert_allclose(sparse_grad_h, grad_h, atol=1e-6)
  np.testing.assert_allclose(loss_N, head.loss(params, hidden_NxH, targets_N, key=key,
                                               where=where_N), rtol=1e-6)


def test_sparse_sgd_step_needs_a_sparse_head():
  head, params, hidden_NxH, targets_N = _setup("full_softmax")
  with pytest.raises(ValueError, match="has no sparse row form"):
    heads.sparse_sgd_step(head, params, hidden_NxH, targets_N, 0.1)


@settings(deadline=None, max_examples=30)
@given(hidden=hnp.arrays(np.float32, (3, H), elements=st.floats(-5, 5, width=32)),
       shift=st.floats(-10, 10, width=32))
def test_full_softmax_is_invariant_to_a_constant_bias_shift(hidden, shift):
  head, params, _, _ = _setup("full_softmax")
  shifted = {**params, "bias_V": params["bias_V"] + shift}
  logp = head.log_probs(params, hidden)
  np.testing.assert_allclose(head.log_probs(shifted, hidden), logp, atol=1e-4)
  np.testing.assert_allclose(jax.nn.logsumexp(logp, axis=-1), 0.0, atol=1e-5)


def test_full_softmax_init():
  params = jax.jit(heads.full_softmax(V, init_scale=0.05).init, static_argnums=1)(
      jax.random.PRNGKey(3), H)
  assert params["weight_VxH"].shape == (V, H) and params["bias_V"].shape == (V,)
  for leaf in (params["weight_VxH"], params["bias_V"]):
    assert float(jnp.max(jnp.abs(leaf))) <= 0.05 and float(jnp.std(leaf)) > 0.01


@pytest.mark.parametrize("name", ALL_HEADS)
def test_hidden_states_checked_at_the_boundary_and_empty_batches(name):
  """A width other than the params' names both widths; integer hidden states are refused;
  a non-finite row cannot be sampled (an error eagerly, -1 under jit); N = 0 works."""
  head, params, hidden_NxH, targets_N = _setup(name)
  key = jax.random.PRNGKey(0)
  narrow_NxH = hidden_NxH[:, :H - 1]
  message = rf"hidden_NxH has width H={H - 1}, but the head's params were made for H={H}"
  for call in (lambda: head.loss(params, narrow_NxH, targets_N, key=key),
               lambda: head.log_prob(params, narrow_NxH, targets_N),
               lambda: head.log_probs(params, narrow_NxH),
               lambda: head.sample(params, narrow_NxH, key)):
    with pytest.raises(ValueError, match=message):
      call()
  with pytest.raises(ValueError, match="hidden_NxH must be floating point, got dtype int32"):
    head.loss(params, hidden_NxH.astype(jnp.int32), targets_N, key=key)
  nan_row_NxH = hidden_NxH.at[4, 1].set(jnp.nan)
  with pytest.raises(ValueError, match="hidden_NxH row 4 is not finite"):
    head.sample(params, nan_row_NxH, key)
  for temperature in (1.0, 0.0):
    drawn_N = np.asarray(jax.jit(lambda p, h, k, t=temperature: head.sample(
        p, h, k, temperature=t))(params, nan_row_NxH, key))
    assert drawn_N[4] == heads.INVALID_SAMPLE == -1
    assert np.all((np.delete(drawn_N, 4) >= 0) & (np.delete(drawn_N, 4) < V))
  empty_0xH, no_targets = hidden_NxH[:0], targets_N[:0]
  assert head.loss(params, empty_0xH, no_targets, key=key).shape == (0,)
  assert head.log_prob(params, empty_0xH, no_targets).shape == (0,)
  assert head.log_probs(params, empty_0xH).shape == (0, V)
  assert head.sample(params, empty_0xH, key).shape == (0,)
  grads = jax.grad(lambda p: jnp.sum(head.loss(p, empty_0xH, no_targets, key=key)))(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_bad_inputs_raise():
  head, params, hidden_NxH, targets_N = _setup("full_softmax")
  with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
    heads.full_softmax(0)
  with pytest.raises(ValueError, match=r"hidden_NxH must have rank 2 \[N, H\], got shape \(6,\)"):
    head.log_probs(params, hidden_NxH[:, 0])
  with pytest.raises(ValueError, match=r"targets_N has shape \(5,\), expected \[N\]"):
    head.loss(params, hidden_NxH, targets_N[:5])
  with pytest.raises(ValueError, match="targets_N must be integer token ids, got dtype float32"):
    head.log_prob(params, hidden_NxH, targets_N.astype(jnp.float32))
  with pytest.raises(ValueError, match="target 7 at index 0 is out of range for vocabulary size V=7"):
    head.loss(params, hidden_NxH, targets_N.at[0].set(V))


def test_make_head_names_options_the_head_does_not_take():
  with pytest.raises(ValueError, match=r"head 'neg' does not take option\(s\) \['log_z'\]; it "
                                       r"takes \['noise', 'noise_power', 'num_samples', "
                                       r"'shared_samples'\]"):
    heads.make_head("neg", vocab_size=V, counts=COUNTS_V, log_z=0.0)
  with pytest.raises(ValueError, match=r"head 'full' does not take option\(s\) \['tree'\]"):
    heads.make_head("full", vocab_size=V, tree="huffman")
  with pytest.raises(ValueError, match="unknown tree 'random'"):
    heads.make_head("hsm", vocab_size=V, counts=COUNTS_V, tree="random")
  with pytest.raises(ValueError, match="log_z must be 'learned' or a number, got 'big'"):
    heads.make_head("nce", vocab_size=V, counts=COUNTS_V, log_z="big")


def test_bench_lm_heads_script_smoke(tmp_path):
  """End-to-end run of experiments/bench_lm_heads.py on the embedded synthetic corpus."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_lm_heads.py"),
                  "--corpus=synthetic", "--heads=full,hsm,hsm_autodiff", "--hidden=8",
                  "--bptt=4", "--cell=elman,elman_direct", "--variational_dropout=false,true",
                  "--batch_size=2,4", "--repeats=1", f"--json_out={out}"],
                 check=True, env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                 timeout=600)
  payload = json.loads(out.read_text())
  assert payload["keep_freed_memory_applied"] is _GLIBC_CPU  # the script's explicit call
  rows = payload["rows"]
  labels = ("elman", "elman+variational", "elman_direct", "elman_direct+variational")
  assert [(r["cell"], r["head"], r["batch_size"]) for r in rows] == [
      (c, h, b) for b in (2, 4) for c in labels for h in ("full", "hsm", "hsm_autodiff")]
  assert [r["variational_dropout"] for r in rows[:6:3]] == [False, True]
  ms = {(r["cell"], r["head"], r["batch_size"]): r["ms_per_step"] for r in rows}
  for r in rows:  # every derived column is the formula of the timed ms per step
    c, h, b = r["cell"], r["head"], r["batch_size"]
    np.testing.assert_allclose(r["tokens_per_sec"], b * 4 / ms[c, h, b] * 1e3, rtol=1e-9)
    np.testing.assert_allclose(r["speedup_vs_full"], ms[c, "full", b] / ms[c, h, b], rtol=1e-9)
    np.testing.assert_allclose(r["speedup_vs_elman"], ms["elman", h, b] / ms[c, h, b],
                               rtol=1e-9)


def test_bench_heads_script_smoke(tmp_path):
  """End-to-end run of experiments/bench_heads.py at tiny sizes: rows, growth and the plot."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
  subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_heads.py"),
                  "--vocab_sizes=64,256", "--hidden=64", "--tokens=32", "--repeats=1",
                  "--heads=full,class,hsm,nce,adaptive,classtree", "--modes=dense,sparse",
                  f"--json_out={out}",
                  f"--plot_out={plot}"],
                 check=True, env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                 timeout=600)
  payload = json.loads(out.read_text())
  assert payload["keep_freed_memory_applied"] is _GLIBC_CPU  # the script's explicit call
  keys = {(r["V"], r["head"], r["mode"]) for r in payload["rows"]}
  assert {(v, "full", "dense") for v in (64, 256)} <= keys
  assert {(v, h, m) for v in (64, 256) for h in ("class", "hsm", "nce")
          for m in ("dense", "sparse")} <= keys
  for name in ("hsm_autodiff", "class_autodiff"):  # beside the default backwards
    assert {(v, name, "dense") for v in (64, 256)} <= keys
    assert not any(h == name and m == "sparse" for _, h, m in keys)
  full_us = {r["V"]: r["us_per_token"] for r in payload["rows"] if r["head"] == "full"}
  for r in payload["rows"]:  # each ratio is against the full softmax at the same V
    assert np.isfinite(r["us_per_token"]) and r["tokens"] == 32
    np.testing.assert_allclose(r["speedup_vs_full"], full_us[r["V"]] / r["us_per_token"],
                               rtol=1e-9)
  if _GLIBC_CPU:  # the call applied: every row also timed in a second process without it
    full_no_call = {r["V"]: r["us_per_token_no_call"] for r in payload["rows"]
                    if r["head"] == "full"}
    for r in payload["rows"]:
      assert np.isfinite(r["us_per_token_no_call"])
      np.testing.assert_allclose(r["speedup_vs_full_no_call"],
                                 full_no_call[r["V"]] / r["us_per_token_no_call"], rtol=1e-9)
  for name in ("adaptive", "adaptive_fixed", "classtree", "classtree_3"):
    assert {(v, name, "dense") for v in (64, 256)} <= keys
  assert {(v, h, "sparse") for v in (64, 256) for h in ("classtree", "classtree_3")} <= keys
  assert set(payload["growth_first_to_last_V"]) >= {"hsm/sparse", "full/dense"}
  # With two sizes the log-log slope is log(growth) / log(256 / 64).
  for key, growth in payload["growth_first_to_last_V"].items():
    np.testing.assert_allclose(payload["loglog_slopes"][key], np.log(growth) / np.log(4.0),
                               rtol=1e-6)
  assert plot.stat().st_size > 0


# Tables as arguments: what a head needs besides its params reaches jit as an argument.

@pytest.mark.parametrize("name", [n for n in heads.HEAD_NAMES if n != "full"])
@pytest.mark.parametrize("function", ["grad", "log_probs", "sample"])
def test_tables_passed_as_arguments_keep_the_program_small(name, function):
  def lowered(vocab_size, tables_as_argument):
    counts = np.arange(vocab_size, 0, -1)
    head = heads.make_head(name, vocab_size=vocab_size, counts=counts)
    params = jax.eval_shape(lambda k: head.init(k, 16), jax.random.PRNGKey(0))
    hidden = jax.ShapeDtypeStruct((N, 16), jnp.float32)
    targets = jax.ShapeDtypeStruct((N,), jnp.int32)
    key = jax.random.PRNGKey(0)
    calls = {  # (p, t, h, y) -> value; t None: the head's own tables (compiled in)
        "grad": jax.grad(lambda p, t, h, y: jnp.sum(head.loss(p, h, y, key=key, tables=t))),
        "log_probs": lambda p, t, h, y: head.log_probs(p, h, tables=t),
        "sample": lambda p, t, h, y: head.sample(p, h, key, temperature=1.0, tables=t)}
    call = calls[function]
    if tables_as_argument:
      return jax.jit(call).lower(params, head.tables, hidden, targets).as_text()
    return jax.jit(lambda p, h, y: call(p, None, h, y)).lower(params, hidden, targets).as_text()

  def largest_constant(text):
    """Elements of the largest non-splat constant in a StableHLO module."""
    sizes = [np.prod([int(d) for d in shape.split("x")[:-1]], dtype=np.int64)
             for value, shape in re.findall(r"stablehlo.constant dense<([^>]*)> : tensor<([^>]*)>",
                                            text) if value.startswith(("[", '"'))]
    return max(sizes, default=0)

  assert largest_constant(lowered(20000, True)) < 1000  # no [V]-sized constant in the program
  if function == "grad":
    assert largest_constant(lowered(20000, False)) >= 20000  # the old way: tables compiled in


@pytest.mark.parametrize("name", ALL_HEADS)
def test_tables_argument_gives_the_same_values_and_grad_is_over_params_only(name):
  head, params, hidden_NxH, targets_N = _setup(name)
  key = jax.random.PRNGKey(2)

  @jax.jit
  def step(params, tables, hidden_NxH, targets_N):
    loss = lambda p: jnp.mean(head.loss(p, hidden_NxH, targets_N, key=key, tables=tables))
    return jax.value_and_grad(loss)(params)

  value, grads = step(params, head.tables, hidden_NxH, targets_N)
  np.testing.assert_allclose(value, jnp.mean(head.loss(params, hidden_NxH, targets_N, key=key)),
                             rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  logp = jax.jit(lambda p, t, h: head.log_probs(p, h, tables=t))(params, head.tables, hidden_NxH)
  np.testing.assert_allclose(logp, head.log_probs(params, hidden_NxH), rtol=1e-6, atol=1e-6)
  drawn = jax.jit(lambda p, t, h, k: head.sample(p, h, k, tables=t))(params, head.tables,
                                                                     hidden_NxH, key)
  np.testing.assert_array_equal(drawn, head.sample(params, hidden_NxH, key))
