r"""Fused output layer and softmax cross-entropy that never materialises the ``[N, V]`` logits.

:func:`linear_softmax_cross_entropy` computes, per token,

.. math::
  \ell_n = \log \sum_{v=1}^{V} \exp(h_n \cdot w_v + b_v) - (h_n \cdot w_{y_n} + b_{y_n}),

streaming over token chunks (``chunk_size`` rows, ``lax.scan``) and, inside
each, over vocabulary chunks (``vocab_chunk_size`` entries) with an online
logsumexp (running max and running sum); each block of logits computed is
``[chunk_size, vocab_chunk_size]``. Options (label smoothing, z-loss, logit
soft-capping, a returned logsumexp; see :func:`linear_softmax_cross_entropy`) change
only the per-token coefficients of the gradient
:math:`G = \alpha\,\mathrm{softmax} - \beta\,\mathrm{onehot} - \gamma` (times
:math:`1 - (z/c)^2` under a soft cap). Three code paths:

* plain evaluation (no autodiff): the online logsumexp alone; ``2NHV`` FLOPs.
* under autodiff (a ``custom_vjp``), every reduction: the cotangent of a reduced loss is a
  scalar, and that of the per-token losses is, in every training loop, one number on the
  counted tokens (``loss.mean()``, ``loss.sum()``, a masked mean). So the forward computes
  the loss and the gradients for a cotangent of 1 on every counted token at once, per token
  chunk keeping its logits blocks (``[chunk_size, V]``, up to ``_KEPT_LOGITS = 2**26``
  elements; past that they are recomputed) between the logsumexp pass and the gradient
  pass: ``6NHV``, as many FLOPs as the unfused matmuls. The backward scales them: ``dh``
  row by row (exact for any cotangent), ``dW`` and ``db`` by the one number; for per-token
  cotangents that differ (weights) it recomputes ``dW`` and ``db`` (``4NHV`` more). The
  residuals are ``dW`` ``[V, H]``, ``dh`` ``[N, H]`` and ``db``: at ``N, H, V = 4096, 512,
  32768`` under a tenth of the unfused temporaries.
* ``return_lse`` under autodiff: the lse has a cotangent vector of its own, so the forward
  is the plain evaluation (``2NHV``), saving the ``[N]`` logsumexp, and the backward
  recomputes each block of logits, forms ``G`` with the per-token cotangents and
  accumulates ``dhidden = G W``, ``dweight = G^T h`` and ``dbias = sum_n G`` (``6NHV``).

Defaults on CPU: token chunks of up to 1024 rows while their logits can be kept (512 at
``V = 131072``) and vocabulary blocks of 4096 for the one-pass gradient; ``chunk_size =
min(N, 256)`` and ``vocab_chunk_size = min(V, 8192)`` (an 8 MiB float32 block) with
``return_lse``. On GPU and TPU (:mod:`lm_jax.ops.platform`) every token is in one chunk,
the vocabulary streams in blocks of 4096 and ``dW`` is emitted block by block, so the only
loop runs ``ceil(V / 4096)`` times whatever ``N``. On 2 CPU cores at ``N, H, V = 1024, 512,
131072`` the per-token recomputing path took 5.9 s against 7.7 s with whole-vocabulary
blocks (128 MiB, whose elementwise passes go to DRAM) and 6.4 s with 128-row token chunks;
the ``[V, H]`` weight gradient is accumulated in place, ``_ACCUMULATE_SLICE`` elements at a
time. Measured speeds and memory: ``experiments/bench_kernels.py`` and WORKSPACE_NOTES.md.

References:
  Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018
  (the running max / running sum logsumexp).
  Wijmans et al., "Cut your losses in large-vocabulary language models", 2024
  (cross-entropy without materialising the logits).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm_jax.ops import labels as labels_lib
from lm_jax.ops import platform
from lm_jax.ops import predicates


_TOKEN_CHUNK = 256
_VOCAB_CHUNK = 8192
# The one-pass gradient (a reduced loss, or the unit-cotangent gradients of the per-token
# loss) contracts G^T h over the token chunk and reads all of W once per chunk: longer
# chunks and shorter vocabulary blocks ran it ~15% faster at N, H, V = 4096, 512, 32768
# (WORKSPACE_NOTES.md); up to 1024 tokens while the chunk's logits stay kept
# (<= _KEPT_LOGITS: 1024 at V = 32768, 512 at V = 131072).
_REDUCED_TOKEN_CHUNK = 1024
_REDUCED_VOCAB_CHUNK = 4096
# On GPU and TPU (platform.per_platform) every token is in one chunk and the vocabulary is
# streamed in blocks of this many entries (a multiple of 128): ceil(V / 4096) loop trips
# whatever N, each block [N, 4096].
_ACCELERATOR_VOCAB_CHUNK = 4096
_KEPT_LOGITS = 2**26
_ACCUMULATE_SLICE = 2**22


def _chunk_sizes(n: int, v: int, chunk_size, vocab_chunk_size, reduced=False) -> tuple[int, int]:
  for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  token_chunk, vocab_chunk = ((_REDUCED_TOKEN_CHUNK, _REDUCED_VOCAB_CHUNK) if reduced
                              else (_TOKEN_CHUNK, _VOCAB_CHUNK))
  if reduced:
    token_chunk = max(_TOKEN_CHUNK, min(token_chunk, _KEPT_LOGITS // max(v, 1)) // 8 * 8)
  return (_balanced(n, chunk_size, token_chunk, 8),
          _balanced(v, vocab_chunk_size, vocab_chunk, 128))


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


REDUCTIONS = ("none", "sum", "mean")


class _Options(NamedTuple):
  """The loss's static options (hashable: a ``nondiff_argnums`` of the ``custom_vjp``)."""
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  logit_soft_cap: Optional[float] = None


