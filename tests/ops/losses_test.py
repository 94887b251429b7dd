"""Tests for lm_jax.ops.losses."""
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from lm_jax.ops import losses

xent = losses.softmax_cross_entropy_with_integer_labels

LOGITS = np.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]], np.float32)
LABELS = np.array([0, 1])
EXPECTED = np.array([0.2761, 2.9518])  # optax's docstring numbers.


def _random(shape, seed=0, scale=3.0, dtype=np.float32):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def _labels(shape, num_classes, seed=1):
  return np.random.default_rng(seed).integers(0, num_classes, size=shape)


def _numpy_xent(logits, labels):
  """float64 reference: log sum exp z - z[label], loop over rows."""
  logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  out = []
  for row, label in zip(logits, np.ravel(labels)):
    m = row.max()
    out.append(m + np.log(np.exp(row - m).sum()) - row[label])
  return np.array(out).reshape(np.shape(labels))


# Expected values and references.

def test_expected_values_match_optax():
  np.testing.assert_allclose(xent(LOGITS, LABELS), EXPECTED, atol=1e-4)
  np.testing.assert_allclose(
      xent(LOGITS, LABELS),
      optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS), rtol=1e-6)
  one_hot = jax.nn.one_hot(LABELS, 3)
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(LOGITS, one_hot), EXPECTED, atol=1e-4)
  np.testing.assert_allclose(
      losses.nll(jax.nn.log_softmax(LOGITS), LABELS), EXPECTED, atol=1e-4)


def test_integer_labels_match_numpy_float64_reference():
  logits, labels = _random((5, 7, 11)), _labels((5, 7), 11)
  np.testing.assert_allclose(xent(logits, labels), _numpy_xent(logits, labels),
                             rtol=1e-5, atol=1e-5)


def test_soft_labels_match_optax():
  logits = _random((4, 6))
  probs = jax.nn.softmax(_random((4, 6), seed=3))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, probs),
                             optax.softmax_cross_entropy(logits, probs), rtol=1e-5)


def test_sigmoid_binary_cross_entropy_matches_reference_and_optax():
  logits = _random((3, 5)).astype(np.float64)
  labels = np.random.default_rng(2).uniform(size=(3, 5))
  p = 1.0 / (1.0 + np.exp(-logits))
  expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  with jax.enable_x64(True):
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(logits, labels), expected, rtol=1e-10)
  np.testing.assert_allclose(
      losses.sigmoid_binary_cross_entropy(logits.astype(np.float32), labels),
      optax.sigmoid_binary_cross_entropy(logits.astype(np.float32), labels),
      rtol=1e-5)
  # The lecture's eq. 8.7 typo, (1 - y)(1 - log p), is a different function.
  typo = -(labels * np.log(p) + (1 - labels) * (1 - np.log(p)))
  assert not np.allclose(typo, expected)


def test_sigmoid_binary_cross_entropy_is_finite_for_huge_logits():
  logits = jnp.array([-1e4, -100.0, 100.0, 1e4])
  loss = losses.sigmoid_binary_cross_entropy(logits, jnp.array([1.0, 0.0, 1.0, 0.0]))
  np.testing.assert_allclose(loss, [1e4, 0.0, 0.0, 1e4], atol=1e-6)


# Gradients.

def test_custom_vjp_matches_autodiff_of_naive_formula_float64():
  with jax.enable_x64(True):
    logits, labels = _random((6, 9), dtype=np.float64), _labels((6,), 9)
    weights = np.linspace(0.5, 2.0, 6)

    def naive(z):
      log_p = jax.nn.log_softmax(z)
      return -jnp.sum(weights * jnp.take_along_axis(log_p, labels[:, None], 1)[:, 0])

    ours = jax.grad(lambda z: jnp.sum(weights * xent(z, labels)))(logits)
    np.testing.assert_allclose(ours, jax.grad(naive)(logits), rtol=1e-12, atol=1e-14)
    # Equation 8.11: p - y.
    expected = weights[:, None] * (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 9))
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-14)


