"""Tests for lm_jax.ops.fused: values and gradients against the unfused kernel, memory shape, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax.ops import fused
from lm_jax.ops import losses

linear_xent = fused.linear_softmax_cross_entropy


def _problem(n, h, v, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, h)), dtype),
          jnp.asarray(rng.normal(size=(v, h)), dtype),
          jnp.asarray(rng.normal(size=(v,)), dtype),
          jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32))


def _unfused(hidden, weight, bias, labels, where=None):
  logits = hidden @ weight.T + (0.0 if bias is None else bias)
  return losses.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)


def _numpy_reference(hidden, weight, bias, labels, cotangent):
  """float64 loss and closed-form gradients of sum(cotangent * loss)."""
  h, w, b = (np.asarray(x, np.float64) for x in (hidden, weight, bias))
  y, c = np.asarray(labels), np.asarray(cotangent, np.float64)
  z = h @ w.T + b
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  loss = lse - z[np.arange(len(y)), y]
  g = c[:, None] * (np.exp(z - lse[:, None]) - np.eye(w.shape[0])[y])
  return loss, g @ w, g.T @ h, g.sum(0)


def test_expected_values_on_tiny_arrays():
  # Zero hidden states give uniform probabilities: loss log V for every label.
  loss = linear_xent(jnp.zeros((3, 2)), jnp.ones((5, 2)), jnp.array([0, 4, 2]), chunk_size=2,
                     vocab_chunk_size=2)
  np.testing.assert_allclose(loss, np.full(3, np.log(5.0)), rtol=1e-6)
  # Bias only: loss = logsumexp(b) - b_y.
  bias = jnp.array([0.0, np.log(3.0)])
  loss = linear_xent(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.array([0, 1]), bias_V=bias)
  np.testing.assert_allclose(loss, [np.log(4.0), np.log(4.0 / 3.0)], rtol=1e-6)


CASES = [
    # n, h, v, chunk_size, vocab_chunk_size, with_bias, with_where, uniform cotangent
    (13, 5, 17, 4, 5, True, False, True),  # neither N nor V a multiple of its chunk
    (13, 5, 17, 4, 5, False, True, False),
    (13, 5, 17, 4, None, True, True, True),  # default vocabulary chunk: one block of all V
    (7, 3, 11, 1, 1, True, True, False),  # one token and one vocabulary entry per chunk
    (7, 3, 11, 100, 100, False, True, True),  # chunks larger than N and V
    (40, 6, 33, 8, 16, True, True, False),
    (9, 4, 23, None, None, True, False, False),  # defaults
]


@pytest.mark.parametrize("n,h,v,chunk_size,vocab_chunk_size,with_bias,with_where,uniform", CASES)
def test_values_and_gradients_match_unfused(n, h, v, chunk_size, vocab_chunk_size, with_bias,
                                            with_where, uniform):
  hidden, weight, bias, labels = _problem(n, h, v, seed=n + v)
  bias = bias if with_bias else None
  rng = np.random.default_rng(1)
  where = jnp.asarray(rng.random(n) < 0.7) if with_where else None
  # A uniform cotangent (a mean) takes the residual path; a non-uniform one the recomputing fallback.
  cotangent = jnp.full((n,), 1.0 / n) if uniform else jnp.asarray(rng.normal(size=n), jnp.float32)

  def fused_objective(hidden, weight, bias):
    loss = linear_xent(hidden, weight, labels, bias_V=bias, where=where, chunk_size=chunk_size,
                       vocab_chunk_size=vocab_chunk_size)
    return jnp.sum(cotangent * loss), loss

  def unfused_objective(hidden, weight, bias):
    loss = _unfused(hidden, weight, bias, labels, where)
    return jnp.sum(cotangent * loss), loss

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))
  got_grads, got_loss = grad(fused_objective)(hidden, weight, bias)
  want_grads, want_loss = grad(unfused_objective)(hidden, weight, bias)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if with_where:
    assert np.all(np.asarray(got_loss)[~np.asarray(where)] == 0)
  # Plain evaluation runs the primal (online logsumexp), not the custom_vjp forward.
  np.testing.assert_allclose(
      linear_xent(hidden, weight, labels, bias_V=bias, where=where, chunk_size=chunk_size,
                  vocab_chunk_size=vocab_chunk_size), want_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_chunk_size", [3, None])
def test_float64_reference_and_check_grads(vocab_chunk_size):
  with jax.enable_x64(True):
    hidden, weight, bias, labels = _problem(6, 3, 8, seed=3, dtype=np.float64)
    loss = linear_xent(hidden, weight, labels, bias_V=bias, chunk_size=4,
                       vocab_chunk_size=vocab_chunk_size)
    assert loss.dtype == jnp.float64
    # A non-uniform cotangent (recomputing fallback) and a uniform one (residual path).
    for cotangent in (jnp.asarray(np.random.default_rng(2).normal(size=6)), jnp.ones(6)):
      want_loss, *want_grads = _numpy_reference(hidden, weight, bias, labels, cotangent)
      np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
      objective = jax.jit(lambda h, w, b, c=cotangent: jnp.sum(c * linear_xent(
          h, w, labels, bias_V=b, chunk_size=4, vocab_chunk_size=vocab_chunk_size)))
      got_grads = jax.grad(objective, argnums=(0, 1, 2))(hidden, weight, bias)
      for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
      # custom_vjp defines reverse mode only.
      check_grads(objective, (hidden, weight, bias), order=1, modes=["rev"])


def test_second_order_gradients():
  # Differentiating the backward pass goes through the custom_vjp's fwd and bwd functions.
  with jax.enable_x64(True):
    hidden, weight, bias, labels = _problem(5, 2, 7, seed=4, dtype=np.float64)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=5))
    objective = jax.jit(lambda h, w, b: jnp.sum(cotangent * linear_xent(
        h, w, labels, bias_V=b, chunk_size=2, vocab_chunk_size=3)))
    check_grads(objective, (hidden, weight, bias), order=2, modes=["rev"])


def test_recomputing_forward_when_logits_are_not_kept(monkeypatch):
  # Past _KEPT_LOGITS the custom_vjp forward recomputes each block (8NHV) instead of keeping it.
  monkeypatch.setattr(fused, "_KEPT_LOGITS", 1)
  hidden, weight, bias, labels = _problem(11, 4, 19, seed=9)
  objective = lambda fn: jax.jit(jax.grad(lambda h, w, b: jnp.mean(fn(h, w, b)), argnums=(0, 1, 2)))
  got = objective(lambda h, w, b: linear_xent(h, w, labels, bias_V=b, chunk_size=4,
                                              vocab_chunk_size=6))(hidden, weight, bias)
  want = objective(lambda h, w, b: _unfused(h, w, b, labels))(hidden, weight, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_mean_and_masked_mean_gradients_match_unfused():
  hidden, weight, bias, labels = _problem(10, 4, 9, seed=5)
  where = jnp.arange(10) % 3 != 0
  for reduce in (lambda l: jnp.mean(l), lambda l: jnp.sum(l) / jnp.sum(where)):
    got = jax.jit(jax.grad(lambda w: reduce(linear_xent(hidden, w, labels, bias_V=bias, where=where,
                                                        chunk_size=3))))(weight)
    want = jax.grad(lambda w: reduce(_unfused(hidden, w, bias, labels, where)))(weight)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fully_masked_gives_zero_loss_and_zero_gradients():
  hidden, weight, bias, labels = _problem(5, 3, 7)
  where = jnp.zeros(5, bool)
  labels = labels.at[0].set(-1)  # masked tokens may carry any label (padding)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda h, w, b: jnp.sum(linear_xent(h, w, labels, bias_V=b, where=where, chunk_size=2)),
      argnums=(0, 1, 2)))(hidden, weight, bias)
  assert float(loss) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_out_of_range_labels_follow_the_unfused_rule():
  hidden, weight, bias, labels = _problem(4, 3, 6)
  for bad in (-1, 6):
    bad_labels = labels.at[2].set(bad)
    with pytest.raises(ValueError, match=rf"label {bad} at index 2 is out of range for vocabulary size V=6"):
      linear_xent(hidden, weight, bad_labels)
    # Masked tokens are exempt, concrete or not.
    where = jnp.arange(4) != 2
    np.testing.assert_allclose(linear_xent(hidden, weight, bad_labels, where=where),
                               _unfused(hidden, weight, None, bad_labels, where), rtol=1e-5)
    # Under jit: NaN loss for that token only, and NaN gradients, as the unfused kernel.
    for fn in (linear_xent, lambda h, w, y: _unfused(h, w, None, y)):
      loss = jax.jit(fn)(hidden, weight, bad_labels)
      assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(np.asarray(loss), 2)))
      dh, dw = jax.jit(jax.grad(lambda h, w, y: jnp.sum(fn(h, w, y)), argnums=(0, 1)))(
          hidden, weight, bad_labels)
      assert np.all(np.isnan(dh[2])) and np.all(np.isfinite(np.delete(np.asarray(dh), 2, axis=0)))
      assert np.all(np.isnan(dw))
    # A zero cotangent for the bad token gives finite gradients in both.
    cotangent = jnp.arange(4) != 2
    objective = lambda h, w, y: jnp.sum(jnp.where(cotangent, linear_xent(h, w, y), 0.0))
    got = jax.jit(jax.grad(objective, argnums=(0, 1)))(hidden, weight, bad_labels)
    want = jax.grad(lambda h, w: jnp.sum(jnp.where(cotangent, _unfused(h, w, None, labels), 0.0)),
                    argnums=(0, 1))(hidden, weight)
    for g, wnt in zip(got, want):
      np.testing.assert_allclose(g, wnt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_NxH=jnp.zeros((4,)), weight_VxH=jnp.zeros((5, 3))), r"hidden_NxH must be a rank-2 floating"),
    (dict(hidden_NxH=jnp.zeros((4, 3), jnp.int32)), r"hidden_NxH must be a rank-2 floating .*int32"),
    (dict(weight_VxH=jnp.zeros((5, 2))), r"hidden_NxH \(4, 3\) and weight_VxH \(5, 2\) need the same H"),
    (dict(weight_VxH=jnp.zeros((0, 3))), r"need the same H and V > 0"),
    (dict(labels_N=jnp.zeros((3,), jnp.int32)), r"labels_N must be an integer array of shape \(4,\), got shape \(3,\)"),
    (dict(labels_N=jnp.zeros((4,))), r"labels_N must be an integer array .* dtype float32"),
    (dict(bias_V=jnp.zeros((4,))), r"bias_V must be a floating array of shape \(5,\), got shape \(4,\)"),
    (dict(where=jnp.ones((4,), jnp.int32)), r"where must be a boolean array of shape \(4,\).*int32"),
    (dict(where=jnp.ones((2, 2), bool)), r"where must be a boolean array of shape \(4,\), got shape \(2, 2\)"),
    (dict(chunk_size=0), r"chunk_size must be a positive int or None, got 0"),
    (dict(vocab_chunk_size=2.5), r"vocab_chunk_size must be a positive int or None, got 2.5"),
])
def test_bad_inputs_raise_value_errors(kwargs, match):
  args = dict(hidden_NxH=jnp.zeros((4, 3)), weight_VxH=jnp.zeros((5, 3)),
              labels_N=jnp.zeros((4,), jnp.int32))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    linear_xent(args.pop("hidden_NxH"), args.pop("weight_VxH"), args.pop("labels_N"), **args)


def _all_avals(jaxpr):
  """Every variable's abstract value in a closed jaxpr, sub-jaxprs (scan, cond, while, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    for var in list(eqn.invars) + list(eqn.outvars):
      if hasattr(var, "aval"):
        yield var.aval
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _all_avals(inner if hasattr(inner, "eqns") else inner.jaxpr)


