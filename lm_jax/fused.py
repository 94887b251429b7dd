r"""Fused output layer and softmax cross-entropy that never materialises the ``[N, V]`` logits.

:func:`linear_softmax_cross_entropy` computes, per token,

.. math::
  \ell_n = \log \sum_{v=1}^{V} \exp(h_n \cdot w_v + b_v) - (h_n \cdot w_{y_n} + b_{y_n}),

streaming over token chunks (``chunk_size`` rows, ``lax.scan``) and, inside
each, over vocabulary chunks (``vocab_chunk_size`` entries) with an online
logsumexp (running max and running sum); each block of logits computed is
``[chunk_size, vocab_chunk_size]``. Three code paths:

* plain evaluation (no autodiff): the online logsumexp alone; ``2NHV`` FLOPs.
* the ``custom_vjp`` forward (run only when differentiating): per token chunk,
  pass 1 computes the logsumexp and keeps the chunk's logits blocks
  (``[chunk_size, V]``, when that is at most ``_KEPT_LOGITS = 2**26`` elements); pass 2
  turns each block into :math:`G = \mathrm{softmax} - \mathrm{onehot}` and
  accumulates ``dhidden_unscaled = G W`` ``[N, H]`` (cotangent 1 for every token),
  saved as a residual with the ``[N]`` logsumexp: ``4NHV`` FLOPs. Past
  ``_KEPT_LOGITS`` pass 2 recomputes the blocks instead, so memory stays bounded.
* the backward: ``dhidden = g[:, None] * dhidden_unscaled``, exactly, and
  ``dweight = G_g^T h``, ``dbias = sum_n G_g`` with :math:`G_g = g (\mathrm{softmax}
  - \mathrm{onehot})` from logits recomputed chunk by chunk (``4NHV``): ``8NHV`` in
  all against unfused ``6NHV``. An earlier version also accumulated the unscaled
  ``[V, H]`` weight gradient in the forward (``6NHV``), but that residual alone was
  1/8 of the unfused version's temporary memory; measured in
  ``experiments/bench_kernels.py``, this one stays within 1.09x the unfused time
  at ``V = 32768`` and uses 0.11x its memory.

Defaults: ``chunk_size = min(N, 256)`` and ``vocab_chunk_size = min(V, 8192)``
(an 8 MiB float32 block). On 2 CPU cores at ``N, H, V = 1024, 512, 131072``,
forward+backward took 5.9 s against 7.7 s with whole-vocabulary blocks (128
MiB, whose elementwise passes go to DRAM), 6.4 s with 128-row token chunks
(shorter contractions in ``G^T h``) and 5.9 s with 512-row chunks (twice the
memory); unfused took 8.0 s. The kept logits of a token chunk are ``256 V`` floats
(128 MiB at ``V = 131072``); the backward's ``[V, H]`` weight gradient is
accumulated in place, ``_ACCUMULATE_SLICE`` elements at a time.

References:
  Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018
  (the running max / running sum logsumexp).
  Wijmans et al., "Cut your losses in large-vocabulary language models", 2024
  (cross-entropy without materialising the logits).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_TOKEN_CHUNK = 256
_VOCAB_CHUNK = 8192
_KEPT_LOGITS = 2**26
_ACCUMULATE_SLICE = 2**22


def _chunk_sizes(n: int, v: int, chunk_size, vocab_chunk_size) -> tuple[int, int]:
  for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  return (_balanced(n, chunk_size, _TOKEN_CHUNK, 8), _balanced(v, vocab_chunk_size, _VOCAB_CHUNK, 128))


def _balanced(total: int, requested, default: int, align: int) -> int:
  """An explicit size as given; else the default, shrunk so equal chunks cover ``total``.

  ``N = 400`` with the default 256 gives two chunks of 200, not 256 + a padded 256;
  ``V = 10002`` with 8192 gives two of 5120 (aligned), not two of 8192 with the second
  clamped to overlap the first: at PTB sizes this halves the work.
  """
  if requested:
    return max(1, min(int(requested), total))
  if total <= default:
    return max(total, 1)
  num_chunks = -(-total // default)
  size = -(-total // num_chunks)
  return min(default, -(-size // align) * align)


def _compute_dtype(*xs):
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _vocab_chunk(weight_VxH, bias_V, j, tv):
  """Entries ``[start, start + tv)``, ``start = min(j tv, V - tv)``, and a mask of those not in chunk ``j - 1``.

  Clamping the last chunk (which then overlaps its predecessor) avoids padding,
  i.e. copying, the weight.
  """
  start = jnp.minimum(j * tv, weight_VxH.shape[0] - tv)
  w_TxH = lax.dynamic_slice_in_dim(weight_VxH, start, tv, axis=0)
  b_T = None if bias_V is None else lax.dynamic_slice_in_dim(bias_V, start, tv)
  return w_TxH, b_T, start, start + jnp.arange(tv) >= j * tv


def _logits(h_CxH, w_TxH, b_T):
  dtype = _compute_dtype(h_CxH, w_TxH)
  z_CxT = lax.dot_general(h_CxH, w_TxH, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
  return z_CxT if b_T is None else z_CxT + b_T.astype(dtype)


def _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, keep):
  """``(lse_C, kept logits [K, C, tv] or None)`` for one token chunk, streaming over vocabulary chunks."""

  def body(carry, j):
    m_C, s_C = carry
    w_TxH, b_T, _, fresh_T = _vocab_chunk(weight_VxH, bias_V, j, tv)
    z_CxT = jnp.where(fresh_T, _logits(h_CxH, w_TxH, b_T), -jnp.inf)
    new_m_C = jnp.maximum(m_C, jnp.max(z_CxT, axis=-1))
    s_C = s_C * jnp.exp(m_C - new_m_C) + jnp.sum(jnp.exp(z_CxT - new_m_C[:, None]), axis=-1)
    return (new_m_C, s_C), (z_CxT if keep else None)

  c, dtype = h_CxH.shape[0], _compute_dtype(h_CxH, weight_VxH)
  init = (jnp.full((c,), -jnp.inf, dtype), jnp.zeros((c,), dtype))
  (m_C, s_C), z_KxCxT = lax.scan(body, init, jnp.arange(-(-weight_VxH.shape[0] // tv)))
  return m_C + jnp.log(s_C), z_KxCxT


def _accumulate_outer(acc_VxH, g_CxT, h_CxH, start):
  """``acc[start:start + T] += g^T h`` in place, in row slices that keep the product's temporary small."""
  t = g_CxT.shape[1]
  rows = min(t, max(1, _ACCUMULATE_SLICE // max(h_CxH.shape[1], 1)))

  def body(i, acc_VxH):
    offset = jnp.minimum(i * rows, t - rows)  # the last slice may overlap the one before it
    g_CxS = lax.dynamic_slice_in_dim(g_CxT, offset, rows, axis=1)
    dw_SxH = lax.dot_general(g_CxS, h_CxH, (((0,), (0,)), ((), ())))
    dw_SxH = jnp.where((offset + jnp.arange(rows) >= i * rows)[:, None], dw_SxH, 0.0)
    old_SxH = lax.dynamic_slice_in_dim(acc_VxH, start + offset, rows, axis=0)
    return lax.dynamic_update_slice_in_dim(acc_VxH, old_SxH + dw_SxH, start + offset, axis=0)

  n_slices = -(-t // rows)
  return body(0, acc_VxH) if n_slices == 1 else lax.fori_loop(0, n_slices, body, acc_VxH)


def _chunk_gradients(h_CxH, y_C, scale_C, lse_C, z_KxCxT, weight_VxH, bias_V, tv, acc, with_dhidden):
  """Adds one token chunk's ``G^T h`` and ``sum_n G_n`` to ``acc``, ``G = scale (softmax - onehot)``.

  Uses the kept logits blocks ``z_KxCxT`` or, if ``None``, recomputes them.
  Returns ``(acc, G W [C, H] or None)``.
  """
  dtype = _compute_dtype(h_CxH, weight_VxH)
  h_CxH = h_CxH.astype(dtype)

  def body(carry, x):
    (dweight_VxH, dbias_V), dh_CxH = carry
    j, z_CxT = x
    w_TxH, b_T, start, fresh_T = _vocab_chunk(weight_VxH, bias_V, j, tv)
    if z_CxT is None:
      z_CxT = _logits(h_CxH, w_TxH, b_T)
    onehot_CxT = (start + jnp.arange(tv))[None, :] == y_C[:, None]
    g_CxT = scale_C[:, None] * (jnp.exp(z_CxT - lse_C[:, None]) - onehot_CxT)
    g_CxT = jnp.where(fresh_T[None, :] & (scale_C != 0)[:, None], g_CxT, 0.0)
    if dweight_VxH is not None:
      dweight_VxH = _accumulate_outer(dweight_VxH, g_CxT, h_CxH, start)
      db_T = lax.dynamic_slice_in_dim(dbias_V, start, tv) + jnp.sum(g_CxT, axis=0)
      dbias_V = lax.dynamic_update_slice_in_dim(dbias_V, db_T, start, axis=0)
    if with_dhidden:
      dh_CxH = dh_CxH + jnp.dot(g_CxT, w_TxH.astype(dtype))
    return ((dweight_VxH, dbias_V), dh_CxH), None

  dh_CxH = jnp.zeros((h_CxH.shape[0], weight_VxH.shape[1]), dtype) if with_dhidden else None
  xs = (jnp.arange(-(-weight_VxH.shape[0] // tv)), z_KxCxT)
  (acc, dh_CxH), _ = lax.scan(body, (acc, dh_CxH), xs)
  return acc, dh_CxH


def _token_chunks(x, tc):
  """``[N, ...] -> [K, tc, ...]``, zero (False) padded to a multiple of ``tc`` rows."""
  k = -(-x.shape[0] // tc)
  x = jnp.pad(x, [(0, k * tc - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((k, tc) + x.shape[1:])


def _label_logits(hidden_NxH, weight_VxH, bias_V, labels_N, in_range_N):
  """``h_n . w_{y_n} + b_{y_n}`` from a gather of ``N`` weight rows (row 0 where out of range)."""
  safe_N = jnp.where(in_range_N, labels_N, 0)
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  z_N = jnp.sum(hidden_NxH.astype(dtype) * weight_VxH[safe_N].astype(dtype), axis=-1)
  return z_N if bias_V is None else z_N + bias_V[safe_N].astype(dtype)


def _loss(lse_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  """``lse - label logit``; NaN for an out-of-range label, 0 for a masked token."""
  in_range_N = (labels_N >= 0) & (labels_N < weight_VxH.shape[0])
  loss_N = lse_N - _label_logits(hidden_NxH, weight_VxH, bias_V, labels_N, in_range_N)
  loss_N = jnp.where(valid_N, jnp.where(in_range_N, loss_N, jnp.nan), 0.0)
  return loss_N.astype(jnp.result_type(hidden_NxH, weight_VxH))


def _used(weight_VxH, labels_N, valid_N):
  return valid_N & (labels_N >= 0) & (labels_N < weight_VxH.shape[0])


def _gradient_pass(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, scale_N, lse_N, with_dhidden,
                   with_dweight=True):
  """Unscaled (or ``scale``-weighted) gradient sums over token chunks.

  ``lse_N=None`` computes the logsumexp too (the ``custom_vjp`` forward).
  Returns ``(dweight_VxH, dbias_V, dhidden_NxH or None, lse_N)``.
  """
  (n, h), v = hidden_NxH.shape, weight_VxH.shape[0]
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  keep = lse_N is None and tc * v <= _KEPT_LOGITS
  xs = (_token_chunks(hidden_NxH, tc), _token_chunks(labels_N, tc), _token_chunks(scale_N, tc),
        None if lse_N is None else _token_chunks(lse_N, tc))

  def body(acc, x):
    h_CxH, y_C, scale_C, lse_C = x
    z_KxCxT = None
    if lse_C is None:
      lse_C, z_KxCxT = _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, keep)
    acc, dh_CxH = _chunk_gradients(h_CxH, y_C, scale_C, lse_C, z_KxCxT, weight_VxH, bias_V, tv, acc,
                                   with_dhidden)
    return acc, (dh_CxH, lse_C)

  init = (jnp.zeros((v, h), dtype), jnp.zeros((v,), dtype)) if with_dweight else (None, None)
  (dweight_VxH, dbias_V), (dh_KxCxH, lse_KxC) = lax.scan(body, init, xs)
  dh_NxH = None if dh_KxCxH is None else dh_KxCxH.reshape(-1, h)[:n]
  return dweight_VxH, dbias_V, dh_NxH, lse_KxC.reshape(-1)[:n]


def _primal(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  lse_KxC = lax.map(lambda h_CxH: _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, False)[0],
                    _token_chunks(hidden_NxH, tc))
  lse_N = lse_KxC.reshape(-1)[:hidden_NxH.shape[0]]
  return _loss(lse_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  return _primal(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)


def _fused_fwd(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  scale_N = _used(weight_VxH, labels_N, valid_N).astype(_compute_dtype(hidden_NxH, weight_VxH))
  _, _, dhidden_NxH, lse_N = _gradient_pass(
      tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, scale_N, None, True, with_dweight=False)
  loss_N = _loss(lse_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)
  return loss_N, (hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, lse_N, dhidden_NxH)


def _fused_bwd(tc, tv, residuals, g_N):
  hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, lse_N, dhidden_NxH = residuals
  used_N = _used(weight_VxH, labels_N, valid_N)
  g_N = g_N.astype(lse_N.dtype)
  # As the unfused kernel: an out-of-range label gives NaN gradients unless its cotangent is 0.
  poisoned_N = valid_N & ~used_N & (g_N != 0)
  poison = jnp.where(jnp.any(poisoned_N), jnp.nan, 0.0).astype(lse_N.dtype)
  g_used_N = jnp.where(used_N, g_N, 0.0)
  dhidden_NxH = jnp.where(poisoned_N[:, None], jnp.nan, g_used_N[:, None] * dhidden_NxH)
  dweight_VxH, dbias_V, _, _ = _gradient_pass(
      tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, g_used_N, lse_N, False)
  dweight_VxH = (dweight_VxH + poison).astype(weight_VxH.dtype)
  dbias_V = None if bias_V is None else (dbias_V + poison).astype(bias_V.dtype)
  return dhidden_NxH.astype(hidden_NxH.dtype), dweight_VxH, dbias_V, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_softmax_cross_entropy(
    hidden_NxH: jax.typing.ArrayLike,
    weight_VxH: jax.typing.ArrayLike,
    labels_N: jax.typing.ArrayLike,
    *,
    bias_V: Optional[jax.typing.ArrayLike] = None,
    where: Optional[jax.typing.ArrayLike] = None,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> jax.Array:
  r"""Softmax cross-entropy of the output layer ``hidden @ weight.T + bias``, without the ``[N, V]`` logits.

  .. math::
    \ell_n = \log \sum_{v=1}^{V} \exp(h_n \cdot w_v + b_v) - (h_n \cdot w_{y_n} + b_{y_n})

  Equal (to float32 rounding) in value and gradient to
  ``losses.softmax_cross_entropy_with_integer_labels(hidden @ weight.T + bias, labels)``,
  but streams over token and vocabulary chunks (see the module docstring): no
  array of ``N * V`` elements exists in the forward or the backward pass. The
  gradient is exact for any cotangent; forward plus backward cost ``8NHV``
  FLOPs (the backward recomputes the logits chunk by chunk) against the unfused
  ``6NHV``, in a fraction of the memory (see the module docstring). Reverse mode only
  (``jax.custom_vjp``). Computed in float32 for bfloat16/float16 inputs.

  Out-of-range labels (``< 0`` or ``>= V``) in unmasked tokens raise
  ``ValueError`` when the labels are concrete and give a NaN loss (and, for a
  nonzero cotangent, NaN gradients) under ``jit``, as the unfused kernel does.

  Args:
    hidden_NxH: ``[N, H]`` floating, the inputs of the output layer.
    weight_VxH: ``[V, H]`` floating, one row per vocabulary entry.
    labels_N: ``[N]`` integer targets in ``[0, V)``.
    bias_V: optional ``[V]`` floating bias.
    where: optional ``[N]`` boolean mask; masked tokens get loss 0 and
      contribute no gradient (their labels may be anything).
    chunk_size: token rows per chunk (default ``min(N, 256)``).
    vocab_chunk_size: vocabulary entries per block of logits (default
      ``min(V, 8192)``).

  Returns:
    ``loss_N``: ``[N]`` cross-entropy in nats per token, unreduced, in the
    result dtype of ``hidden`` and ``weight``.

  References:
    Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018.
    Wijmans et al., "Cut your losses in large-vocabulary language models", 2024.

  >>> hidden = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  >>> weight = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  >>> loss = linear_softmax_cross_entropy(hidden, weight, jnp.array([0, 1, 2]), chunk_size=2,
  ...                                     vocab_chunk_size=2)
  >>> print(loss.round(4))
  [0.4076 0.2395 2.7586]
  >>> logits = hidden @ weight.T  # the unfused computation, for comparison
  >>> print((jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(3), jnp.array([0, 1, 2])]).round(4))
  [0.4076 0.2395 2.7586]
  """
  hidden_NxH = jnp.asarray(hidden_NxH)
  weight_VxH = jnp.asarray(weight_VxH)
  labels_N = jnp.asarray(labels_N)
  for name, x in (("hidden_NxH", hidden_NxH), ("weight_VxH", weight_VxH)):
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a rank-2 floating array, got shape {x.shape} and dtype {x.dtype}")
  (n, h), (v, h_w) = hidden_NxH.shape, weight_VxH.shape
  if h != h_w or v == 0:
    raise ValueError(f"hidden_NxH {hidden_NxH.shape} and weight_VxH {weight_VxH.shape} need the same H "
                     "and V > 0")
  if labels_N.shape != (n,) or not jnp.issubdtype(labels_N.dtype, jnp.integer):
    raise ValueError(f"labels_N must be an integer array of shape ({n},), got shape {labels_N.shape} "
                     f"and dtype {labels_N.dtype}")
  if bias_V is not None:
    bias_V = jnp.asarray(bias_V)
    if bias_V.shape != (v,) or not jnp.issubdtype(bias_V.dtype, jnp.floating):
      raise ValueError(f"bias_V must be a floating array of shape ({v},), got shape {bias_V.shape} "
                       f"and dtype {bias_V.dtype}")
  if where is None:
    valid_N = jnp.ones((n,), bool)
  else:
    valid_N = jnp.asarray(where)
    if valid_N.shape != (n,) or valid_N.dtype != jnp.bool_:
      raise ValueError(f"where must be a boolean array of shape ({n},), got shape {valid_N.shape} "
                       f"and dtype {valid_N.dtype}")
  tc, tv = _chunk_sizes(n, v, chunk_size, vocab_chunk_size)
  _check_labels_in_range(labels_N, valid_N, v)
  if n == 0:
    return jnp.zeros((0,), jnp.result_type(hidden_NxH, weight_VxH))
  return _fused(tc, tv, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)


def _check_labels_in_range(labels_N, valid_N, v):
  if isinstance(labels_N, jax.core.Tracer) or isinstance(valid_N, jax.core.Tracer):
    return
  labels_np = np.asarray(labels_N)
  bad = ((labels_np < 0) | (labels_np >= v)) & np.asarray(valid_N)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"label {int(labels_np[i])} at index {i} is out of range for vocabulary size V={v} "
                     f"(labels must lie in [0, {v}))")