def test_check_grads():
  with jax.enable_x64(True):
    logits, labels = _random((3, 5), dtype=np.float64), _labels((3,), 5)
    probs = jax.nn.softmax(_random((3, 5), seed=4, dtype=np.float64))
    axis0_labels = _labels((4,), 3)
    cases = [
        (lambda z: xent(z, labels), logits, 2, ["rev"]),  # custom_vjp: rev only
        (lambda z: xent(z, axis0_labels, axis=0), logits[:, :4], 1, ["rev"]),
        (lambda z: losses.softmax_cross_entropy(z, probs), logits, 2, ["rev"]),
        (lambda z: losses.softmax_cross_entropy(z, probs), logits, 1, ["fwd"]),
        (lambda z: losses.nll(z, labels), logits, 1, ["fwd", "rev"]),
        (lambda z: losses.sigmoid_binary_cross_entropy(z, probs), logits, 1,
         ["fwd", "rev"]),
    ]
    for f, x, order, modes in cases:
      check_grads(jax.jit(f), (x,), order=order, modes=modes)


def test_saved_residuals_hold_no_extra_NxV_tensor(capsys):
  logits, labels = jnp.asarray(_random((8, 50))), jnp.asarray(_labels((8,), 50))
  jax.ad_checkpoint.print_saved_residuals(lambda z: xent(z, labels).sum(), logits)
  lines = capsys.readouterr().out.strip().splitlines()
  big = [line for line in lines if "[8,50]" in line]
  assert len(big) == 1 and "from the argument" in big[0], lines
  # Besides the logits themselves, only [N]-sized residuals (lse, label indices, masks).
  sizes = [np.prod([int(d) for d in re.search(r"\[([\d,]*)\]", line).group(1).split(",") if d])
           for line in lines if line not in big]
  assert sizes and max(sizes) == 8, lines


def test_temp_memory_of_gradient_at_most_optax():
  logits, labels = jnp.asarray(_random((256, 2048))), jnp.asarray(_labels((256,), 2048))

  def temp_bytes(loss):
    grad = jax.jit(jax.grad(lambda z: loss(z, labels).sum()))
    return grad.lower(logits).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(xent) <= temp_bytes(optax.softmax_cross_entropy_with_integer_labels)


# Masks.

def test_row_mask_gives_zero_loss_and_zero_gradient():
  logits, labels = _random((4, 6)), np.array([1, -1, 3, 99])  # padding labels masked
  where = np.array([True, False, True, False])
  loss = np.asarray(xent(logits, labels, where=where))
  np.testing.assert_allclose(loss[[1, 3]], 0.0)
  np.testing.assert_allclose(loss[[0, 2]], _numpy_xent(logits[[0, 2]], labels[[0, 2]]),
                             rtol=1e-5)
  for f in (lambda z: xent(z, labels, where=where).sum(),
            jax.jit(lambda z: xent(z, labels, where=where).sum())):
    grad = np.asarray(jax.grad(f)(logits))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[[1, 3]], 0.0)


def test_element_mask_excludes_logits_from_normaliser_and_fully_masked_rows_give_zero():
  logits = _random((3, 5))
  labels = np.array([0, 2, 4])
  where = np.ones((3, 5), bool)
  where[0, 3:] = False
  where[2, :] = False
  logits[2, :] = -np.inf  # even garbage in a fully masked row stays harmless
  loss = xent(logits, labels, where=where)
  np.testing.assert_allclose(loss[0], _numpy_xent(logits[:1, :3], labels[:1])[0], rtol=1e-5)
  np.testing.assert_allclose(loss[1], _numpy_xent(logits[1:2], labels[1:2])[0], rtol=1e-5)
  assert loss[2] == 0.0
  grad = jax.grad(lambda z: xent(z, labels, where=where).sum())(logits)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0, 3:], 0.0)
  np.testing.assert_array_equal(grad[2], 0.0)
  # As optax: a masked label's own logit is still read (lse over the unmasked logits - z_y).
  masked_label = xent(logits[:1], np.array([4]), where=where[:1])[0]
  np.testing.assert_allclose(
      masked_label, jax.nn.logsumexp(logits[0, :3]) - logits[0, 4], rtol=1e-6)
  np.testing.assert_allclose(masked_label, optax.softmax_cross_entropy_with_integer_labels(
      logits[:1], np.array([4]), where=where[:1])[0], rtol=1e-6)