@pytest.mark.parametrize("vocab_chunk_size", [16, None])
def test_no_array_of_n_times_v_elements(vocab_chunk_size):
  n, h, v = 97, 3, 83  # primes, so no chunk or padded shape can have N * V elements by accident
  hidden, weight, bias, labels = _problem(n, h, v)
  cotangent = jnp.linspace(0.0, 1.0, n)  # non-uniform: traces the recomputing branch too

  def sizes(fn):
    jaxpr = jax.make_jaxpr(fn)(hidden, weight, bias).jaxpr
    return {int(np.prod(a.shape)) for a in _all_avals(jaxpr) if hasattr(a, "shape")}

  objective = lambda fn: lambda h, w, b: jnp.sum(cotangent * fn(h, w, b))
  fused_fn = lambda h, w, b: linear_xent(h, w, labels, bias_V=b, chunk_size=8,
                                         vocab_chunk_size=vocab_chunk_size)
  unfused_fn = lambda h, w, b: _unfused(h, w, b, labels)
  assert n * v in sizes(jax.grad(objective(unfused_fn), argnums=(0, 1, 2)))  # the check can fail
  assert n * v not in sizes(fused_fn)
  assert n * v not in sizes(jax.grad(objective(fused_fn), argnums=(0, 1, 2)))
  largest = max(sizes(jax.grad(objective(fused_fn), argnums=(0, 1, 2))))
  # At most a token chunk's kept logits (8 rows of V, plus an overlapping last vocabulary chunk).
  assert largest <= max(8 * (v + (vocab_chunk_size or 0)), v * h, (n + 8) * h), largest


