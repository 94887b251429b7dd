r"""Softmax, log-softmax and logsumexp with temperature and masks.

All three shift by a ``stop_gradient`` maximum before exponentiating (lecture:
"overparameterization is useful for numerical stability"), compute in float32
for bfloat16/float16 inputs and return the input dtype (float32 for integer
input). ``where`` masks out entries: they get probability 0 (log-probability
``-inf``) and are excluded from the normaliser, as in ``jax.nn``; they are
replaced before any arithmetic, so NaN or ``inf`` there gets zero gradient (with
respect to the logits and the temperature) and changes nothing else. A row with
no mass at all (fully masked, or all ``-inf``) gives all-zero probabilities,
log-probabilities ``-inf`` and a logsumexp of ``-inf``, never NaN, and its
gradients are finite (zero). A ``+inf`` logit gives NaN (``inf / inf``), as in
``jax.nn``.
"""
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Axis = Union[int, tuple[int, ...], None]


def _check_temperature(temperature) -> None:
  if isinstance(temperature, jax.core.Tracer):
    return
  t = np.asarray(temperature)
  if not np.issubdtype(t.dtype, np.number) or not np.all(np.isfinite(t) & (t > 0)):
    raise ValueError(
        f"temperature must be finite and > 0, got {temperature!r}; for greedy "
        "decoding (T = 0) take the argmax of the logits instead.")


def _normalise(kind: str, logits, axis, temperature, where) -> jax.Array:
  _check_temperature(temperature)
  if where is not None and (dtype := jnp.asarray(where).dtype) != jnp.bool_:
    raise ValueError(f"where must be a boolean mask, got dtype {dtype}.")
  if isinstance(axis, list):
    axis = tuple(axis)
  return _normalise_jit(kind, axis, logits, temperature, where)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _normalise_jit(kind, axis, logits, temperature, where):
  """One compiled call for ``kind`` in {"softmax", "log_softmax", "logsumexp"}."""
  x = jnp.asarray(logits)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  x = x.astype(jnp.promote_types(out_dtype, jnp.float32))
  if where is not None:  # masked entries never enter the arithmetic (NaN there is harmless)
    x = jnp.where(where, x, 0.0)
  x = x / jnp.asarray(temperature, x.dtype)
  shifted, x_max, safe_sum, has_mass = _shifted(x, axis, where)
  if kind == "softmax":
    out = jnp.exp(shifted) / safe_sum
  elif kind == "log_softmax":
    out = shifted - jnp.log(safe_sum)
  else:
    out = jnp.where(has_mass, jnp.log(safe_sum) + x_max, -jnp.inf)
    out = jnp.squeeze(out, axis=axis)
  return out.astype(out_dtype)


def _shifted(x, axis, where):
  """``(x - stop_gradient(max), max, safe sum exp, has_mass)``, with keepdims."""
  x_max = jnp.max(x, axis=axis, where=where, initial=-jnp.inf, keepdims=True)
  x_max = lax.stop_gradient(jnp.where(jnp.isfinite(x_max), x_max, 0.0))
  shifted = x - x_max
  if where is not None:
    shifted = jnp.where(where, shifted, -jnp.inf)
  sum_exp = jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True)
  has_mass = sum_exp > 0
  safe_sum = jnp.where(has_mass, sum_exp, 1.0)
  return shifted, x_max, safe_sum, has_mass


def logsumexp(
    logits: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Log-normaliser of a softmax at temperature ``T``.

  .. math::
    \mathrm{logsumexp}(z / T) = m + \log \sum_j \exp(z_j / T - m),
    \qquad m = \max_j z_j / T.

  With a temperature this is the normaliser of ``softmax(z, temperature=T)``,
  i.e. ``logsumexp(z / T)``; it is not rescaled by ``T`` (``T * logsumexp(z /
  T)`` is the smooth maximum, which the caller can form).

  Args:
    logits: ``logits_NxV``, any shape.
    axis: axis or axes to reduce (``None``: all).
    temperature: ``T > 0``; the logits are divided by it (``beta = 1 / T``).
    where: optional boolean mask broadcastable to ``logits``; masked entries
      are left out of the sum. An empty sum gives ``-inf``.

  Returns:
    ``lse_N``: ``logits.shape`` without ``axis``, in the input dtype.

  References:
    Lecture 8, softmax properties (shift invariance, temperature).

  >>> print(f"{logsumexp(jnp.log(jnp.array([1.0, 2.0, 5.0]))):.4f}")  # log 8
  2.0794
  """
  return _normalise("logsumexp", logits, axis, temperature, where)


def log_softmax(
    logits: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Log-probabilities of a softmax at temperature ``T``.

  .. math::
    \log \sigma(z / T)_l = z_l / T - \mathrm{logsumexp}(z / T).

  Args:
    logits: ``logits_NxV``, any shape.
    axis: the class axis or axes (``None``: all).
    temperature: ``T > 0``; the logits are divided by it.
    where: optional boolean mask broadcastable to ``logits``; masked entries
      get ``-inf`` and are left out of the normaliser.

  Returns:
    ``log_probs_NxV``: same shape and dtype as ``logits``.

  References:
    Lecture 8, equation 8.10.

  >>> with jnp.printoptions(precision=4):
  ...   print(log_softmax(jnp.array([0.0, 0.0]), temperature=0.5))
  [-0.6931 -0.6931]
  """
  return _normalise("log_softmax", logits, axis, temperature, where)


def softmax(
    logits: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    where: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  r"""Softmax at temperature ``T`` (lecture equation 8.10).

  .. math::
    \sigma(\beta z)_l = \frac{\exp(\beta z_l)}{\sum_j \exp(\beta z_j)},
    \qquad \beta = 1 / T.

  Invariant to adding a constant to every logit, not to scaling them: ``T ->
  inf`` tends to the uniform distribution and ``T -> 0`` to the one-hot argmax
  (greedy decoding is the caller's ``argmax``; ``T = 0`` raises ``ValueError``).

  Args:
    logits: ``logits_NxV``, any shape.
    axis: the class axis or axes (``None``: all).
    temperature: ``T > 0``; the logits are divided by it.
    where: optional boolean mask broadcastable to ``logits``; masked entries
      get probability 0 and are left out of the normaliser.

  Returns:
    ``probs_NxV``: same shape and dtype as ``logits``; sums to 1 over ``axis``
    (to 0 for a row with no mass).

  References:
    Lecture 8, equation 8.10 and "Effect of Temperature".

  >>> print(softmax(jnp.array([1.0, 1.0, 1e4, -jnp.inf])))
  [0. 0. 1. 0.]
  >>> with jnp.printoptions(precision=4):
  ...   print(softmax(jnp.array([2.0, 0.0]), temperature=2.0))
  [0.7311 0.2689]
  """
  return _normalise("softmax", logits, axis, temperature, where)
