r"""Classification losses in nats, with optax's names and signatures.

Every loss returns one value per example (unreduced); the caller averages.
They agree with optax's functions of the same names in value and in the
gradient with respect to every argument, ``where`` semantics included, in
reverse and forward mode (``tests/losses_test.py`` compares them directly).
``softmax_cross_entropy_with_integer_labels`` differentiates its logsumexp by a
``jax.custom_jvp`` whose tangent :math:`\sum_v \mathrm{softmax}(z)_v\, \dot z_v`
is rematerialised (``jax.checkpoint``): reverse mode keeps only the ``[N]``
log-normalisers besides the logits and recomputes ``g exp(z - lse)`` in one
elementwise pass (lecture equation 8.11), so no ``[N, V]`` probability tensor is
stored, while ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` work as for any JAX
function. Argument checks run eagerly; the arithmetic is one ``jit``-compiled call.
"""
import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm_jax.ops.softmax import log_softmax as _log_softmax

Axis = Union[int, tuple[int, ...]]


def _compute_dtype(dtype) -> jnp.dtype:
  """float32 for bf16/f16 (and f32), float64 for f64."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_dtype(name: str, x: jax.Array, kind, kind_name: str) -> None:
  if not jnp.issubdtype(x.dtype, kind):
    raise ValueError(f"{name} must have {kind_name} dtype, got {x.dtype}.")


def _axes_and_masks(logits: jax.Array, axis: Axis, where):
  """Canonical class axes, batch shape and ``(element_mask, row_mask)``.

  ``where`` is optax's: a per-example mask (the batch shape) or an element
  mask (the logits shape; an example is included when any element is).
  """
  ndim = logits.ndim
  if isinstance(axis, (int, np.integer)) or (isinstance(axis, tuple) and axis):
    axes = tuple(int(a) for a in np.atleast_1d(axis))
  else:
    raise ValueError(
        f"axis must be an int or a non-empty tuple of ints, got {axis!r}.")
  if (not all(-ndim <= a < ndim for a in axes)
      or len({a % ndim for a in axes}) < len(axes)):
    raise ValueError(
        f"axis {axis!r} is out of bounds or repeated for logits of rank {ndim}.")
  axes = tuple(a % ndim for a in axes)
  batch_shape = tuple(d for a, d in enumerate(logits.shape) if a not in axes)
  if where is None:
    return axes, batch_shape, None, None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise ValueError(f"where must be a boolean mask, got dtype {where.dtype}.")
  if where.shape == logits.shape:
    return axes, batch_shape, where, None
  if where.shape == batch_shape:
    return axes, batch_shape, None, where
  raise ValueError(
      f"where has shape {where.shape}; expected the per-example shape "
      f"{batch_shape} or the logits shape {logits.shape}.")


def _check_labels_in_range(labels, num_classes, axes, element_mask, row_mask):
  """Raises ValueError for out-of-range concrete labels of included examples."""
  if any(isinstance(x, jax.core.Tracer) for x in (labels, element_mask, row_mask)):
    return
  labels_np = np.asarray(labels)
  bad = ~((labels_np >= 0) & (labels_np < num_classes))  # exact for every int dtype
  if row_mask is not None:
    bad &= np.asarray(row_mask)
  if element_mask is not None:
    bad &= np.any(np.asarray(element_mask), axis=axes)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"label {int(labels_np[index])} at index {index} is out of range for "
        f"vocabulary size V={num_classes} (labels must lie in [0, {num_classes})).")


def _prepare_integer_labels(logits, labels, axis, where):
  """Checks dtypes, shapes and concrete labels; returns arrays and axes."""
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_dtype("logits", logits, jnp.floating, "a floating")
  _check_dtype("labels", labels, jnp.integer, "an integer")
  axes, batch_shape, element_mask, row_mask = _axes_and_masks(logits, axis, where)
  if labels.shape != batch_shape:
    raise ValueError(
        f"labels has shape {labels.shape}; expected {batch_shape}, the logits "
        f"shape {logits.shape} without class axis {axis!r}.")
  num_classes = math.prod(logits.shape[a] for a in axes)
  _check_labels_in_range(labels, num_classes, axes, element_mask, row_mask)
  return logits, labels, axes, element_mask, row_mask


def _flatten_class_axes(x, axes: tuple[int, ...]) -> tuple[jax.Array, int]:
  """Moves the class axes last and flattens them into one (optax's rule)."""
  if len(axes) == 1:
    return x, axes[0]
  batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
  x = jnp.transpose(x, batch_axes + axes)
  return x.reshape(x.shape[:len(batch_axes)] + (-1,)), len(batch_axes)


def _apply_masks(x, element_mask, row_mask, axes):
  """Masks elements with ``-inf``; returns ``(x, axis, row_mask)``, flattened."""
  if element_mask is not None:
    x = jnp.where(element_mask, x, -jnp.inf)
    row_mask = jnp.any(element_mask, axis=axes)
  x, axis = _flatten_class_axes(x, axes)
  return x, axis, row_mask


def _int32_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """int32 labels with every out-of-range label (of any integer dtype) as -1."""
  valid = labels >= 0
  if jnp.iinfo(labels.dtype).max >= num_classes:
    valid &= labels < jnp.asarray(num_classes, labels.dtype)
  return jnp.where(valid, labels, -1).astype(jnp.int32)


def _gather_labels(x: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """``x[..., label, ...]`` along ``axis`` for int32 labels; NaN where label < 0."""
  valid = labels >= 0
  safe = jnp.expand_dims(jnp.where(valid, labels, 0), axis)
  picked = jnp.take_along_axis(x, safe, axis=axis).squeeze(axis)
  return jnp.where(valid, picked, jnp.nan)


def _log_normalizer(x: jax.Array, axis: int) -> jax.Array:
  """Max-shifted logsumexp over ``axis`` (no keepdims); -inf for all -inf rows."""
  # Rows without mass (all -inf) take the shift finfo.min instead of -inf, so they
  # give exp(-inf) = 0 and lse = -inf rather than NaN.
  x_max = lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True),
                                        jnp.finfo(x.dtype).min))
  return (jnp.log(jnp.sum(jnp.exp(x - x_max), axis=axis, keepdims=True))
          + x_max).squeeze(axis)