def test_jit_vmap_and_bfloat16():
  hidden, weight, bias, labels = _problem(6, 4, 10, seed=7)
  batch_hidden = jnp.stack([hidden, 2 * hidden, -hidden])
  fn = lambda h: linear_xent(h, weight, labels, bias_V=bias, chunk_size=4, vocab_chunk_size=3)
  got = jax.jit(jax.vmap(fn))(batch_hidden)
  want = jnp.stack([_unfused(h, weight, bias, labels) for h in batch_hidden])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # vmap of the gradient with non-uniform cotangents (cond becomes select).
  grads = jax.jit(jax.vmap(jax.grad(lambda h, c: jnp.sum(c * fn(h)))))(batch_hidden, batch_hidden[..., 0])
  for i in range(3):
    want = jax.grad(lambda h: jnp.sum(batch_hidden[i, :, 0] * _unfused(h, weight, bias, labels)))(
        batch_hidden[i])
    np.testing.assert_allclose(grads[i], want, rtol=1e-5, atol=1e-5)
  # bfloat16 inputs are computed in float32; the loss stays float32, gradients bfloat16.
  as_bf16 = lambda x: x.astype(jnp.bfloat16)
  loss, dh = jax.jit(jax.value_and_grad(lambda h: jnp.sum(linear_xent(
      h, as_bf16(weight), labels, bias_V=as_bf16(bias), chunk_size=4))))(as_bf16(hidden))
  assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16
  want = _unfused(*(x.astype(jnp.float32) for x in map(as_bf16, (hidden, weight, bias))), labels)
  np.testing.assert_allclose(float(loss), float(jnp.sum(want)), rtol=1e-2)