def test_masks_of_soft_label_and_nll_losses():
  logits, labels = _random((3, 4)), np.array([0, 1, 2])
  one_hot = jax.nn.one_hot(labels, 4)
  where = np.array([True, False, True])
  for loss in (losses.softmax_cross_entropy(logits, one_hot, where=where),
               losses.nll(jax.nn.log_softmax(logits), labels, where=where)):
    np.testing.assert_allclose(loss, xent(logits, labels, where=where), rtol=1e-6)
    assert loss[1] == 0.0
  grad = jax.grad(lambda z: losses.softmax_cross_entropy(
      z, one_hot, where=np.zeros((3, 4), bool)).sum())(logits)
  np.testing.assert_array_equal(grad, 0.0)


# Axes.

def test_axis_zero_and_moved_axes_agree_with_last_axis():
  logits, labels = _random((2, 7, 3)), _labels((2, 3), 7)
  moved = np.moveaxis(logits, 1, -1)
  np.testing.assert_allclose(xent(logits, labels, axis=1), xent(moved, labels), rtol=1e-6)
  np.testing.assert_allclose(xent(logits, labels, axis=-2), xent(moved, labels), rtol=1e-6)
  np.testing.assert_allclose(xent(logits[0], labels[0], axis=0), xent(moved[0], labels[0]),
                             rtol=1e-6)
  grad_axis = jax.grad(lambda z: xent(z, labels, axis=1).sum())(logits)
  grad_last = jax.grad(lambda z: xent(z, labels).sum())(moved)
  np.testing.assert_allclose(grad_axis, np.moveaxis(grad_last, -1, 1), rtol=1e-6)
  probs = jax.nn.one_hot(labels, 7, axis=1)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, probs, axis=1),
                             xent(logits, labels, axis=1), rtol=1e-6)
  np.testing.assert_allclose(losses.nll(jax.nn.log_softmax(logits, 1), labels, axis=1),
                             xent(logits, labels, axis=1), rtol=1e-5)


def test_tuple_axis_matches_optax():
  logits = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
  labels = np.ravel_multi_index((np.array([[1, 2]]), np.array([[1, 3]])), (3, 4))
  np.testing.assert_allclose(xent(logits, labels, axis=(2, 3)), [[6.4587, 0.4587]],
                             atol=1e-4)
  logits = _random((3, 4, 5))
  labels = _labels((4,), 15)
  np.testing.assert_allclose(
      xent(logits, labels, axis=(0, 2)),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=(0, 2)),
      rtol=1e-5)


# Numerics and dtypes.