def _vocab_chunk(weight_VxH, bias_V, j, tv):
  """Entries ``[start, start + tv)``, ``start = min(j tv, V - tv)``, and a mask of those not in chunk ``j - 1``.

  Clamping the last chunk (which then overlaps its predecessor) avoids padding,
  i.e. copying, the weight.
  """
  start = jnp.minimum(j * tv, weight_VxH.shape[0] - tv)
  w_TxH = lax.dynamic_slice_in_dim(weight_VxH, start, tv, axis=0)
  b_T = None if bias_V is None else lax.dynamic_slice_in_dim(bias_V, start, tv)
  return w_TxH, b_T, start, start + jnp.arange(tv) >= j * tv


def _soft_cap(raw, cap):
  """``cap tanh(raw / cap)`` (Gemma 2's logit soft-capping), or ``raw`` for ``cap=None``."""
  return raw if cap is None else cap * jnp.tanh(raw / cap)


def _logits(h_CxH, w_TxH, b_T, cap):
  dtype = _compute_dtype(h_CxH, w_TxH)
  z_CxT = lax.dot_general(h_CxH, w_TxH, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
  return _soft_cap(z_CxT if b_T is None else z_CxT + b_T.astype(dtype), cap)


def _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, keep, opts):
  """``(lse_C, zsum_C, kept logits [K, C, tv] or None)`` for one token chunk, streaming over
  vocabulary chunks; ``zsum_C`` (the sum of the logits, for label smoothing) is 0 unless
  ``opts.label_smoothing``."""

  def body(carry, j):
    m_C, s_C, zsum_C = carry
    w_TxH, b_T, _, fresh_T = _vocab_chunk(weight_VxH, bias_V, j, tv)
    z_CxT = _logits(h_CxH, w_TxH, b_T, opts.logit_soft_cap)
    if opts.label_smoothing:
      zsum_C = zsum_C + jnp.sum(jnp.where(fresh_T, z_CxT, 0.0), axis=-1)
    z_CxT = jnp.where(fresh_T, z_CxT, -jnp.inf)
    new_m_C = jnp.maximum(m_C, jnp.max(z_CxT, axis=-1))
    s_C = s_C * jnp.exp(m_C - new_m_C) + jnp.sum(jnp.exp(z_CxT - new_m_C[:, None]), axis=-1)
    return (new_m_C, s_C, zsum_C), (z_CxT if keep else None)

  c, dtype = h_CxH.shape[0], _compute_dtype(h_CxH, weight_VxH)
  init = (jnp.full((c,), -jnp.inf, dtype), jnp.zeros((c,), dtype), jnp.zeros((c,), dtype))
  (m_C, s_C, zsum_C), z_KxCxT = lax.scan(body, init, jnp.arange(-(-weight_VxH.shape[0] // tv)))
  return m_C + jnp.log(s_C), zsum_C, z_KxCxT


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


def _coefficients(g_C, g_lse_C, lse_C, v, opts):
  r"""``(alpha, beta, gamma)`` with :math:`\partial L / \partial z_{cv} = \alpha_c p_{cv} - \beta_c
  [v = y_c] - \gamma_c` for the loss :math:`\ell = \mathrm{lse} - (1-\varepsilon) z_y -
  \varepsilon \bar z + \lambda\,\mathrm{lse}^2` with cotangent ``g`` (and ``g_lse`` on lse)."""
  alpha_C = g_C * (1.0 + 2.0 * opts.z_loss * lse_C) if opts.z_loss else g_C
  if g_lse_C is not None:
    alpha_C = alpha_C + g_lse_C
  return alpha_C, g_C * (1.0 - opts.label_smoothing), g_C * (opts.label_smoothing / v)


def _logit_gradient(h_CxH, y_C, coefficients, used_C, lse_C, z_CxT, w_TxH, b_T, start, fresh_T,
                    opts):
  """``G`` ``[C, T]`` for one block of logits (recomputed when ``z_CxT`` is None): 0 for
  tokens not ``used_C`` and for entries not ``fresh_T``; the label term is a dense one-hot
  compare, not a scatter."""
  alpha_C, beta_C, gamma_C = coefficients
  cap = opts.logit_soft_cap
  if z_CxT is None:
    z_CxT = _logits(h_CxH, w_TxH, b_T, cap)
  onehot_CxT = (start + jnp.arange(w_TxH.shape[0]))[None, :] == y_C[:, None]
  g_CxT = alpha_C[:, None] * jnp.exp(z_CxT - lse_C[:, None]) - beta_C[:, None] * onehot_CxT
  if opts.label_smoothing:
    g_CxT = g_CxT - gamma_C[:, None]
  if cap is not None:  # d(cap tanh(r / cap)) / dr = 1 - (z / cap)^2
    g_CxT = g_CxT * (1.0 - jnp.square(z_CxT / cap))
  return jnp.where(fresh_T[None, :] & used_C[:, None], g_CxT, 0.0)


def _chunk_gradients(h_CxH, y_C, coefficients, used_C, lse_C, z_KxCxT, weight_VxH, bias_V, tv,
                     acc, with_dhidden, opts):
  """Adds one token chunk's ``G^T h`` and ``sum_n G_n`` to ``acc``, ``G`` the gradient w.r.t. the
  (pre-cap) logits (see :func:`_coefficients`); ``G = 0`` for tokens not ``used_C``.

  Uses the kept logits blocks ``z_KxCxT`` or, if ``None``, recomputes them.
  Returns ``(acc, G W [C, H] or None)``.
  """
  dtype = _compute_dtype(h_CxH, weight_VxH)
  h_CxH = h_CxH.astype(dtype)

  def body(carry, x):
    (dweight_VxH, dbias_V), dh_CxH = carry
    j, z_CxT = x
    w_TxH, b_T, start, fresh_T = _vocab_chunk(weight_VxH, bias_V, j, tv)
    g_CxT = _logit_gradient(h_CxH, y_C, coefficients, used_C, lse_C, z_CxT, w_TxH, b_T, start,
                            fresh_T, opts)
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


def _blockwise_gradients(h_NxH, y_N, coefficients, used_N, lse_N, weight_VxH, bias_V, tv, opts,
                         with_dhidden=True):
  """All tokens in one chunk: a scan over vocabulary blocks that emits each block of ``dW``
  and ``db`` as it is formed (no ``[V, H]`` carry updated in place) and carries ``dh``.

  The accelerator form: the loop runs ``ceil(V / tv)`` times whatever ``N``; for bfloat16
  inputs the matmuls take bfloat16 and accumulate in float32 (``preferred_element_type``).
  Its temporaries grow with ``N``: ``[N, tv]`` float32 blocks, 16 KiB a token at ``tv =
  4096`` (an explicit ``chunk_size`` bounds them, at ``N / chunk_size`` loop trips).
  Returns ``(dweight_VxH, dbias_V, dhidden_NxH or None)`` in the compute dtype.
  """
  dtype = _compute_dtype(h_NxH, weight_VxH)
  v = weight_VxH.shape[0]

  def body(dh_NxH, j):
    w_TxH, b_T, start, fresh_T = _vocab_chunk(weight_VxH, bias_V, j, tv)
    g_NxT = _logit_gradient(h_NxH, y_N, coefficients, used_N, lse_N, None, w_TxH, b_T, start,
                            fresh_T, opts)
    # bfloat16 inputs: G in bfloat16 too, accumulated in float32 (its exponent range is
    # float32's, so a mean's 1/N does not underflow); float16 would, so G stays float32.
    narrow = jnp.promote_types(h_NxH.dtype, weight_VxH.dtype)
    g_in_NxT = g_NxT.astype(narrow) if narrow == jnp.bfloat16 else g_NxT
    dw_TxH = lax.dot_general(g_in_NxT, h_NxH, (((0,), (0,)), ((), ())),
                             preferred_element_type=dtype)
    if with_dhidden:
      dh_NxH = dh_NxH + lax.dot_general(g_in_NxT, w_TxH, (((1,), (0,)), ((), ())),
                                        preferred_element_type=dtype)
    return dh_NxH, (dw_TxH, jnp.sum(g_NxT, axis=0))

  num_blocks = -(-v // tv)
  dh_NxH = jnp.zeros((h_NxH.shape[0], weight_VxH.shape[1]), dtype) if with_dhidden else None
  dh_NxH, (dw_KxTxH, db_KxT) = lax.scan(body, dh_NxH, jnp.arange(num_blocks))
  return _from_blocks(dw_KxTxH, v), _from_blocks(db_KxT, v), dh_NxH


def _from_blocks(x_KxTx, v):
  """Blocks of :func:`_vocab_chunk` (the last one clamped to end at ``V``) back to ``[V, ...]``."""
  k, tv = x_KxTx.shape[:2]
  if k * tv == v:
    return x_KxTx.reshape((v,) + x_KxTx.shape[2:])
  last = v - (k - 1) * tv  # the last block's fresh rows are its final ``last`` rows
  return jnp.concatenate([x_KxTx[:k - 1].reshape((-1,) + x_KxTx.shape[2:]), x_KxTx[k - 1, tv - last:]])


def _token_chunks(x, tc):
  """``[N, ...] -> [K, tc, ...]``, zero (False) padded to a multiple of ``tc`` rows."""
  k = -(-x.shape[0] // tc)
  x = jnp.pad(x, [(0, k * tc - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((k, tc) + x.shape[1:])


def _label_logits(hidden_NxH, weight_VxH, bias_V, labels_N, in_range_N, cap):
  """``cap(h_n . w_{y_n} + b_{y_n})`` from a gather of ``N`` weight rows (row 0 where out of range)."""
  safe_N = jnp.where(in_range_N, labels_N, 0)
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  z_N = jnp.sum(hidden_NxH.astype(dtype) * weight_VxH[safe_N].astype(dtype), axis=-1)
  return _soft_cap(z_N if bias_V is None else z_N + bias_V[safe_N].astype(dtype), cap)


def _in_range(labels_N, v):
  return labels_lib.in_range_int32(labels_N, v) >= 0


def _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts):
  r""":math:`\mathrm{lse} - (1-\varepsilon) z_y - \varepsilon \bar z + \lambda\,\mathrm{lse}^2`;
  NaN for an out-of-range label, 0 for a masked token; float32 (or wider)."""
  v = weight_VxH.shape[0]
  in_range_N = _in_range(labels_N, v)
  z_y_N = _label_logits(hidden_NxH, weight_VxH, bias_V, labels_N, in_range_N,
                        opts.logit_soft_cap)
  loss_N = lse_N - (1.0 - opts.label_smoothing) * z_y_N
  if opts.label_smoothing:
    loss_N = loss_N - (opts.label_smoothing / v) * zsum_N
  if opts.z_loss:
    loss_N = loss_N + opts.z_loss * jnp.square(lse_N)
  return jnp.where(valid_N, jnp.where(in_range_N, loss_N, jnp.nan), 0.0)


def _gradient_pass(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, g_N, g_lse_N, used_N,
                   lse_N, with_dhidden):
  """Gradient sums over token chunks for per-token loss cotangents ``g_N`` (and ``g_lse_N``).

  ``lse_N=None`` computes the logsumexp (and the logit sums) too, keeping each token chunk's
  logits for its gradient pass: the one-pass forward of a reduced loss. ``tc=None``: the
  accelerator form, every token in one chunk and the gradients emitted block by block
  (:func:`_blockwise_gradients`).
  Returns ``(dweight_VxH, dbias_V, dhidden_NxH or None, lse_N, zsum_N)``.
  """
  (n, h), v = hidden_NxH.shape, weight_VxH.shape[0]
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  if tc is None:
    hidden_NxH = jnp.where(used_N[:, None], hidden_NxH, jnp.zeros((), hidden_NxH.dtype))
    zsum_N = jnp.zeros((n,), dtype)
    if lse_N is None:
      lse_N, zsum_N, _ = _online_logsumexp(hidden_NxH, weight_VxH, bias_V, tv, False, opts)
    coefficients = _coefficients(g_N, g_lse_N, lse_N, v, opts)
    dweight_VxH, dbias_V, dh_NxH = _blockwise_gradients(
        hidden_NxH, labels_N, coefficients, used_N, lse_N, weight_VxH, bias_V, tv, opts,
        with_dhidden)
    return dweight_VxH, dbias_V, dh_NxH, lse_N, zsum_N
  keep = lse_N is None and tc * v <= _KEPT_LOGITS
  chunks = lambda x: None if x is None else _token_chunks(x, tc)
  xs = tuple(map(chunks, (hidden_NxH, labels_N, g_N, g_lse_N, used_N, lse_N)))

  def body(acc, x):
    h_CxH, y_C, g_C, g_lse_C, used_C, lse_C = x
    # Padding cannot poison: an unused token's hidden row (masked, or a bad label, whose NaN
    # comes from _poisoned) may hold NaN or inf; it is zeroed before any matmul, so G^T h
    # and sum G get exactly 0 from it, not 0 * NaN.
    h_CxH = jnp.where(used_C[:, None], h_CxH, jnp.zeros((), h_CxH.dtype))
    z_KxCxT, zsum_C = None, jnp.zeros(h_CxH.shape[:1], dtype)
    if lse_C is None:
      lse_C, zsum_C, z_KxCxT = _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, keep, opts)
    coefficients = _coefficients(g_C, g_lse_C, lse_C, v, opts)
    acc, dh_CxH = _chunk_gradients(h_CxH, y_C, coefficients, used_C, lse_C, z_KxCxT, weight_VxH,
                                   bias_V, tv, acc, with_dhidden, opts)
    return acc, (dh_CxH, lse_C, zsum_C)

  init = (jnp.zeros((v, h), dtype), jnp.zeros((v,), dtype))
  (dweight_VxH, dbias_V), (dh_KxCxH, lse_KxC, zsum_KxC) = lax.scan(body, init, xs)
  dh_NxH = None if dh_KxCxH is None else dh_KxCxH.reshape(-1, h)[:n]
  return dweight_VxH, dbias_V, dh_NxH, lse_KxC.reshape(-1)[:n], zsum_KxC.reshape(-1)[:n]


def _lse_and_sums(tc, tv, opts, hidden_NxH, weight_VxH, bias_V):
  """``(lse_N, zsum_N)`` streamed over token and vocabulary chunks: ``2NHV`` FLOPs
  (``tc=None``: every token in one chunk)."""
  if tc is None:
    return _online_logsumexp(hidden_NxH, weight_VxH, bias_V, tv, False, opts)[:2]
  lse_KxC, zsum_KxC, _ = lax.map(
      lambda h_CxH: _online_logsumexp(h_CxH, weight_VxH, bias_V, tv, False, opts),
      _token_chunks(hidden_NxH, tc))
  n = hidden_NxH.shape[0]
  return lse_KxC.reshape(-1)[:n], zsum_KxC.reshape(-1)[:n]


def _poisoned(valid_N, used_N, g_N, dhidden_NxH, dweight_VxH, dbias_V, dtype):
  """Gradients made NaN as the unfused kernel's are for a counted out-of-range label with a
  nonzero cotangent: that token's ``dhidden`` row, and all of ``dweight`` and ``dbias``."""
  poisoned_N = valid_N & ~used_N & (g_N != 0)
  poison = jnp.where(jnp.any(poisoned_N), jnp.nan, 0.0).astype(dtype)
  return (jnp.where(poisoned_N[:, None], jnp.nan, dhidden_NxH), dweight_VxH + poison,
          None if dbias_V is None else dbias_V + poison)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _per_token(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  """``loss_N``. Differentiated, the forward also forms the unit-cotangent gradients
  (``6NHV``, :func:`_per_token_fwd`); plain evaluation is ``2NHV``."""
  lse_N, zsum_N = _lse_and_sums(tc, tv, opts, hidden_NxH, weight_VxH, bias_V)
  return _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts)


def _per_token_fwd(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  r"""The loss and its gradients for a cotangent of 1 on every counted token, in one pass.

  The loss of token :math:`n` is linear in its cotangent :math:`g_n`, so :math:`\partial h_n
  = g_n\,\partial h_n^{(1)}` exactly for any cotangent, and :math:`\partial W = g\,\partial
  W^{(1)}` (likewise the bias) when :math:`g` is one number on the counted tokens: what
  ``loss.mean()``, ``loss.sum()`` and a masked mean give, i.e. every training loop. The
  residuals are ``dW`` ``[V, H]``, ``dh`` ``[N, H]`` and ``db`` ``[V]`` (at ``N, H, V = 4096,
  512, 32768`` 72 MiB against the unfused logits' 512 MiB).
  """
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  used_N = valid_N & _in_range(labels_N, weight_VxH.shape[0])
  dweight_VxH, dbias_V, dhidden_NxH, lse_N, zsum_N = _gradient_pass(
      tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, used_N.astype(dtype), None, used_N,
      None, True)
  loss_N = _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts)
  return loss_N, (hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, lse_N, dweight_VxH,
                  dbias_V, dhidden_NxH)


def _one_number(g_N, used_N):
  """Whether ``g_N`` is one number on the ``used_N`` tokens (a bool scalar); under ``vmap``
  one unbatched scalar, True when every problem's is (:mod:`lm_jax.ops.predicates`), so the
  backward's cond never runs the recomputing pass and B copies of its ``[V, H]`` output for
  every problem."""
  first = g_N[jnp.argmax(used_N)]
  return predicates.every_problem(jnp.all(jnp.where(used_N, g_N == first, True)))


def _per_token_bwd(tc, tv, opts, residuals, g_N):
  """Scales the unit-cotangent gradients when the cotangent is one number on the counted
  tokens; otherwise recomputes ``dW`` and ``db`` (``4NHV``; ``dh`` is scaled row by row)."""
  (hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, lse_N, dweight_1_VxH, dbias_1_V,
   dhidden_1_NxH) = residuals
  g_N = g_N.astype(lse_N.dtype)
  used_N = valid_N & _in_range(labels_N, weight_VxH.shape[0])
  # No counted token: every unit gradient is 0, and so is the scale (not a masked token's
  # cotangent, which may be inf or NaN, e.g. the 0/0 of an all-padding masked mean).
  g_first = jnp.where(jnp.any(used_N), g_N[jnp.argmax(used_N)], 0.0)
  uniform = _one_number(lax.stop_gradient(g_N), used_N)

  def scaled(_):
    return g_first * dweight_1_VxH, g_first * dbias_1_V

  def recomputed(_):
    dweight_VxH, dbias_V, _, _, _ = _gradient_pass(
        tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, jnp.where(used_N, g_N, 0.0),
        None, used_N, lse_N, False)
    return dweight_VxH, dbias_V

  dweight_VxH, dbias_V = lax.cond(uniform, scaled, recomputed, None)
  dhidden_NxH = jnp.where(used_N, g_N, 0.0)[:, None] * dhidden_1_NxH
  dhidden_NxH, dweight_VxH, dbias_V = _poisoned(valid_N, used_N, g_N, dhidden_NxH, dweight_VxH,
                                                dbias_V, lse_N.dtype)
  return (dhidden_NxH.astype(hidden_NxH.dtype), dweight_VxH.astype(weight_VxH.dtype),
          None if bias_V is None else dbias_V.astype(bias_V.dtype), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _with_lse(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  """``(loss_N, lse_N)``; forward ``2NHV``, backward ``6NHV`` (logits recomputed): the lse's
  cotangent is a vector of its own, so no unit-cotangent gradient serves."""
  lse_N, zsum_N = _lse_and_sums(tc, tv, opts, hidden_NxH, weight_VxH, bias_V)
  return _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts), lse_N


def _with_lse_fwd(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  out = _with_lse(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)
  return out, (hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, out[1])


def _with_lse_bwd(tc, tv, opts, residuals, cotangents):
  hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, lse_N = residuals
  g_N, g_lse_N = (c.astype(lse_N.dtype) for c in cotangents)
  used_N = valid_N & _in_range(labels_N, weight_VxH.shape[0])
  dweight_VxH, dbias_V, dhidden_NxH, _, _ = _gradient_pass(
      tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, jnp.where(used_N, g_N, 0.0),
      g_lse_N, used_N | (g_lse_N != 0), lse_N, True)
  dhidden_NxH, dweight_VxH, dbias_V = _poisoned(valid_N, used_N, g_N, dhidden_NxH, dweight_VxH,
                                                dbias_V, lse_N.dtype)
  return (dhidden_NxH.astype(hidden_NxH.dtype), dweight_VxH.astype(weight_VxH.dtype),
          None if bias_V is None else dbias_V.astype(bias_V.dtype), None, None)


_with_lse.defvjp(_with_lse_fwd, _with_lse_bwd)
_per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _reduced(tc, tv, opts, mean, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  """The summed (or, ``mean``, averaged over counted tokens) loss; forward ``2NHV``."""
  lse_N, zsum_N = _lse_and_sums(tc, tv, opts, hidden_NxH, weight_VxH, bias_V)
  loss_N = _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts)
  return jnp.sum(loss_N) / (jnp.sum(valid_N) if mean else 1)


def _reduced_fwd(tc, tv, opts, mean, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N):
  """Loss and all three gradients in one pass (``6NHV``): the cotangent is a scalar."""
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  used_N = valid_N & _in_range(labels_N, weight_VxH.shape[0])
  scale = 1.0 / jnp.sum(valid_N).astype(dtype) if mean else jnp.ones((), dtype)
  g_N = jnp.where(used_N, scale, 0.0).astype(dtype)
  dweight_VxH, dbias_V, dhidden_NxH, lse_N, zsum_N = _gradient_pass(
      tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, g_N, None, used_N, None, True)
  loss_N = _loss(lse_N, zsum_N, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N, opts)
  grads = _poisoned(valid_N, used_N, jnp.broadcast_to(scale, valid_N.shape), dhidden_NxH,
                    dweight_VxH, None if bias_V is None else dbias_V, dtype)
  # Kept in the inputs' dtypes: the backward only scales them by the scalar cotangent.
  grads = jax.tree.map(lambda grad, x: grad.astype(x.dtype), grads, (hidden_NxH, weight_VxH, bias_V))
  return jnp.sum(loss_N) * scale, grads


def _reduced_bwd(tc, tv, opts, mean, residuals, g):
  del tc, tv, opts, mean
  scaled = lambda grad: None if grad is None else g.astype(grad.dtype) * grad
  return (*map(scaled, residuals), None, None)


_reduced.defvjp(_reduced_fwd, _reduced_bwd)


def linear_softmax_cross_entropy(
    hidden_NxH: jax.typing.ArrayLike,
    weight_VxH: jax.typing.ArrayLike,
    labels_N: jax.typing.ArrayLike,
    *,
    bias_V: Optional[jax.typing.ArrayLike] = None,
    where: Optional[jax.typing.ArrayLike] = None,
    reduction: str = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    implementation: str = "auto",
) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
  r"""Softmax cross-entropy of the output layer ``hidden @ weight.T + bias``, without the ``[N, V]`` logits.

  With :math:`z_{nv} = c \tanh((h_n \cdot w_v + b_v) / c)` (``logit_soft_cap`` :math:`c`;
  without it :math:`z_{nv} = h_n \cdot w_v + b_v`), :math:`\mathrm{lse}_n = \log \sum_{v=1}^V
  e^{z_{nv}}` and :math:`\bar z_n = \frac1V \sum_v z_{nv}`, the loss of token :math:`n` is

  .. math::
    \ell_n = \mathrm{lse}_n - (1 - \varepsilon)\, z_{n y_n} - \varepsilon\, \bar z_n
             + \lambda\, \mathrm{lse}_n^2,

  the cross-entropy against the label smoothed with :math:`\varepsilon` (``label_smoothing``:
  weight :math:`1 - \varepsilon + \varepsilon / V` on the label, :math:`\varepsilon / V` on
  every other word, as PyTorch's ``label_smoothing``) plus the z-loss :math:`\lambda\,
  \mathrm{lse}^2` (``z_loss``; PaLM, Levanter) that keeps the normaliser near 1. With no
  options it equals ``losses.softmax_cross_entropy_with_integer_labels(hidden @ weight.T +
  bias, labels)`` (to float32 rounding) in value and gradient, but streams over token and
  vocabulary chunks (see the module docstring): no array of ``N * V`` elements exists in
  the forward or the backward pass.

  ``reduction`` is PyTorch's: ``"none"`` returns ``[N]`` (0 where ``where`` is False),
  ``"sum"`` the sum over counted tokens, ``"mean"`` that sum over the number of counted
  tokens (NaN if none is counted, as PyTorch with every target ``ignore_index``). The
  natural call is the fast one: differentiated, every reduction computes the loss and all
  three gradients in one pass (``6NHV`` FLOPs, the unfused matmuls' count), and the
  per-token losses reduced by the caller (``.mean()``, ``.sum()``, a masked mean: a
  cotangent that is one number on the counted tokens) only scale them in the backward;
  per-token weights that differ cost a second pass for ``dW`` and ``db`` (``4NHV``). Plain
  evaluation is ``2NHV``. Reverse mode only (``jax.custom_vjp``). Computed in float32 for
  bfloat16/float16 inputs (the matmuls accumulate in float32); the loss is float32.

  Padding cannot poison: tokens where ``where`` is False may hold any label (``-1``
  padding is PyTorch's ``ignore_index``) and any hidden state (NaN, ``inf``); their loss
  is 0 and they add exactly 0 to the gradients of ``hidden_NxH`` (their rows are 0),
  ``weight_VxH`` and ``bias_V``, for every reduction and option: their hidden rows are
  replaced by 0 before the backward's matmuls. (With ``return_lse`` their ``lse`` is that
  of a zero hidden state, finite, whatever their row holds, and its gradient reaches only
  ``bias_V``; their hidden-state gradient stays exactly 0.) A bad
  target poisons: out-of-range labels (``< 0`` or ``>= V``) in counted tokens raise
  ``ValueError`` when the labels are readable on the host (:mod:`lm_jax.ops.labels`) and,
  under ``jit``, give a NaN loss and NaN
  gradients (that token's ``dhidden`` row, all of ``dweight`` and ``dbias``), as the
  unfused kernel does, so ``optax.apply_if_finite``-style guards see them.

  Args:
    hidden_NxH: ``[N, H]`` floating, the inputs of the output layer.
    weight_VxH: ``[V, H]`` floating, one row per vocabulary entry.
    labels_N: ``[N]`` integer targets in ``[0, V)``.
    bias_V: optional ``[V]`` floating bias.
    where: optional ``[N]`` boolean mask; masked tokens get loss 0 and
      contribute no gradient (their labels and hidden rows may be anything).
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the counted tokens).
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    z_loss: :math:`\lambda \ge 0`, the weight of :math:`\mathrm{lse}^2` added to each loss.
    logit_soft_cap: :math:`c > 0`, or ``None`` for no capping (Gemma 2 uses 30).
    return_lse: also return ``lse_N`` ``[N]`` (of the capped logits, for every token; a
      masked token's is that of a zero hidden state), differentiable; then the backward
      always recomputes (``8NHV``).
    chunk_size: token rows per chunk (default on CPU up to 1024 while a chunk's
      ``[chunk_size, V]`` logits fit ``2**26`` elements, at least 256; ``min(N, 256)`` with
      ``return_lse``; on GPU and TPU every token in one chunk).
    vocab_chunk_size: vocabulary entries per block of logits (default 4096; on CPU with
      ``return_lse`` ``min(V, 8192)``).
    implementation: ``"auto"`` (default): the CPU form on a CPU and the accelerator form
      elsewhere, chosen when the program is lowered (:mod:`lm_jax.ops.platform`); ``"cpu"``
      or ``"accelerator"`` forces one. The accelerator form's only loop runs over the
      ``ceil(V / vocab_chunk_size)`` vocabulary blocks whatever ``N`` (a ``while`` loop is
      driven from the host on a GPU): one token chunk, ``dW`` emitted block by block, the
      gradient matmuls in bfloat16 for bfloat16 inputs, accumulating in float32. Its
      temporaries are ``[N, vocab_chunk_size]`` float32 blocks (16 KiB a token by default);
      an explicit ``chunk_size`` gives token chunks on every platform, which bounds them at
      the cost of ``N / chunk_size`` loop trips.

  Returns:
    ``loss``: ``[N]`` cross-entropy in nats per token (``reduction="none"``) or a scalar,
    float32 (float64 for float64 inputs); with ``return_lse``, ``(loss, lse_N)``.

  References:
    Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018.
    Wijmans et al., "Cut your losses in large-vocabulary language models", 2024.
    Szegedy et al., "Rethinking the Inception architecture", 2016 (label smoothing);
    Chowdhery et al., "PaLM", 2022, Section 5 (z-loss); Gemma Team, "Gemma 2", 2024
    (logit soft-capping); PyTorch ``torch.nn.functional.linear_cross_entropy``.

  >>> hidden = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  >>> weight = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  >>> loss = linear_softmax_cross_entropy(hidden, weight, jnp.array([0, 1, 2]), chunk_size=2,
  ...                                     vocab_chunk_size=2)
  >>> print(loss.round(4))
  [0.4076 0.2395 2.7586]
  >>> logits = hidden @ weight.T  # the unfused computation, for comparison
  >>> print((jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(3), jnp.array([0, 1, 2])]).round(4))
  [0.4076 0.2395 2.7586]
  >>> mean = linear_softmax_cross_entropy(hidden, weight, jnp.array([0, 1, 2]), reduction="mean")
  >>> print(f"{float(mean):.4f}")  # (0.4076 + 0.2395 + 2.7586) / 3
  1.1353
  """
  given_labels = labels_N  # checked as given: NumPy labels need no device-to-host read
  hidden_NxH, weight_VxH, labels_N, bias_V, valid_N = _check_arrays(hidden_NxH, weight_VxH,
                                                                    labels_N, bias_V, where)
  (n, _), v = hidden_NxH.shape, weight_VxH.shape[0]
  opts = _check_options(reduction, label_smoothing, z_loss, logit_soft_cap)
  platform.check_implementation(implementation)
  reduced = not return_lse
  cpu_chunks = _chunk_sizes(n, v, chunk_size, vocab_chunk_size, reduced=reduced)
  labels_lib.check_in_range(given_labels, v, None if where is None else where)
  dtype = _compute_dtype(hidden_NxH, weight_VxH)
  if n == 0:
    loss = jnp.zeros((0,), dtype) if reduction == "none" else jnp.asarray(
        jnp.nan if reduction == "mean" else 0.0, dtype)
    return (loss, jnp.zeros((0,), dtype)) if return_lse else loss
  if return_lse and where is not None:
    # The lse is an output here, so a masked token's must not depend on its row either
    # (a caller's z-loss on it would differentiate NaN * 0): that of a zero hidden state.
    hidden_NxH = jnp.where(valid_N[:, None], hidden_NxH, 0)
  accelerator_chunks = (None if chunk_size is None else cpu_chunks[0],
                        _balanced(v, vocab_chunk_size, _ACCELERATOR_VOCAB_CHUNK, 128))
  run = lambda chunks: functools.partial(_dispatch, *chunks, opts, reduction, return_lse)
  return platform.per_platform(run(cpu_chunks), run(accelerator_chunks), hidden_NxH, weight_VxH,
                               bias_V, labels_N, valid_N, implementation=implementation)


def _dispatch(tc, tv, opts, reduction, return_lse, hidden_NxH, weight_VxH, bias_V, labels_N,
              valid_N):
  """The loss (and lse) for fixed chunk sizes: with the lse, per-token, or one-pass reduced."""
  if return_lse:
    loss_N, lse_N = _with_lse(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)
    if reduction == "none":
      return loss_N, lse_N
    count = jnp.sum(valid_N).astype(loss_N.dtype)
    return jnp.sum(loss_N) / (count if reduction == "mean" else 1), lse_N
  if reduction == "none":
    return _per_token(tc, tv, opts, hidden_NxH, weight_VxH, bias_V, labels_N, valid_N)
  return _reduced(tc, tv, opts, reduction == "mean", hidden_NxH, weight_VxH, bias_V, labels_N,
                  valid_N)


def _check_arrays(hidden_NxH, weight_VxH, labels_N, bias_V, where):
  """The arrays as ``jax.Array``s and ``valid_N`` (all True without ``where``); ``ValueError``
  naming the shape or dtype that is wrong."""
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
  return hidden_NxH, weight_VxH, labels_N, bias_V, valid_N


def _check_options(reduction, label_smoothing, z_loss, logit_soft_cap) -> _Options:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
  if not z_loss >= 0.0:
    raise ValueError(f"z_loss must be >= 0, got {z_loss}")
  if logit_soft_cap is not None and not logit_soft_cap > 0.0:
    raise ValueError(f"logit_soft_cap must be > 0 or None, got {logit_soft_cap}")
  return _Options(float(label_smoothing), float(z_loss),
                  None if logit_soft_cap is None else float(logit_soft_cap))
