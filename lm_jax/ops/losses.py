r"""Classification losses in nats, with optax's names and signatures.

Every loss returns one value per example (unreduced); the caller averages.
They agree with optax's functions of the same names in value and in the
gradient with respect to every argument, keyword names and ``where`` semantics
included, in reverse and forward mode (``tests/ops/losses_test.py`` compares them
directly; ``tests/ops/optax_parity_test.py`` runs optax's own tests on them).
``softmax_cross_entropy_with_integer_labels`` differentiates its logsumexp by a
``jax.custom_jvp`` whose tangent :math:`\sum_v \mathrm{softmax}(z)_v\, \dot z_v`
is rematerialised (``jax.checkpoint``) from the logits as given: reverse mode
keeps the logits argument (and the ``where`` argument, if any) and ``[N]``-sized
arrays only, and recomputes the upcast, the mask and ``g exp(z - lse)`` in one
elementwise pass (lecture equation 8.11), so no ``[N, V]`` array is stored, while
``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` work as for any JAX function.

Padding cannot poison: entries excluded by ``where`` are replaced before any
arithmetic, so NaN or Inf there gives a 0 loss (for an excluded example) and
exactly zero, finite gradients. A bad target poisons: an out-of-range label of a
counted example raises ``ValueError`` when the labels are readable on the host
(:mod:`lm_jax.ops.labels`: not traced, not on a GPU/TPU) and, under
``jit``, gives a NaN loss and a NaN gradient, which ``optax.apply_if_finite``-style
guards see. Argument checks run eagerly; the arithmetic is one ``jit``-compiled call.
"""
import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm_jax.ops import labels as labels_lib
from lm_jax.ops.softmax import log_softmax as _log_softmax

Axis = Union[int, tuple[int, ...]]


def _compute_dtype(dtype) -> jnp.dtype:
  """float32 for bf16/f16 (and f32), float64 for f64."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_dtype(name: str, x: jax.Array, kind, kind_name: str) -> None:
  if not jnp.issubdtype(x.dtype, kind):
    raise ValueError(f"{name} must have {kind_name} dtype, got {x.dtype}.")


def _axes_and_masks(logits: jax.Array, axis: Axis, where, allow_none: bool = False):
  """Canonical class axes, batch shape and ``(element_mask, row_mask)``.

  ``where`` is optax's: a per-example mask (the batch shape) or an element
  mask (the logits shape; an example is included when any element is).
  ``axis=None`` (only with ``allow_none``, as optax's ``softmax_cross_entropy``)
  means every axis.
  """
  ndim = logits.ndim
  if axis is None and allow_none and ndim:
    axes = tuple(range(ndim))
  elif isinstance(axis, (int, np.integer)) or (isinstance(axis, tuple) and axis):
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
  """:func:`lm_jax.ops.labels.check_in_range` on the examples a mask counts (a row mask, or
  a row with any element of an element mask)."""
  if not labels_lib.readable_on_host(labels, element_mask, row_mask):
    return
  counted = None if row_mask is None else np.asarray(row_mask)
  if element_mask is not None:
    rows = np.any(np.asarray(element_mask), axis=axes)
    counted = rows if counted is None else counted & rows
  labels_lib.check_in_range(labels, num_classes, counted)


def _prepare_integer_labels(logits, labels, axis, where):
  """Checks dtypes, shapes and concrete labels; returns arrays and axes."""
  given_labels = labels  # checked as given: NumPy labels need no device-to-host read
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_dtype("logits", logits, jnp.floating, "a floating")
  _check_dtype("labels", labels, jnp.integer, "an integer")
  axes, batch_shape, element_mask, row_mask = _axes_and_masks(logits, axis, where)
  if labels.shape != batch_shape:
    raise ValueError(
        f"labels has shape {labels.shape}; expected {batch_shape}, the logits "
        f"shape {logits.shape} without class axis {axis!r}.")
  num_classes = math.prod(logits.shape[a] for a in axes)
  _check_labels_in_range(given_labels, num_classes, axes, element_mask, row_mask)
  return logits, labels, axes, element_mask, row_mask


def _flatten_class_axes(x, axes: tuple[int, ...]) -> tuple[jax.Array, int]:
  """Moves the class axes last and flattens them into one (optax's rule)."""
  if len(axes) == 1:
    return x, axes[0]
  batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
  x = jnp.transpose(x, batch_axes + axes)
  return x.reshape(x.shape[:len(batch_axes)] + (-1,)), len(batch_axes)


def _pick(x: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """``x[..., label, ...]`` along ``axis`` (index 0 where ``label < 0``); an ``[N]`` gather."""
  safe = jnp.expand_dims(jnp.where(labels >= 0, labels, 0), axis)
  return jnp.take_along_axis(x, safe, axis=axis).squeeze(axis)


def _poison(loss: jax.Array, labels: jax.Array, row_mask) -> jax.Array:
  """``loss`` times NaN where a counted example has an out-of-range label (``-1``).

  A constant NaN factor: the loss is NaN and so is its derivative, whatever the cotangent
  (``0 * NaN``), so the gradient is non-finite too; excluded examples are left alone.
  """
  bad = labels < 0 if row_mask is None else (labels < 0) & row_mask
  return loss * jnp.where(bad, jnp.nan, 1.0).astype(loss.dtype)


def _masked_logits(logits, element_mask, row_mask, axis):
  """The logits the normaliser sums, in float32 (or wider): 0 in every row that ``row_mask``
  excludes and ``-inf`` where ``element_mask`` is False, whatever the input held there."""
  x = logits.astype(_compute_dtype(logits.dtype))
  if element_mask is not None:
    x = jnp.where(element_mask, x, -jnp.inf)
  if row_mask is not None:  # after the element mask: a fully masked row is 0, never all -inf
    x = jnp.where(jnp.expand_dims(row_mask, axis), x, 0.0)
  return x


def _log_normalizer(x: jax.Array, axis: int) -> jax.Array:
  """Max-shifted logsumexp over ``axis`` (no keepdims); -inf for all -inf rows."""
  # Rows without mass (all -inf) take the shift finfo.min instead of -inf, so they
  # give exp(-inf) = 0 and lse = -inf rather than NaN.
  x_max = lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True),
                                        jnp.finfo(x.dtype).min))
  return (jnp.log(jnp.sum(jnp.exp(x - x_max), axis=axis, keepdims=True))
          + x_max).squeeze(axis)