def test_huge_and_negative_infinite_logits():
  logits = np.array([[1e4, 0.0, -1e4], [-np.inf, 2.0, 1.0], [-np.inf, -np.inf, -np.inf]],
                    np.float32)
  labels = np.array([1, 1, 0])
  loss = xent(logits, labels)
  np.testing.assert_allclose(loss[:2], [1e4, np.log1p(np.exp(-1.0))], rtol=1e-6)
  assert np.isnan(loss[2])  # no distribution at all: documented NaN
  grad = jax.grad(lambda z: xent(z[:2], labels[:2]).sum())(logits)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0], [1.0, -1.0, 0.0], atol=1e-6)
  # A zero-probability label is +inf, not NaN.
  assert xent(logits[1:2], np.array([0]))[0] == np.inf
  # 0 log 0 = 0 in the soft-label loss.
  probs = np.array([[0.0, 0.5, 0.5]], np.float32)
  assert np.isfinite(losses.softmax_cross_entropy(logits[1:2], probs)[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_dtype_and_accuracy(dtype):
  logits, labels = _random((4, 300), scale=5.0), _labels((4,), 300)
  low = jnp.asarray(logits, dtype)
  reference = _numpy_xent(np.asarray(low, np.float32), labels)
  for loss in (xent(low, labels),
               losses.softmax_cross_entropy(low, jax.nn.one_hot(labels, 300, dtype=dtype))):
    assert loss.dtype == dtype
    np.testing.assert_allclose(np.asarray(loss, np.float32), reference, rtol=1e-2)
  grad = jax.grad(lambda z: xent(z, labels).astype(jnp.float32).sum())(low)
  assert grad.dtype == dtype
  assert losses.sigmoid_binary_cross_entropy(low, jnp.ones_like(low)).dtype == dtype


def test_jit_and_vmap_agree_with_eager():
  logits, labels = _random((3, 4, 6)), _labels((3, 4), 6)
  eager = xent(logits, labels)
  np.testing.assert_allclose(jax.jit(xent)(logits, labels), eager, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(xent)(logits, labels), eager, rtol=1e-6)
  vmapped_grad = jax.vmap(jax.grad(lambda z, y: xent(z, y).sum()))(logits, labels)
  np.testing.assert_allclose(
      vmapped_grad, jax.grad(lambda z: xent(z, labels).sum())(logits), rtol=1e-6)


# Out-of-range labels and bad input.

@pytest.mark.parametrize("bad_label", [-1, 5, 1000])
def test_out_of_range_labels_are_nan_under_jit(bad_label):
  logits, labels = _random((3, 5)), np.array([0, bad_label, 2])
  loss = np.asarray(jax.jit(xent)(logits, labels))
  assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
  grad = np.asarray(jax.jit(jax.grad(lambda z, y: xent(z, y).sum()))(logits, labels))
  assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(grad[[0, 2]]))
  assert np.isnan(jax.jit(losses.nll)(jax.nn.log_softmax(logits), labels)[1])


def test_label_dtypes_never_wrap_into_range():
  logits = _random((2, 300))
  labels = np.array([200, 7], np.uint8)
  np.testing.assert_allclose(xent(logits, labels), _numpy_xent(logits, labels), rtol=1e-5)
  grad = jax.grad(lambda z: xent(z, labels).sum())(logits)
  np.testing.assert_allclose(grad[0, 200], jax.nn.softmax(logits[0])[200] - 1, rtol=1e-5)
  with jax.enable_x64(True):
    wrapping = np.array([2**32 + 1, 1], np.int64)  # 1 after a cast to int32
    loss = np.asarray(jax.jit(xent)(logits, wrapping))
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    with pytest.raises(ValueError, match=f"label {2**32 + 1} "):
      xent(logits, wrapping)


def test_out_of_range_labels_raise_eagerly():
  logits = _random((3, 5))
  with pytest.raises(ValueError, match=r"label 7 at index 1 .*V=5"):
    xent(logits, np.array([0, 7, 2]))
  with pytest.raises(ValueError, match=r"label -1 .*V=5"):
    losses.nll(logits, np.array([-1, 0, 0]))
  with pytest.raises(ValueError, match=r"label 12 .*V=12"):
    xent(_random((2, 3, 4)), np.array([1, 12]), axis=(1, 2))


def test_bad_dtypes_shapes_and_arguments_raise():
  logits, labels = _random((3, 5)), np.array([0, 1, 2])
  with pytest.raises(ValueError, match="logits must have a floating dtype, got int"):
    xent(np.ones((3, 5), np.int32), labels)
  with pytest.raises(ValueError, match="labels must have an integer dtype, got float"):
    xent(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match=r"labels has shape \(4,\); expected \(3,\)"):
    xent(logits, np.arange(4))
  with pytest.raises(ValueError, match=r"where has shape \(5,\); expected"):
    xent(logits, labels, where=np.ones(5, bool))
  with pytest.raises(ValueError, match="where must be a boolean mask"):
    xent(logits, labels, where=np.ones(3))
  with pytest.raises(ValueError, match="axis 2 is out of bounds or repeated"):
    xent(logits, labels, axis=2)
  with pytest.raises(ValueError, match=r"axis \(1, -1\) is out of bounds or repeated"):
    xent(logits, labels, axis=(1, -1))
  with pytest.raises(ValueError, match="axis must be an int or a non-empty tuple"):
    xent(logits, labels, axis=None)
  with pytest.raises(ValueError, match=r"labels has shape \(4,\)"):
    losses.softmax_cross_entropy(logits, np.ones(4))
  with pytest.raises(ValueError, match=r"labels has shape \(2, 3, 5\)"):
    losses.softmax_cross_entropy(logits, np.ones((2, 3, 5)))
  with pytest.raises(ValueError, match="logits must have a floating dtype"):
    losses.sigmoid_binary_cross_entropy(np.ones(3, np.int32), np.ones(3))
  with pytest.raises(ValueError, match=r"labels has shape \(4,\)"):
    losses.sigmoid_binary_cross_entropy(np.ones(3), np.ones(4))


# Properties the maths promises.

_ROWS = hnp.arrays(np.float32, (3, 6), elements=st.floats(-20, 20, width=32))


@settings(deadline=None, max_examples=40)
@given(_ROWS, hnp.arrays(np.int64, (3,), elements=st.integers(0, 5)),
       st.floats(-50, 50))
def test_cross_entropy_equals_nll_of_log_softmax_and_one_hot_version(logits, labels, shift):
  """Eq. 8.9: CE = NLL; integer and one-hot labels agree; shifts change nothing."""
  loss = xent(logits, labels)
  assert np.all(loss >= 0)
  np.testing.assert_allclose(losses.nll(jax.nn.log_softmax(logits), labels), loss,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 6)), loss,
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(xent(logits + np.float32(shift), labels), loss,
                             rtol=1e-4, atol=1e-4)