@settings(deadline=None, max_examples=8)
@given(n=st.integers(1, 12), v=st.integers(1, 12), chunk_size=st.integers(1, 13),
       vocab_chunk_size=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_chunking_does_not_change_values_or_gradients(n, v, chunk_size, vocab_chunk_size, seed):
  hidden, weight, bias, labels = _problem(n, 3, v, seed=seed)
  cotangent = jnp.asarray(np.random.default_rng(seed).normal(size=n), jnp.float32)

  def value_and_grads(**chunks):
    return jax.jit(jax.value_and_grad(lambda h, w, b: jnp.sum(cotangent * linear_xent(
        h, w, labels, bias_V=b, **chunks)), argnums=(0, 1, 2)))(hidden, weight, bias)

  got = value_and_grads(chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
  want = value_and_grads(chunk_size=n, vocab_chunk_size=v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@settings(deadline=None, max_examples=10)
@given(v=st.sampled_from([1, 6, 13]), shift=st.floats(-50.0, 50.0), seed=st.integers(0, 2**16))
def test_probabilities_normalise_and_bias_shift_is_invariant(v, shift, seed):
  hidden, weight, bias, _ = _problem(1, 4, v, seed=seed)
  # One hidden state scored against every label: sum_v exp(-loss_v) = sum_v p_v = 1.
  every_label = jnp.arange(v)
  hidden_v = jnp.repeat(hidden, v, axis=0)
  loss = linear_xent(hidden_v, weight, every_label, bias_V=bias, chunk_size=3, vocab_chunk_size=4)
  np.testing.assert_allclose(float(jnp.sum(jnp.exp(-loss))), 1.0, rtol=1e-5)
  assert np.all(np.asarray(loss) >= -1e-5)
  shifted = linear_xent(hidden_v, weight, every_label, bias_V=bias + shift, chunk_size=3,
                        vocab_chunk_size=4)
  np.testing.assert_allclose(shifted, loss, atol=2e-4)


# The options its peers have: reduction, label smoothing, z-loss, soft-capping, lse.

def _unfused_options(hidden, weight, bias, labels, where=None, *, reduction="none",
                     label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None):
  """The reference: materialised logits, optax's soft-label loss on optax.smooth_labels."""
  logits = hidden @ weight.T + bias
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, weight.shape[0], dtype=logits.dtype),
                                label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets) + z_loss * jax.nn.logsumexp(logits, -1)**2
  if where is not None:
    loss = jnp.where(where, loss, 0.0)
  counted = loss.shape[0] if where is None else jnp.sum(where)
  return {"none": loss, "sum": jnp.sum(loss), "mean": jnp.sum(loss) / counted}[reduction]


_OPTION_CASES = [dict(reduction="sum"), dict(reduction="mean"), dict(label_smoothing=0.1),
                 dict(z_loss=1e-2), dict(logit_soft_cap=2.0),
                 dict(reduction="mean", label_smoothing=0.2, z_loss=1e-3, logit_soft_cap=3.0)]


# The CPU form (token chunks of 4) and the accelerator form (one token chunk, dW emitted
# block by block), each forced; "auto" picks the CPU form here.
_IMPLEMENTATIONS = {"cpu": dict(implementation="cpu", chunk_size=4),
                    "accelerator": dict(implementation="accelerator")}


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("options", _OPTION_CASES)
@pytest.mark.parametrize("masked", [pytest.param(False), True])
def test_options_match_the_materialised_reference_in_value_and_gradient(options, masked,
                                                                        implementation):
  with jax.enable_x64(True):
    hidden, weight, bias, labels = _problem(11, 3, 13, seed=21, dtype=np.float64)
    where = (jnp.arange(11) % 4 != 1) if masked else None
    if masked:
      labels = jnp.where(where, labels, -1)  # padding: ignore_index
    cotangent = 1.0 if options.get("reduction", "none") != "none" else jnp.linspace(0.5, 2.0, 11)
    fused_fn = lambda h, w, b: jnp.sum(cotangent * linear_xent(
        h, w, labels, bias_V=b, where=where, vocab_chunk_size=5, **options,
        **_IMPLEMENTATIONS[implementation]))
    ref_fn = lambda h, w, b: jnp.sum(cotangent * _unfused_options(
        h, w, b, jnp.maximum(labels, 0), where, **options))
    value, grads = jax.jit(jax.value_and_grad(fused_fn, argnums=(0, 1, 2)))(hidden, weight, bias)
    want_value, want_grads = jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(hidden, weight, bias)
    np.testing.assert_allclose(value, want_value, rtol=1e-10)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_reductions_and_return_lse():
  hidden, weight, bias, labels = _problem(9, 4, 10, seed=22)
  where = jnp.arange(9) % 3 != 0
  per_token = linear_xent(hidden, weight, labels, bias_V=bias, where=where)
  np.testing.assert_allclose(linear_xent(hidden, weight, labels, bias_V=bias, where=where,
                                         reduction="sum"), jnp.sum(per_token), rtol=1e-6)
  np.testing.assert_allclose(linear_xent(hidden, weight, labels, bias_V=bias, where=where,
                                         reduction="mean"), jnp.sum(per_token) / 6, rtol=1e-6)
  # PyTorch: the mean over no counted token is NaN; the sum is 0.
  nothing = jnp.zeros(9, bool)
  assert np.isnan(linear_xent(hidden, weight, labels, where=nothing, reduction="mean"))
  assert linear_xent(hidden, weight, labels, where=nothing, reduction="sum") == 0.0
  # return_lse: the normaliser of every token (of a zero hidden state where masked: the row
  # may hold anything), differentiable.
  for reduction in ("none", "sum"):
    loss, lse = linear_xent(hidden, weight, labels, bias_V=bias, where=where,
                            reduction=reduction, return_lse=True, chunk_size=4)
    masked_hidden = jnp.where(where[:, None], hidden, 0.0)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(masked_hidden @ weight.T + bias, -1),
                               rtol=1e-6)
    objective = lambda h, w, b: (jnp.sum(linear_xent(h, w, labels, bias_V=b, where=where,
                                                     reduction=reduction, return_lse=True)[0])
                                 + 0.3 * jnp.sum(jnp.arange(9.0) * linear_xent(
                                     h, w, labels, bias_V=b, return_lse=True)[1]))
    reference = lambda h, w, b: (jnp.sum(_unfused(h, w, b, labels, where)) + 0.3 * jnp.sum(
        jnp.arange(9.0) * jax.nn.logsumexp(h @ w.T + b, -1)))
    for got, want in zip(jax.grad(objective, argnums=(0, 1, 2))(hidden, weight, bias),
                         jax.grad(reference, argnums=(0, 1, 2))(hidden, weight, bias)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _count_dots(jaxpr):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          count += _count_dots(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return count


def test_a_reduced_loss_differentiates_in_one_pass_of_three_matmuls():
  # sum/mean: the forward forms logits, G W and G^T h once (6NHV); "none" needs a fourth
  # matmul, the logits recomputed in the backward (8NHV).
  hidden, weight, bias, labels = _problem(16, 4, 300, seed=23)
  # Large _ACCUMULATE_SLICE paths use fori_loop; at these sizes each matmul appears once.
  def dots(reduction, implementation="cpu"):
    fn = lambda h, w, b: jnp.sum(linear_xent(h, w, labels, bias_V=b, reduction=reduction,
                                             vocab_chunk_size=128,
                                             implementation=implementation))
    return _count_dots(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(hidden, weight,
                                                                        bias).jaxpr)
  assert dots("sum") == 3 and dots("mean") == 3
  # "none" too forms the unit-cotangent gradients in its forward (3); its backward stages a
  # fallback for per-token cotangents (logits and G^T h recomputed: 2) behind a lax.cond.
  assert dots("none") == 3 + 2
  # The accelerator form never keeps [C, V] logits between its passes: 4 (+ 2 for "none").
  assert [dots(r, "accelerator") for r in ("none", "sum", "mean")] == [6, 4, 4]
  # "auto" stages both forms (platform_dependent picks one when lowering).
  assert dots("sum", "auto") == 3 + 4


def test_bfloat16_inputs_accumulate_in_float32_with_every_option():
  hidden, weight, bias, labels = _problem(12, 8, 20, seed=24)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  options = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=5.0)
  loss = linear_xent(bf16(hidden), bf16(weight), labels, bias_V=bf16(bias), **options)
  assert loss.dtype == jnp.float32
  f32 = lambda x: bf16(x).astype(jnp.float32)  # the same rounded inputs, float32 arithmetic
  np.testing.assert_allclose(loss, _unfused_options(f32(hidden), f32(weight), f32(bias), labels,
                                                    **options), rtol=1e-5)
  grads = jax.grad(lambda h, w: linear_xent(h, w, labels, **options), argnums=(0, 1))(
      bf16(hidden), bf16(weight))
  assert all(g.dtype == jnp.bfloat16 for g in grads)


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="avg"), r"reduction must be one of \('none', 'sum', 'mean'\), got 'avg'"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
    (dict(z_loss=-1.0), r"z_loss must be >= 0, got -1.0"),
    (dict(logit_soft_cap=0.0), r"logit_soft_cap must be > 0 or None, got 0.0"),
])
def test_bad_options_raise(kwargs, match):
  hidden, weight, _, labels = _problem(4, 3, 5)
  with pytest.raises(ValueError, match=match):
    linear_xent(hidden, weight, labels, **kwargs)