def _lse_tangent(logits, element_mask, row_mask, lse, dlogits, axis):
  """``sum_v softmax(x)_v dx_v``, ``x`` the masked upcast logits, from the saved ``lse``.

  Linear in ``dlogits``; one elementwise pass that recomputes the upcast and the masks.
  """
  x = _masked_logits(logits, element_mask, row_mask, axis)
  # A row without mass (all -inf) has lse = -inf; shifting by finfo.min instead keeps
  # exp(x - lse) = 0 (not NaN), so the zero cotangents of masked rows give zero gradients.
  lse = jnp.maximum(lse, jnp.finfo(lse.dtype).min)
  return jnp.sum(jnp.exp(x - jnp.expand_dims(lse, axis)) * dlogits.astype(x.dtype), axis=axis)


# Rematerialised: in reverse mode the linearised rule keeps only its inputs (the logits and
# masks as given, already alive, and the [N] lse) and recomputes the float32 upcast, the
# masks and exp(x - lse) in the backward pass, so no [N, V] array is stored; forward mode
# and higher orders differentiate it as is.
_lse_tangent_remat = jax.checkpoint(_lse_tangent, static_argnums=(5,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _logsumexp(logits, element_mask, row_mask, axis):
  """Logsumexp of :func:`_masked_logits`, differentiated without ``[N, V]`` residuals."""
  return _log_normalizer(_masked_logits(logits, element_mask, row_mask, axis), axis)


@_logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
  logits, element_mask, row_mask = primals
  lse = _log_normalizer(_masked_logits(logits, element_mask, row_mask, axis), axis)
  return lse, _lse_tangent_remat(logits, element_mask, row_mask, lse, tangents[0], axis)


def _integer_label_xent(logits, labels, axis, element_mask, row_mask):
  """``lse(masked logits) - logits[label]`` in float32 (or wider), 0 where ``row_mask`` is False.

  ``labels`` are int32 with -1 for out of range (see :func:`_poison`). As optax, the label's
  logit is read from the unmasked logits even where the element mask leaves it out of the
  normaliser. Everything of size ``[N, V]`` is computed inside :func:`_logsumexp`, whose
  backward recomputes it from the logits as given; the label's logit is an ``[N]`` gather.
  """
  if element_mask is not None:
    row_mask = jnp.any(element_mask, axis=axis)
  lse = _logsumexp(logits, element_mask, row_mask, axis)
  label_logit = _pick(logits, labels, axis).astype(lse.dtype)
  if row_mask is not None:  # an excluded row's logits may be NaN or Inf: never read them
    label_logit = jnp.where(row_mask, label_logit, 0.0)
  loss = _poison(lse - label_logit, labels, row_mask)
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

  Computed in float32 for bfloat16/float16 logits; the loss and gradient have
  the logits' dtype. Reverse mode keeps, for the backward pass, the ``logits``
  argument as given (a bfloat16 array stays bfloat16: no float32 copy), the
  ``where`` argument as given (boolean) if any, and ``[N]``-sized arrays (the
  float32 log-normalisers, the label indices, the per-example mask, the NaN
  factor of bad labels); it recomputes the upcast, the masking and
  ``g exp(z - lse)`` in one elementwise pass (lecture equation 8.11), so no
  ``[N, V]`` array is stored besides the arguments. A tuple ``axis`` is the
  exception: the logits (and an element mask) flattened to one class axis, a
  copy, are kept instead of the arguments (``tests/ops/losses_test.py`` checks
  this list with ``jax.ad_checkpoint.print_saved_residuals``). Forward mode
  (``jax.jvp``, ``jax.hessian``) works too.

  Padding cannot poison: a row excluded by ``where`` gives 0 and exactly zero
  gradient whatever its logits hold (NaN, ``inf``) and whatever its label
  (e.g. -1 padding); so does every masked logit of a partly masked row, except
  the label's own, which is read as optax reads it. A bad target poisons:
  out-of-range labels (``< 0`` or ``>= V``) of counted rows raise
  ``ValueError`` when the labels are readable on the host and, under ``jit``, give a NaN
  loss and a NaN gradient row; never a finite wrong loss. A row whose logits
  are all ``-inf`` has no distribution: NaN.

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
    element_mask, _ = _flatten_class_axes(element_mask, axes)
  logits, axis = _flatten_class_axes(logits, axes)
  return _integer_label_xent(logits, labels_lib.in_range_int32(labels, logits.shape[axis]), axis,
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
      out of range in a counted example gives ``ValueError`` (read on the host) or, under
      ``jit``, a NaN loss and a NaN gradient.
    axis: class axis, or a tuple of axes flattened into one class index.
    where: optional boolean mask, per example or per element (a masked label
      has probability 0: loss ``+inf``); examples with nothing included give 0
      and zero gradient, whatever their ``log_probs`` hold (NaN, ``inf``).

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
  """``-log_probs[label]``: an ``[N]`` gather, masked and poisoned (:func:`_poison`) in ``[N]``."""
  log_probs, axis = _flatten_class_axes(log_probs, axes)
  labels = labels_lib.in_range_int32(labels, log_probs.shape[axis])
  picked = _pick(log_probs, labels, axis)
  if element_mask is not None:
    element_mask, _ = _flatten_class_axes(element_mask, axes)
    row_mask = jnp.any(element_mask, axis=axis)
    picked = jnp.where(_pick(element_mask, labels, axis), picked, -jnp.inf)
  if row_mask is not None:  # an excluded row's log-probabilities may be NaN: never read them
    picked = jnp.where(row_mask, picked, 0.0)
  loss = _poison(-picked, labels, row_mask)
  return loss if row_mask is None else jnp.where(row_mask, loss, 0.0)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Optional[Axis] = -1,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Cross-entropy between target distributions and ``softmax(logits)``, in nats.

  .. math::
    \ell_n = -\sum_v y_{n v} \log \mathrm{softmax}(z_n)_v,

  As optax's, the gradient with respect to ``labels`` is :math:`-\log
  \mathrm{softmax}(z)_v` for every class, zero targets included. Where optax gives
  NaN (a zero target on a class of probability 0, e.g. a ``-inf`` logit) this uses
  ``0 log 0 = 0``. Computed in float32 for bfloat16/float16.

  Args:
    logits: ``logits_NxV``, floating, classes along ``axis``.
    labels: ``labels_NxV``, target distributions (e.g. one-hot), broadcastable
      to ``logits`` (optax's name for this argument).
    axis: class axis, tuple of axes, or ``None`` for all axes (as optax).
    where: optional boolean mask, per example (``logits.shape`` without
      ``axis``, broadcast over the classes) or per element (``logits.shape``:
      masked classes are left out of the normaliser and of the sum, as
      optax). Logits and labels where it is False are replaced before any
      arithmetic: NaN or ``inf`` there changes nothing and gets zero gradient;
      examples with nothing included give 0.

  Returns:
    ``loss_N``: ``logits.shape`` without ``axis``, in the logits' dtype.

  References:
    Lecture 8, equations 8.2 and 8.6; optax ``softmax_cross_entropy``.

  >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
  >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  >>> with jnp.printoptions(precision=4):
  ...   print(softmax_cross_entropy(logits, labels))
  [0.2761 2.9518]
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_dtype("logits", logits, jnp.floating, "a floating")
  try:
    fits = np.broadcast_shapes(labels.shape, logits.shape) == logits.shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"labels has shape {labels.shape}, which does not "
                     f"broadcast to the logits shape {logits.shape}.")
  axes, _, element_mask, row_mask = _axes_and_masks(logits, axis, where, allow_none=True)
  return _soft_label_xent(logits, labels, axes, element_mask, row_mask)


@functools.partial(jax.jit, static_argnums=(2,))
def _soft_label_xent(logits, labels, axes, element_mask, row_mask):
  dtype = _compute_dtype(logits.dtype)
  if row_mask is not None:  # optax: a per-example mask is broadcast over the class axes.
    element_mask = jnp.broadcast_to(jnp.expand_dims(row_mask, axes), logits.shape)
  x = logits.astype(dtype)
  y = jnp.broadcast_to(labels, logits.shape).astype(dtype)
  if element_mask is not None:  # padding cannot poison: replace it before any arithmetic
    x, y = jnp.where(element_mask, x, 0.0), jnp.where(element_mask, y, 0.0)
  log_probs = _log_softmax(x, axes, where=element_mask)
  if element_mask is not None:  # masked classes: -inf from log_softmax, 0 here (0 * 0 terms)
    log_probs = jnp.where(element_mask, log_probs, 0.0)
  # 0 log 0 = 0: a zero target on a zero-probability class adds nothing (optax gives NaN);
  # elsewhere the terms are optax's, so d loss / d y = -log p for every class, y = 0 included.
  terms = jnp.where((y == 0) & (log_probs == -jnp.inf), 0.0, y * log_probs)
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