@settings(deadline=None, max_examples=30)
@given(_ROWS, hnp.arrays(np.int64, (3,), elements=st.integers(0, 5)))
def test_gradient_is_softmax_minus_one_hot_and_rows_sum_to_zero(logits, labels):
  grad = jax.grad(lambda z: xent(z, labels).sum())(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - jax.nn.one_hot(labels, 6),
                             atol=1e-6)
  np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-5)


# optax parity, argument by argument: values, reverse- and forward-mode derivatives.

def _masks(shape, axis, kind, seed):
  """None, a per-example mask (at least one example kept) or a per-element mask."""
  rng = np.random.default_rng(seed)
  if kind == "none":
    return None
  if kind == "example":
    batch_shape = tuple(d for a, d in enumerate(shape) if a != axis % len(shape))
    mask = rng.random(batch_shape) < 0.6
    mask.flat[0] = True
    return mask
  mask = rng.random(shape) < 0.7
  mask.flat[-1] = False  # some masked label somewhere
  return mask


def _assert_matches_where_optax_is_finite(ours, theirs, rtol=1e-5, atol=1e-6):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    defined = np.isfinite(b)
    assert np.all(np.isfinite(a[defined]))
    scale = max(1.0, float(np.max(np.abs(b[defined]), initial=0.0)))  # float32 sums
    np.testing.assert_allclose(a[defined], b[defined], rtol=rtol, atol=atol * scale)


# The fast suite checks every mask on the first case; the other axes run in the full suite.
_PARITY_CASES = [((5, 7), -1)] + [pytest.param(*case)
                                  for case in (((5, 7), 0), ((3, 4, 6), 1))]


@pytest.mark.parametrize("shape,axis", _PARITY_CASES)
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_integer_labels_match_optax_in_value_grad_jvp_and_hessian(shape, axis, mask):
  logits = _random(shape, seed=3)
  num_classes = shape[axis]
  labels = _labels(tuple(d for a, d in enumerate(shape) if a != axis % len(shape)),
                   num_classes, seed=4)
  where = _masks(shape, axis, mask, seed=5)
  ours = lambda z: losses.softmax_cross_entropy_with_integer_labels(z, labels, axis, where)
  theirs = lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, labels, axis, None if where is None else jnp.asarray(where))
  _assert_matches_where_optax_is_finite(ours(logits), theirs(logits))
  total = lambda f: (lambda z: jnp.sum(f(z) * jnp.arange(1.0, 1.0 + f(z).size).reshape(
      f(z).shape)))
  _assert_matches_where_optax_is_finite(jax.jit(jax.grad(total(ours)))(logits),
                                        jax.jit(jax.grad(total(theirs)))(logits))
  tangent = _random(shape, seed=6)
  jvp = lambda f: jax.jit(lambda z, t: jax.jvp(f, (z,), (t,)))
  _assert_matches_where_optax_is_finite(jvp(ours)(logits, tangent), jvp(theirs)(logits, tangent))
  _assert_matches_where_optax_is_finite(jax.jit(jax.hessian(total(ours)))(logits),
                                        jax.jit(jax.hessian(total(theirs)))(logits), atol=1e-5)
  # The integer labels get a float0 (zero) cotangent from both.
  label_grad = jax.grad(lambda y: total(lambda z: losses.softmax_cross_entropy_with_integer_labels(
      z, y, axis, where))(logits), allow_int=True)(labels)
  assert label_grad.dtype == jax.dtypes.float0