# Padding cannot poison; a bad target poisons. Every reduction and option, with and without bias.

_POISON_OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-2), dict(logit_soft_cap=2.0),
                   dict(label_smoothing=0.2, z_loss=1e-3, logit_soft_cap=3.0, return_lse=True)]


def _poison_objective(where, reduction, options, with_bias, implementation):
  """A scalar of the loss (and, with return_lse, of the counted tokens' lse) for jax.grad."""
  def objective(h, w, b, labels):
    out = linear_xent(h, w, labels, bias_V=b if with_bias else None, where=where,
                      reduction=reduction, vocab_chunk_size=5, **options,
                      **_IMPLEMENTATIONS[implementation])
    loss, lse = out if options.get("return_lse") else (out, None)
    total = jnp.sum(loss * (jnp.linspace(0.5, 2.0, loss.size) if loss.ndim else 1.0))
    if lse is not None:  # the lse of counted tokens, used (a z-loss of one's own)
      total = total + 0.1 * jnp.sum(jnp.where(where, lse, 0.0))
    return total
  return objective


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("options", _POISON_OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_bias,bad", [(True, np.nan), (False, np.inf)])
def test_padding_cannot_poison_the_fused_loss(options, reduction, with_bias, bad, implementation):
  hidden, weight, bias, labels = _problem(9, 3, 11, seed=31)
  where = jnp.arange(9) % 3 != 1
  labels = jnp.where(where, labels, -1)
  poisoned = jnp.where(where[:, None], hidden, bad)
  clean = jnp.where(where[:, None], hidden, 0.0)
  loss = linear_xent(poisoned, weight, labels, bias_V=bias, where=where, reduction=reduction,
                     **options, **_IMPLEMENTATIONS[implementation])
  loss = loss[0] if options.get("return_lse") else loss
  assert np.all(np.isfinite(loss))
  if reduction == "none":
    np.testing.assert_array_equal(loss[~where], 0.0)
  value_and_grad = jax.jit(jax.value_and_grad(
      _poison_objective(where, reduction, options, with_bias, implementation),
      argnums=(0, 1, 2)))
  value, grads = value_and_grad(poisoned, weight, bias, labels)
  want_value, want_grads = value_and_grad(clean, weight, bias, labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for grad, want in zip(grads, want_grads):
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[0][~where], 0.0)


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("options", _POISON_OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_a_bad_counted_label_poisons_the_fused_loss_and_its_gradients_under_jit(
    options, reduction, implementation):
  hidden, weight, bias, labels = _problem(9, 3, 11, seed=32)
  where = jnp.arange(9) != 4  # token 4 masked (any label there is padding)
  labels = labels.at[4].set(-5)
  objective = _poison_objective(where, reduction, options, True, implementation)
  value_and_grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))
  for bad_label in (-1, 11):  # token 2 counted, with a label out of range
    bad_labels = labels.at[2].set(bad_label)
    value, grads = value_and_grad(hidden, weight, bias, bad_labels)
    assert np.isnan(value)
    dhidden, dweight, dbias = (np.asarray(g) for g in grads)
    assert np.all(np.isnan(dhidden[2])) and np.all(np.isfinite(np.delete(dhidden, 2, 0)))
    assert np.all(np.isnan(dweight)) and np.all(np.isnan(dbias))
    with pytest.raises(ValueError, match=f"label {bad_label} at index 2 "):
      linear_xent(hidden, weight, bad_labels, bias_V=bias, where=where, reduction=reduction,
                  **options)


