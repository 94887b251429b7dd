r"""Entropy, cross-entropy, relative entropy (KL divergence), perplexity and bits per token.

Lecture 8, equations 8.1 to 8.5. The distribution functions (``entropy``,
``cross_entropy``, ``relative_entropy``: Cover and Thomas's names) take
probabilities (not logits) along ``axis`` and a logarithm ``base`` (2 for bits,
the lecture's default; ``math.e`` for nats); ``0 log 0 = 0`` with finite
gradients there. Perplexity and bits per token take natural-log token
log-probabilities (what a language model's ``log_softmax`` gives) and reduce
over every axis.

The KL divergence is called ``relative_entropy`` here, not ``kl_divergence``:
optax's ``kl_divergence(log_predictions, targets)`` takes log-probabilities of
the model and target probabilities, in nats, and lm_jax borrows optax's names
only with optax's meaning (``lm_jax.ops.losses``). ``relative_entropy(p, q,
base=math.e)`` equals ``optax.kl_divergence(jnp.log(q), p)``.
"""
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

Axis = Optional[int | tuple[int, ...]]


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Float32 (or wider) copy of ``x``, for accurate sums in any input dtype."""
  x = jnp.asarray(x)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return x.astype(jnp.promote_types(dtype, jnp.float32))


def _log_base(base) -> float:
  """``ln(base)`` for a concrete ``base > 0``, ``base != 1``."""
  try:
    value = float(base)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value > 0 and value != 1):
    raise ValueError(
        f"base must be a finite positive number other than 1, got {base!r}.")
  return math.log(value)


def _plogq(p: jax.Array, q: jax.Array) -> jax.Array:
  """``p * log(q)`` with ``0 * log(anything) = 0`` and finite gradients there."""
  positive = p > 0
  safe_q = jnp.where(positive, q, 1.0)
  return jnp.where(positive, p * jnp.log(safe_q), 0.0)


def _axis(axis: Axis) -> Axis:
  return tuple(axis) if isinstance(axis, list) else axis


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _divergence(kind: str, axis: Axis, log_base: float, probs, q_probs):
  """``sum p log q`` terms for ``kind`` in {"entropy", "cross_entropy", "kl"}."""
  p, q = _as_float(probs), _as_float(q_probs)
  if kind == "entropy":
    terms = -_plogq(p, p)
  elif kind == "cross_entropy":
    terms = -_plogq(p, q)
  else:  # p log(p / q): one log of the ratio, accurate when p is close to q
    positive = p > 0
    terms = _plogq(p, jnp.where(positive, p, 1.0) / jnp.where(positive, q, 1.0))
  return jnp.sum(terms, axis=axis) / log_base


def entropy(probs: jax.typing.ArrayLike, axis: Axis = -1, *,
            base: float = 2.0) -> jax.Array:
  r"""Entropy of distributions along ``axis`` (lecture equation 8.1).

  .. math::
    H(p) = -\sum_i p_i \log_b p_i, \qquad 0 \log 0 = 0.

  Args:
    probs: ``probs_NxV``, probabilities summing to 1 along ``axis`` (not checked).
    axis: axis or axes of the distribution.
    base: logarithm base ``b``; 2 gives bits.

  Returns:
    ``entropy_N``: ``probs.shape`` without ``axis``, float32 or wider.

  References:
    Lecture 8, equation 8.1; Cover & Thomas, Elements of Information Theory, 2.1.

  >>> print(entropy(jnp.array([0.5, 0.25, 0.25, 0.0])))  # bits
  1.5
  """
  return _divergence("entropy", _axis(axis), _log_base(base), probs, probs)


def cross_entropy(probs: jax.typing.ArrayLike, q_probs: jax.typing.ArrayLike,
                  axis: Axis = -1, *, base: float = 2.0) -> jax.Array:
  r"""Cross-entropy of ``q`` relative to ``p`` (lecture equation 8.2).

  .. math::
    H(p, q) = -\sum_i p_i \log_b q_i \;\ge\; H(p) \quad \text{(8.3, Gibbs)}.

  Terms with ``p_i = 0`` are 0 (whatever ``q_i``); ``p_i > 0`` with ``q_i = 0``
  gives ``+inf``.

  Args:
    probs: ``probs_NxV``, the true distribution ``p``.
    q_probs: ``q_probs_NxV``, the model distribution ``q``, broadcastable.
    axis: axis or axes of the distributions.
    base: logarithm base; 2 gives bits.

  Returns:
    ``cross_entropy_N``: the broadcast shape without ``axis``.

  References:
    Lecture 8, equations 8.2 and 8.3.

  >>> print(cross_entropy(jnp.array([0.5, 0.5, 0.0]), jnp.array([0.25, 0.25, 0.5])))
  2.0
  """
  return _divergence("cross_entropy", _axis(axis), _log_base(base), probs, q_probs)


def relative_entropy(probs: jax.typing.ArrayLike, q_probs: jax.typing.ArrayLike,
                     axis: Axis = -1, *, base: float = 2.0) -> jax.Array:
  r"""Relative entropy (Kullback-Leibler divergence) :math:`D(p \| q) = H(p, q) - H(p) \ge 0`.

  .. math::
    D(p \| q) = \sum_i p_i \log_b \frac{p_i}{q_i},

  computed directly (not as a difference of two large numbers), with
  ``0 log(0 / q) = 0`` and ``+inf`` where ``p_i > 0 = q_i``. Zero iff ``p = q``.
  Takes probabilities ``p`` (first) and ``q``; with ``base=math.e`` it equals
  ``optax.kl_divergence(log(q), p)``, whose arguments are the model's
  log-probabilities and the targets.

  Args:
    probs: ``probs_NxV``, the distribution ``p``.
    q_probs: ``q_probs_NxV``, the distribution ``q``, broadcastable.
    axis: axis or axes of the distributions.
    base: logarithm base; 2 gives bits.

  Returns:
    ``kl_N``: the broadcast shape without ``axis``.

  References:
    Lecture 8, equations 8.2 and 8.3; Cover & Thomas, 2.3.

  >>> print(relative_entropy(jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75])))
  0.20751876
  """
  return _divergence("kl", _axis(axis), _log_base(base), probs, q_probs)


def _masked_mean_nll(token_log_probs, where) -> jax.Array:
  """Mean of ``-log p`` over included tokens (NaN when none is included)."""
  token_log_probs = jnp.asarray(token_log_probs)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise ValueError(f"where must be a boolean mask, got dtype {where.dtype}.")
    try:
      jnp.broadcast_shapes(where.shape, token_log_probs.shape)
    except ValueError:
      raise ValueError(
          f"where has shape {where.shape}, which does not broadcast to "
          f"token_log_probs of shape {token_log_probs.shape}.") from None
  return _masked_mean_nll_jit(token_log_probs, where)


@jax.jit
def _masked_mean_nll_jit(token_log_probs, where):
  log_probs = _as_float(token_log_probs)
  if where is None:
    return -jnp.mean(log_probs)
  where = jnp.broadcast_to(where, log_probs.shape)
  return -jnp.sum(jnp.where(where, log_probs, 0.0)) / jnp.sum(where)


def bits_per_token(token_log_probs: jax.typing.ArrayLike,
                   where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""Cross-entropy rate :math:`H(W)` in bits per token (lecture equation 8.4).

  .. math::
    H(W) = -\frac{1}{M} \sum_{t=1}^{M} \log_2 p(w_t \mid w_{<t}).

  Args:
    token_log_probs: ``log_probs_BxT``, natural-log probabilities of the observed
      tokens, any shape; all axes are averaged.
    where: optional boolean mask broadcastable to it; only included tokens count.
      No included token gives NaN (an average over no evidence is undefined).

  Returns:
    A scalar, float32 or wider.

  References:
    Lecture 8, equation 8.4; Jurafsky & Martin, Speech and Language Processing, 3.8.

  >>> print(bits_per_token(jnp.log(jnp.array([0.5, 0.25]))))
  1.5
  """
  return _masked_mean_nll(token_log_probs, where) / math.log(2.0)


def perplexity(token_log_probs: jax.typing.ArrayLike,
               where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""Perplexity :math:`2^{H(W)} = \exp(\text{mean token NLL in nats})` (eq. 8.5).

  .. math::
    \mathrm{PPL} = 2^{H(W)}
      = \exp\Big(-\frac{1}{M} \sum_{t=1}^{M} \log p(w_t \mid w_{<t})\Big).

  Args:
    token_log_probs: ``log_probs_BxT``, natural-log probabilities of the observed
      tokens, any shape; all axes are averaged.
    where: optional boolean mask broadcastable to it; only included tokens count.
      A fully masked input gives NaN, not 1.0: perplexity over no evidence is
      undefined, and 1.0 would read as a perfect model.

  Returns:
    A scalar, float32 or wider.

  References:
    Lecture 8, equations 8.4 and 8.5.

  >>> print(perplexity(jnp.log(jnp.array([0.5, 0.25]))))  # 2 ** 1.5
  2.828427
  """
  return jnp.exp(_masked_mean_nll(token_log_probs, where))