@pytest.mark.parametrize("shape,axis", _PARITY_CASES + [((3, 4, 6), (0, 2))])  # (tuple axis)
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_soft_labels_match_optax_for_logits_and_label_gradients(shape, axis, mask):
  logits = _random(shape, seed=7)
  probs = np.asarray(jax.nn.softmax(_random(shape, seed=8), axis=axis))
  probs = np.where(np.random.default_rng(9).random(shape) < 0.3, 0.0, probs)  # exact zeros
  if isinstance(axis, tuple):
    where = None if mask == "none" else (
        _masks(shape, -1, "element", 10) if mask == "element" else
        np.random.default_rng(10).random(shape[1]) < 0.6)
  else:
    where = _masks(shape, axis, mask, seed=10)
  ours = lambda z, y: losses.softmax_cross_entropy(z, y, axis, where)
  theirs = lambda z, y: optax.softmax_cross_entropy(
      z, y, axis, None if where is None else jnp.asarray(where))
  _assert_matches_where_optax_is_finite(ours(logits, probs), theirs(logits, probs))
  weight = lambda f: (lambda z, y: jnp.sum(f(z, y) * jnp.arange(1.0, 1.0 + f(z, y).size
                                                                ).reshape(f(z, y).shape)))
  _assert_matches_where_optax_is_finite(
      jax.jit(jax.grad(weight(ours), argnums=(0, 1)))(logits, probs),
      jax.jit(jax.grad(weight(theirs), argnums=(0, 1)))(logits, probs))
  tangents = (_random(shape, seed=11), _random(shape, seed=12))
  jvp = lambda f: jax.jit(lambda z, y, t: jax.jvp(f, (z, y), t))
  _assert_matches_where_optax_is_finite(jvp(ours)(logits, probs, tangents),
                                        jvp(theirs)(logits, probs, tangents))
  _assert_matches_where_optax_is_finite(jax.jit(jax.hessian(weight(ours)))(logits, probs),
                                        jax.jit(jax.hessian(weight(theirs)))(logits, probs),
                                        atol=1e-5)


def test_soft_label_gradient_at_zero_targets_is_minus_log_softmax():
  # The example: logits [1, 2, 3], targets [0, .5, .5].
  logits, probs = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 0.5, 0.5])
  grad = jax.grad(losses.softmax_cross_entropy, argnums=1)(logits, probs)
  np.testing.assert_allclose(grad, [2.4076, 1.4076, 0.4076], atol=1e-4)
  np.testing.assert_allclose(grad, -jax.nn.log_softmax(logits), rtol=1e-6)


def test_sigmoid_binary_cross_entropy_matches_optax_for_both_arguments():
  logits, labels = _random((4, 5), seed=13), np.random.default_rng(14).random((4, 5))
  f = lambda z, y: jnp.sum(losses.sigmoid_binary_cross_entropy(z, y) * jnp.arange(20.0).reshape(4, 5))
  g = lambda z, y: jnp.sum(optax.sigmoid_binary_cross_entropy(z, y) * jnp.arange(20.0).reshape(4, 5))
  _assert_matches_where_optax_is_finite(jax.grad(f, argnums=(0, 1))(logits, labels),
                                        jax.grad(g, argnums=(0, 1))(logits, labels))
  tangents = (_random((4, 5), seed=15), _random((4, 5), seed=16))
  _assert_matches_where_optax_is_finite(jax.jvp(f, (logits, labels), tangents),
                                        jax.jvp(g, (logits, labels), tangents))


def test_forward_mode_of_integer_labels_in_float64_matches_finite_differences():
  with jax.enable_x64(True):
    logits, labels = _random((3, 5), dtype=np.float64), _labels((3,), 5)
    check_grads(lambda z: xent(z, labels), (logits,), order=2, modes=("fwd", "rev"))


# Borrowed names keep their promise: optax's keywords and positions, values and gradients.