@pytest.mark.parametrize("implementation", ["cpu", "accelerator"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_returned_lse_of_masked_tokens_cannot_poison_an_auxiliary_loss(reduction, implementation):
  """A z-loss the caller writes on the returned lse (masked with jnp.where) differentiates
  the lse of masked tokens too: theirs is that of a zero hidden state, so NaN rows give
  finite values and exactly zero hidden gradients there."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32).at[1].set(jnp.nan).at[3, 0].set(jnp.inf)
  weight = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
  labels = jnp.array([0, -1, 2, 3, 4, 5])
  where = jnp.array([True, False, True, False, True, True])

  def total(h, w, b):
    loss, lse_N = fused.linear_softmax_cross_entropy(h, w, labels, bias_V=b, where=where,
                                                     reduction=reduction, return_lse=True,
                                                     implementation=implementation)
    return jnp.sum(loss) + 1e-2 * jnp.sum(jnp.where(where, lse_N, 0.0) ** 2) + jnp.sum(lse_N)

  _, lse_N = fused.linear_softmax_cross_entropy(hidden, weight, labels, bias_V=bias, where=where,
                                                return_lse=True)
  np.testing.assert_allclose(lse_N[1], jax.nn.logsumexp(bias), rtol=1e-6)  # a zero hidden row
  grads = jax.grad(total, argnums=(0, 1, 2))(hidden, weight, bias)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(grads[0])[[1, 3]], 0.0)


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("cotangent_kind", ["mean", "masked_mean_any_value_on_masked",
                                            "per_token_weights", "one_token"])
def test_per_token_losses_under_every_cotangent_match_the_materialised_reference(
    cotangent_kind, implementation):
  """The per-token loss's backward scales its forward's unit-cotangent gradients when the
  cotangent is one number on the counted tokens (whatever it is on masked ones) and
  recomputes dW and db otherwise; both agree with autodiff of the materialised loss."""
  with jax.enable_x64(True):
    hidden, weight, bias, labels = _problem(10, 3, 12, seed=41, dtype=np.float64)
    where = jnp.arange(10) % 4 != 2
    cotangent = {"mean": jnp.full(10, 0.1),
                 "masked_mean_any_value_on_masked": jnp.where(where, 0.25, 7.0),
                 "per_token_weights": jnp.linspace(-1.0, 2.0, 10),
                 "one_token": jnp.zeros(10).at[3].set(1.0)}[cotangent_kind]
    fused_fn = lambda h, w, b: jnp.sum(cotangent * linear_xent(
        h, w, labels, bias_V=b, where=where, vocab_chunk_size=5,
        **_IMPLEMENTATIONS[implementation]))
    ref_fn = lambda h, w, b: jnp.sum(cotangent * _unfused_options(h, w, b, labels, where))
    grads = jax.jit(jax.grad(fused_fn, argnums=(0, 1, 2)))(hidden, weight, bias)
    want = jax.grad(ref_fn, argnums=(0, 1, 2))(hidden, weight, bias)
    for got, expected in zip(grads, want):
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("mixed", [False, True])
def test_vmap_over_problems_gives_each_problem_its_own_gradient(mixed, implementation):
  """Under vmap the unit-cotangent shortcut is taken only when every problem's cotangent is
  one number (an unbatched predicate, no select of both branches); either way each problem
  gets exactly its own gradient."""
  problems = [_problem(8, 3, 10, seed=50 + i) for i in range(3)]
  stack = lambda i: jnp.stack([p[i] for p in problems])
  hidden, weight, bias, labels = stack(0), stack(1), stack(2), stack(3)
  cotangent = jnp.stack([jnp.full(8, 0.125), jnp.full(8, 2.0),
                         jnp.linspace(0.0, 1.0, 8) if mixed else jnp.full(8, -1.0)])

  def objective(h, w, b, y, c):
    return jnp.sum(c * linear_xent(h, w, y, bias_V=b, vocab_chunk_size=4,
                                   **_IMPLEMENTATIONS[implementation]))

  grad = jax.grad(objective, argnums=(0, 1, 2))
  batched = jax.jit(jax.vmap(grad))(hidden, weight, bias, labels, cotangent)
  for i in range(3):
    want = jax.grad(lambda h, w, b: jnp.sum(cotangent[i] * _unfused(h, w, b, labels[i])),
                    argnums=(0, 1, 2))(hidden[i], weight[i], bias[i])
    for got, expected in zip(batched, want):
      np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", sorted(_IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype,tolerance", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_half_precision_gradients_match_float32_of_the_same_inputs(dtype, tolerance, reduction,
                                                                   implementation):
  """Half-precision inputs: the gradients' values (not only their dtypes) agree with float32
  arithmetic on the same rounded inputs, in both forms; a mean's 1/N inside G must not
  underflow (float16 keeps G in float32 in the accelerator form)."""
  # N and V large enough that a mean's p / N falls below float16's smallest subnormal.
  hidden, weight, bias, labels = _problem(2048, 16, 16384, seed=25)
  half = lambda x: x.astype(dtype)
  f32 = lambda x: half(x).astype(jnp.float32)

  def grads(h, w, b):
    loss = lambda h, w, b: jnp.mean(linear_xent(h, w, labels, bias_V=b, reduction=reduction,
                                                **_IMPLEMENTATIONS[implementation]))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(h, w, b)

  got = grads(half(hidden), half(weight), half(bias))
  want = grads(f32(hidden), f32(weight), f32(bias))
  for g, w in zip(got, want):
    assert g.dtype == dtype
    g = np.asarray(g, np.float32)
    assert np.all(np.isfinite(g))
    error = np.linalg.norm(g - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert error < tolerance, error


def test_no_counted_token_gives_zero_gradients_whatever_the_cotangent_of_masked_ones():
  """An all-padding batch under a masked mean (0 / 0 = NaN cotangent on masked tokens): the
  loss is NaN as the unfused one is, but the scaled unit gradients stay exactly 0."""
  hidden, weight, bias, labels = _problem(6, 3, 7, seed=26)
  where = jnp.zeros(6, bool)
  for implementation in _IMPLEMENTATIONS:
    loss_fn = lambda h, w, b, i=implementation: jnp.sum(linear_xent(
        h, w, labels, bias_V=b, where=where, **_IMPLEMENTATIONS[i])) / jnp.sum(where)
    grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(hidden, weight, bias)
    for g in grads:
      np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("kind,expected", [("mean", True), ("sum", True),
                                            ("masked_mean", True), ("weights", False)])
def test_the_natural_calls_take_the_scaled_path(monkeypatch, kind, expected):
  """The cotangents jax.grad produces for .mean(), .sum() and a masked mean make the backward
  scale the forward's unit gradients (the fast path); per-token weights recompute. Under
  vmap the predicate stays one unbatched scalar."""
  seen = []
  one_number = fused._one_number

  def spy(g_N, used_N):
    result = one_number(g_N, used_N)
    jax.debug.callback(lambda r: seen.append(np.asarray(r).tolist()), result)
    return result

  monkeypatch.setattr(fused, "_one_number", spy)
  hidden, weight, bias, labels = _problem(10, 3, 12, seed=27)
  where = jnp.arange(10) % 3 != 0
  reduce = {"mean": lambda l: l.mean(), "sum": lambda l: l.sum(),
            "masked_mean": lambda l: jnp.sum(l) / jnp.sum(where),
            "weights": lambda l: jnp.sum(jnp.linspace(0.5, 1.5, 10) * l)}[kind]
  masked = {"where": where} if kind == "masked_mean" else {}
  loss = lambda h, w: reduce(linear_xent(h, w, labels, bias_V=bias, **masked))
  jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, weight)
  assert seen == [expected]
  seen.clear()
  jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(jnp.stack([hidden] * 3),
                                                     jnp.stack([weight] * 3))
  assert seen == [expected]  # one scalar for the whole batch, not three