def _lse_tangent(x, lse, dx, axis):
  """``sum_v softmax(x)_v dx_v`` from the saved ``lse``: linear in ``dx``, one elementwise pass."""
  # A row without mass (all -inf) has lse = -inf; shifting by finfo.min instead keeps
  # exp(x - lse) = 0 (not NaN), so the zero cotangents of masked rows give zero gradients.
  lse = jnp.maximum(lse, jnp.finfo(lse.dtype).min)
  return jnp.sum(jnp.exp(x - jnp.expand_dims(lse, axis)) * dx, axis=axis)


# Rematerialised: in reverse mode the linearised rule keeps only its inputs (the logits,
# already alive, and the [N] lse) and recomputes exp(x - lse) in the backward pass, so no
# [N, V] probability tensor is stored; forward mode and higher orders differentiate it as is.
_lse_tangent_remat = jax.checkpoint(_lse_tangent, static_argnums=(3,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _logsumexp(x, axis):
  """Max-shifted logsumexp whose derivative is ``softmax(x) . dx``, computed without residuals."""
  return _log_normalizer(x, axis)


@_logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
  (x,), (dx,) = primals, tangents
  lse = _log_normalizer(x, axis)
  return lse, _lse_tangent_remat(x, lse, dx, axis)


def _integer_label_xent(logits, labels, axis, element_mask, row_mask):
  """``lse(masked logits) - logits[label]`` in float32 (or wider), 0 where ``row_mask`` is False.

  ``labels`` are int32 with -1 for out of range: a counted row with such a label gets a NaN
  loss and, through a constant NaN factor, a NaN gradient row; a masked row stays 0 with a
  zero gradient. As optax, the label's logit is read from the unmasked logits even where
  the element mask leaves it out of the normaliser.
  """
  x = logits.astype(_compute_dtype(logits.dtype))
  x_masked = x if element_mask is None else jnp.where(element_mask, x, -jnp.inf)
  valid = labels >= 0
  safe = jnp.expand_dims(jnp.where(valid, labels, 0), axis)
  label_logit = jnp.take_along_axis(x, safe, axis=axis).squeeze(axis)
  loss = _logsumexp(x_masked, axis) - label_logit
  counted = valid if row_mask is None else valid | ~row_mask
  loss = loss * jnp.where(counted, 1.0, jnp.nan).astype(loss.dtype)
  if row_mask is not None:
    loss = jnp.where(row_mask, loss, 0.0)
  return loss.astype(logits.dtype)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Softmax cross-entropy with integer labels, in nats, one normaliser.

  .. math::
    \ell_n = \log \sum_{v} \exp z_{n v} - z_{n, y_n}
           = -\log \mathrm{softmax}(z_n)_{y_n},
    \qquad
    \frac{\partial \ell_n}{\partial z_{n v}} = p_{n v} - [v = y_n].

  Reverse mode saves only the ``[N]`` log-normalisers besides the logits and
  recomputes ``g exp(z - lse)`` in one elementwise pass (lecture equation
  8.11); forward mode (``jax.jvp``, ``jax.hessian``) works too. Computed in
  float32 for bfloat16/float16 logits; the loss and gradient have the logits'
  dtype.

  Out-of-range labels (``< 0`` or ``>= V``) raise ``ValueError`` when the labels
  are concrete, and give a NaN loss (and gradient) under ``jit``; never a finite
  wrong loss. Rows excluded by ``where`` may hold any label (e.g. -1 padding). A row whose logits are all ``-inf`` has no distribution: NaN.

  Args:
    logits: ``logits_NxV``, floating, unnormalised log-probabilities; any
      batch shape, classes along ``axis``.
    labels: ``labels_N``, integer, shape ``logits.shape`` without ``axis``.
    axis: class axis, or a tuple of axes flattened (row-major, as optax) into
      one class index.
    where: optional boolean mask, per example (``labels.shape``) or per element
      (``logits.shape``; masked logits are excluded from the normaliser, while
      the label's own logit is read even where masked, exactly as optax).
      Examples with nothing included give 0 and zero gradient.

  Returns:
    ``loss_N``: per-example cross-entropy in nats, shape ``labels.shape``.

  References:
    Lecture 8, equations 8.6, 8.9 and 8.11; optax
    ``softmax_cross_entropy_with_integer_labels``.

  >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
  >>> with jnp.printoptions(precision=4):
  ...   print(softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
  [0.2761 2.9518]
  """
  return _integer_label_xent_masked(
      *_prepare_integer_labels(logits, labels, axis, where))


@functools.partial(jax.jit, static_argnums=(2,))
def _integer_label_xent_masked(logits, labels, axes, element_mask, row_mask):
  if element_mask is not None:
    row_mask = jnp.any(element_mask, axis=axes)
    element_mask, _ = _flatten_class_axes(element_mask, axes)
  logits, axis = _flatten_class_axes(logits, axes)
  return _integer_label_xent(logits, _int32_labels(labels, logits.shape[axis]), axis,
                             element_mask, row_mask)


def nll(
    log_probs: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Negative log-likelihood of integer labels under given log-probabilities.

  .. math::
    \mathrm{NLL}_n = -\log p_{n, y_n}.

  With ``log_probs = log_softmax(logits)`` this equals the cross-entropy of the
  one-hot labels (lecture equation 8.9). The input is not renormalised.

  Args:
    log_probs: ``log_probs_NxV``, floating, classes along ``axis``.
    labels: ``labels_N``, integer, shape ``log_probs.shape`` without ``axis``;
      out of range gives ``ValueError`` (concrete) or NaN (under ``jit``).
    axis: class axis, or a tuple of axes flattened into one class index.
    where: optional boolean mask, per example or per element (a masked label
      has probability 0: loss ``+inf``); examples with nothing included give 0.

  Returns:
    ``nll_N``: shape ``labels.shape``, in nats if ``log_probs`` are natural logs.

  References:
    Lecture 8, equation 8.9 (cross-entropy loss = NLL).

  >>> log_probs = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
  >>> with jnp.printoptions(precision=4):
  ...   print(nll(log_probs, jnp.array([0, 2])))
  [0.6931 0.2231]
  """
  return _nll_masked(*_prepare_integer_labels(log_probs, labels, axis, where))


@functools.partial(jax.jit, static_argnums=(2,))
def _nll_masked(log_probs, labels, axes, element_mask, row_mask):
  log_probs, axis, row_mask = _apply_masks(log_probs, element_mask, row_mask, axes)
  loss = -_gather_labels(log_probs, _int32_labels(labels, log_probs.shape[axis]), axis)
  return loss if row_mask is None else jnp.where(row_mask, loss, 0.0)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    label_probs: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Cross-entropy between target distributions and ``softmax(logits)``, in nats.

  .. math::
    \ell_n = -\sum_v y_{n v} \log \mathrm{softmax}(z_n)_v,

  As optax's, the gradient with respect to ``label_probs`` is :math:`-\log
  \mathrm{softmax}(z)_v` for every class, zero targets included. Where optax gives
  NaN (a zero target on a class of probability 0, e.g. a ``-inf`` logit) this uses
  ``0 log 0 = 0``. Computed in float32 for bfloat16/float16.

  Args:
    logits: ``logits_NxV``, floating, classes along ``axis`` (int or tuple).
    label_probs: ``label_probs_NxV``, target distributions (e.g. one-hot),
      broadcastable to ``logits``.
    axis: class axis or axes.
    where: optional boolean mask, per example (``logits.shape`` without
      ``axis``, broadcast over the classes) or per element (``logits.shape``:
      masked classes are left out of the normaliser and of the sum, as
      optax). Examples with nothing included give 0.

  Returns:
    ``loss_N``: ``logits.shape`` without ``axis``, in the logits' dtype.

  References:
    Lecture 8, equations 8.2 and 8.6; optax ``softmax_cross_entropy``.

  >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
  >>> label_probs = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  >>> with jnp.printoptions(precision=4):
  ...   print(softmax_cross_entropy(logits, label_probs))
  [0.2761 2.9518]
  """
  logits, label_probs = jnp.asarray(logits), jnp.asarray(label_probs)
  _check_dtype("logits", logits, jnp.floating, "a floating")
  try:
    fits = np.broadcast_shapes(label_probs.shape, logits.shape) == logits.shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"label_probs has shape {label_probs.shape}, which does not "
                     f"broadcast to the logits shape {logits.shape}.")
  axes, _, element_mask, row_mask = _axes_and_masks(logits, axis, where)
  return _soft_label_xent(logits, label_probs, axes, element_mask, row_mask)


@functools.partial(jax.jit, static_argnums=(2,))
def _soft_label_xent(logits, label_probs, axes, element_mask, row_mask):
  dtype = _compute_dtype(logits.dtype)
  if row_mask is not None:  # optax: a per-example mask is broadcast over the class axes.
    element_mask = jnp.broadcast_to(jnp.expand_dims(row_mask, axes), logits.shape)
  log_probs = _log_softmax(logits.astype(dtype), axes, where=element_mask)
  label_probs = label_probs.astype(dtype)
  # 0 log 0 = 0: a zero target on a zero-probability class adds nothing (optax gives NaN);
  # elsewhere the terms are optax's, so d loss / d y = -log p for every class, y = 0 included.
  terms = jnp.where((label_probs == 0) & (log_probs == -jnp.inf), 0.0, label_probs * log_probs)
  return -jnp.sum(terms, axis=axes, where=element_mask).astype(logits.dtype)


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Elementwise binary cross-entropy of ``sigmoid(logits)``, in nats.

  .. math::
    \ell = -\left[y \log p + (1 - y) \log(1 - p)\right],
    \qquad p = \sigma(z),

  computed as ``-y log_sigmoid(z) - (1 - y) log_sigmoid(-z)`` (never
  ``log(sigmoid(z))``, which underflows), in float32 for bfloat16/float16.
  The lecture's equation 8.7 has a typo: its second term reads
  :math:`(1 - y)(1 - \log p)`; the correct term is :math:`(1 - y)\log(1 - p)`.

  Args:
    logits: ``logits_N``, floating, any shape.
    labels: ``labels_N``, targets in [0, 1] (binary or soft), broadcastable
      with ``logits``.

  Returns:
    ``loss_N``: the broadcast shape of both, in the logits' dtype.

  References:
    Lecture 8, equation 8.7 (corrected); optax ``sigmoid_binary_cross_entropy``.

  >>> with jnp.printoptions(precision=4):
  ...   print(sigmoid_binary_cross_entropy(jnp.array([0.0, 100.0, -100.0]),
  ...                                      jnp.array([1.0, 1.0, 1.0])))
  [  0.6931   0.     100.    ]
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_dtype("logits", logits, jnp.floating, "a floating")
  try:
    jnp.broadcast_shapes(labels.shape, logits.shape)
  except ValueError:
    raise ValueError(
        f"labels has shape {labels.shape}, which does not broadcast with the "
        f"logits shape {logits.shape}.") from None
  return _sigmoid_bce(logits, labels)


@jax.jit
def _sigmoid_bce(logits, labels):
  z = logits.astype(_compute_dtype(logits.dtype))
  y = labels.astype(z.dtype)
  loss = -y * jax.nn.log_sigmoid(z) - (1.0 - y) * jax.nn.log_sigmoid(-z)
  return loss.astype(logits.dtype)