_OPTAX_CALLS = {
    # name: (arguments as optax names them, keywords of the optional ones)
    "softmax_cross_entropy": lambda: (dict(logits=_random((4, 5), seed=30),
                                           labels=np.asarray(jax.nn.softmax(_random((4, 5), 31)))),
                                      dict(axis=-1, where=np.array([True, False, True, True]))),
    "softmax_cross_entropy_with_integer_labels": lambda: (
        dict(logits=_random((4, 5), seed=32), labels=_labels((4,), 5, seed=33)),
        dict(axis=-1, where=np.array([True, True, False, True]))),
    "sigmoid_binary_cross_entropy": lambda: (
        dict(logits=_random((4, 5), seed=34), labels=np.random.default_rng(35).random((4, 5))),
        {}),
}


@pytest.mark.parametrize("name", sorted(_OPTAX_CALLS))
@pytest.mark.parametrize("style", ["keywords", "positional"])
def test_optax_names_take_optax_arguments_and_agree_in_value_and_gradient(name, style):
  args, options = _OPTAX_CALLS[name]()
  ours, theirs = getattr(losses, name), getattr(optax.losses, name)
  float_names = [k for k, v in args.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]

  def total(fn):
    def objective(*floats):
      call = dict(args, **dict(zip(float_names, floats)))
      out = (fn(**call, **options) if style == "keywords"
             else fn(*call.values(), *options.values()))
      return jnp.sum(out * jnp.arange(1.0, 1.0 + out.size).reshape(out.shape))
    return objective

  floats = [args[k] for k in float_names]
  argnums = tuple(range(len(floats)))
  value, grads = jax.value_and_grad(total(ours), argnums)(*floats)
  want_value, want_grads = jax.value_and_grad(total(theirs), argnums)(*floats)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  # optax's label gradient is NaN in excluded rows (0 * -inf); lm_jax's is 0 there.
  _assert_matches_where_optax_is_finite(grads, want_grads)


def test_softmax_cross_entropy_takes_axis_none_as_optax():
  logits, labels = _random((2, 3), seed=36), np.asarray(jax.nn.softmax(_random((6,), 37)))
  labels = labels.reshape(2, 3)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels, axis=None),
                             optax.softmax_cross_entropy(logits, labels, axis=None), rtol=1e-6)


# Padding cannot poison: NaN or inf where `where` is False gives 0 and zero, finite gradients.

def _poisoned_padding(kind, bad):
  """Logits and soft targets holding ``bad`` wherever ``where`` excludes them; the mask,
  the excluded entries, and integer labels (-1 padding in excluded rows)."""
  logits = _random((4, 6), seed=40)
  soft = np.array(jax.nn.softmax(_random((4, 6), seed=41)))
  if kind == "example":
    where = np.array([True, False, True, False])
    excluded = np.broadcast_to(~where[:, None], logits.shape)
  else:  # per element: row 3 fully masked, rows 0 and 2 partly (never the label's logit)
    where = np.ones((4, 6), bool)
    where[0, 4:] = where[2, :2] = where[3] = False
    excluded = ~where
  logits[excluded] = soft[excluded] = bad
  labels = np.where(excluded.all(-1), -1, np.array([1, 0, 3, 2]))
  return logits, soft, where, excluded, labels


_KERNELS = {
    "integer_labels": lambda z, s, y, where: xent(z, y, where=where),
    "soft_labels": lambda z, s, y, where: losses.softmax_cross_entropy(z, s, where=where),
    "nll": lambda z, s, y, where: losses.nll(z, y, where=where),
}


@pytest.mark.parametrize("kernel", sorted(_KERNELS))
@pytest.mark.parametrize("kind", ["example", "element"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_padding_cannot_poison_the_loss_kernels(kernel, kind, bad):
  logits, soft, where, excluded, labels = _poisoned_padding(kind, bad)
  clean_logits, clean_soft, *_ = _poisoned_padding(kind, 0.0)
  objective = lambda z, s: jnp.sum(_KERNELS[kernel](z, s, labels, where) * jnp.arange(1.0, 5.0))
  for f in (objective, jax.jit(objective)):
    loss = np.asarray(_KERNELS[kernel](logits, soft, labels, where))
    np.testing.assert_array_equal(loss[excluded.all(-1)], 0.0)
    # The padding's values change nothing: the same loss and gradients as with zeros there.
    np.testing.assert_array_equal(loss, _KERNELS[kernel](clean_logits, clean_soft, labels, where))
    value, grads = jax.value_and_grad(f, argnums=(0, 1))(logits, soft)
    want_value, want_grads = jax.value_and_grad(objective, argnums=(0, 1))(clean_logits,
                                                                           clean_soft)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for grad, want_grad in zip(grads, want_grads):
      grad = np.asarray(grad)
      assert np.all(np.isfinite(grad))
      np.testing.assert_array_equal(grad[excluded], 0.0)
      np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


# A bad target poisons: NaN loss and a non-finite gradient under jit; ValueError eagerly.

@pytest.mark.parametrize("kernel", ["integer_labels", "nll"])
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_an_out_of_range_counted_label_poisons_loss_and_gradient_under_jit(kernel, mask):
  logits, labels = _random((3, 5), seed=41), np.array([0, 7, 2])
  where = {"none": None, "example": np.array([True, True, False]),
           "element": np.array([[True] * 5, [True, True, False, True, True], [False] * 5])}[mask]
  fn = {"integer_labels": xent, "nll": losses.nll}[kernel]
  loss = np.asarray(jax.jit(lambda z, y: fn(z, y, where=where))(logits, labels))
  assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
  for reduce in (jnp.sum, jnp.mean, lambda loss: loss[0]):  # even a zero cotangent on it
    grad = np.asarray(jax.jit(jax.grad(lambda z, y: reduce(fn(z, y, where=where))))(
        logits, labels))
    assert not np.all(np.isfinite(grad[1])), (reduce, grad)
    assert np.all(np.isfinite(grad[[0, 2]]))
  with pytest.raises(ValueError, match=r"label 7 at index 1 "):
    fn(logits, labels, where=where)


# What reverse mode keeps: the docstring's list, measured.

def _saved_residuals(capsys, fn, *args):
  jax.ad_checkpoint.print_saved_residuals(fn, *args)
  lines = capsys.readouterr().out.strip().splitlines()
  shapes = [(line.split("[")[0], tuple(int(d) for d in re.search(r"\[([\d,]*)\]", line).group(1)
                                       .split(",") if d), line) for line in lines]
  return shapes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_integer_label_residuals_are_the_arguments_and_N_sized_arrays(capsys, dtype, mask):
  n, v = 6, 40
  logits = jnp.asarray(_random((n, v), seed=42), dtype)
  labels = jnp.asarray(_labels((n,), v, seed=43))
  where = {"none": None, "example": np.arange(n) % 3 != 0,
           "element": np.random.default_rng(44).random((n, v)) < 0.8}[mask]
  if where is None:
    residuals = _saved_residuals(capsys, lambda z: xent(z, labels).sum(), logits)
  else:
    residuals = _saved_residuals(capsys, lambda z, m: xent(z, labels, where=m).sum(),
                                 logits, jnp.asarray(where))
  big = [(kind, line) for kind, shape, line in residuals if np.prod(shape) > n]
  want = [("bf16" if dtype == jnp.bfloat16 else "f32", "from the argument z")]
  if mask == "element":
    want.append(("bool", "from the argument m"))
  assert sorted(kind for kind, _ in big) == sorted(kind for kind, _ in want), residuals
  for (kind, line), (_, origin) in zip(sorted(big), sorted(want)):
    assert origin in line, residuals


def test_hessian_with_a_fully_masked_row_is_finite_and_optax_s():
  """An element mask that leaves a whole row out: the row's normaliser must not be all -inf
  on any differentiation path (second order included); values match optax's."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  labels = jnp.array([0, 1, 2])
  mask = jnp.ones((3, 4), bool).at[1].set(False).at[2, 3].set(False)
  ours = lambda z: losses.softmax_cross_entropy_with_integer_labels(z, labels, where=mask).sum()
  theirs = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels, where=mask).sum()
  hessian = jax.hessian(ours)(logits)
  assert np.all(np.isfinite(np.asarray(hessian)))
  np.testing.assert_allclose(hessian, jax.hessian(theirs)(logits), atol=1e-6)
  np.testing.assert_array_equal(hessian[1], 0.0)
