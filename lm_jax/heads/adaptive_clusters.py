r"""The adaptive softmax's cluster losses: :math:`-\log \mathrm{softmax}(U P h)_y` for the tokens
whose target is in one cluster (:mod:`lm_jax.heads.adaptive`), in three forms.

* :func:`_cluster_nll` (the CPU form): the cluster's tokens scored ``K`` at a time by a
  ``lax.scan`` over items, with a hand-written backward that scales unit-cotangent
  gradients formed in the forward.
* :func:`_cluster_nll_autodiff`: the same scan differentiated by JAX (``jax.jvp`` works).
* :func:`_cluster_nll_dense` (the GPU/TPU form): masked dense math over every token through
  the fused loss's accelerator form, whose only loop runs over vocabulary blocks.
"""
import functools

import jax
import jax.numpy as jnp

from lm_jax.ops import fused
from lm_jax.ops import precision


def _cluster_items(in_cluster_N, tokens_per_item):
  """``(order, count, width, num_items)``: the cluster's tokens first (a stable sort), padded
  to ``num_items`` items of ``width`` tokens; ``count`` of them are the cluster's."""
  num_tokens = in_cluster_N.shape[0]
  width = max(min(tokens_per_item, num_tokens), 1)  # an empty batch: no items
  num_items = -(-num_tokens // width)
  order_N = jnp.argsort(~in_cluster_N, stable=True).astype(jnp.int32)
  order = jnp.concatenate([order_N, jnp.zeros(num_items * width - num_tokens, jnp.int32)])
  return order, jnp.sum(in_cluster_N.astype(jnp.int32)), width, num_items


def _items_to_tokens(order, count, values_M, num_tokens):
  """Per-slot values of a cluster's items, flattened to ``[M, ...]`` (``M = num_items *
  width``), added back at their tokens' positions: ``[N, ...]``, padding slots adding 0."""
  valid_M = jnp.arange(order.shape[0]) < count
  valid = valid_M.reshape(valid_M.shape + (1,) * (values_M.ndim - 1))
  return jnp.zeros((num_tokens,) + values_M.shape[1:], values_M.dtype).at[order].add(
      jnp.where(valid, values_M, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cluster_nll(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, tokens_per_item):
  r"""``-log softmax(U P h)[relative]`` for the tokens in the cluster, 0 elsewhere (in float32,
  or float64 for float64 inputs).

  The cluster's tokens are moved to the front (a stable sort), then scored ``K`` at a time
  by a ``lax.scan`` whose items past the cluster's count are skipped (``lax.cond``), so the
  work is proportional to the tokens the cluster has, with static shapes.

  Differentiated (``jax.custom_vjp``), the forward also forms, while each item's ``[K, W]``
  softmax is at hand, the gradient for a cotangent of 1 per token: :math:`\partial U_1 =
  \sum_k (p_k - y_k) z_k^\top` (``[W, R]``, in the scan's carry) and :math:`v_k = U^\top
  (p_k - y_k)` (``[R]`` per token), one exponential per logit. The loss is linear in the
  cotangent :math:`g`, so when :math:`g` is the same for every token of the cluster (a
  mean or a sum of the losses, with or without a mask: what training does) the backward
  is :math:`\partial U = g\,\partial U_1`, :math:`\partial z_k = g\,v_k`, with no second
  pass over the ``[K, W]`` logits. Otherwise (per-token weights) it scans the items again,
  recomputes each item's softmax from the saved log-normalisers and accumulates
  :math:`\partial U = \sum_k g_k (p_k - y_k) z_k^\top`, :math:`\partial P` in the carry.
  Either way no ``[K, W]`` array is kept between the passes (autodiff of the scan stacks
  one per item: 800 MB at V = 100k, N = 2048, and is 3x slower).
  """
  return _cluster_forward(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N,
                          tokens_per_item)[0]


def _item_logits(proj_RxH, weight_WxR, hidden_NxH, index_K):
  compute = jnp.result_type(jnp.float32, hidden_NxH, proj_RxH)
  hidden_KxH = hidden_NxH[index_K].astype(compute)
  z_KxR = hidden_KxH @ proj_RxH.astype(compute).T
  return hidden_KxH, z_KxR, z_KxR @ weight_WxR.astype(compute).T


def _cluster_forward(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N,
                     tokens_per_item):
  order, count, width, num_items = _cluster_items(in_cluster_N, tokens_per_item)
  num_tokens = hidden_NxH.shape[0]
  compute = jnp.result_type(jnp.float32, hidden_NxH, proj_RxH)

  def item(_, j):
    def score(j):
      index_K = jax.lax.dynamic_slice(order, (j * width,), (width,))
      _, _, logits_KxW = _item_logits(proj_RxH, weight_WxR, hidden_NxH, index_K)
      target_K = jnp.take_along_axis(logits_KxW, relative_N[index_K][:, None], axis=-1)[:, 0]
      lse_K = jax.nn.logsumexp(logits_KxW, axis=-1)
      return lse_K, lse_K - target_K

    zeros = lambda j: (jnp.zeros((width,), compute), jnp.zeros((width,), compute))
    return None, jax.lax.cond(j * width < count, score, zeros, j)

  _, (lse_LxK, nll_LxK) = jax.lax.scan(item, None, jnp.arange(num_items))
  nll_N = _items_to_tokens(order, count, nll_LxK.reshape(-1), num_tokens)
  return nll_N, (proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, lse_LxK)


def _cluster_forward_with_unit_grads(proj_RxH, weight_WxR, hidden_NxH, relative_N,
                                     in_cluster_N, tokens_per_item):
  """The ``custom_vjp`` forward: the loss, and the gradients for a cotangent of 1 per token
  (:func:`_cluster_nll`'s docstring), in one pass over each item's logits."""
  order, count, width, num_items = _cluster_items(in_cluster_N, tokens_per_item)
  num_tokens = hidden_NxH.shape[0]
  num_words, rank = weight_WxR.shape
  compute = jnp.result_type(jnp.float32, hidden_NxH, proj_RxH)

  def item(d_weight_WxR, j):
    def score(d_weight_WxR):
      index_K = jax.lax.dynamic_slice(order, (j * width,), (width,))
      valid_K = j * width + jnp.arange(width) < count
      _, z_KxR, logits_KxW = _item_logits(proj_RxH, weight_WxR, hidden_NxH, index_K)
      target_K = relative_N[index_K]
      max_K = jax.lax.stop_gradient(jnp.max(logits_KxW, axis=-1))
      exp_KxW = jnp.exp(logits_KxW - max_K[:, None])
      sum_K = jnp.sum(exp_KxW, axis=-1)
      lse_K = max_K + jnp.log(sum_K)
      target_logit_K = jnp.take_along_axis(logits_KxW, target_K[:, None], axis=-1)[:, 0]
      # (p - y) for a cotangent of 1, zero on the item's padding rows, without forming p:
      # p = exp / sum, so the 1 / sum scales the [K, R] and [K, W] x [W, R] products instead,
      # and y's part is K rows of U added or subtracted.
      scale_K = jnp.where(valid_K, 1.0 / sum_K, 0.0)
      weight_c_WxR = weight_WxR.astype(compute)
      y_z_KxR = jnp.where(valid_K[:, None], z_KxR, 0.0)
      d_weight_WxR = (d_weight_WxR + exp_KxW.T @ (z_KxR * scale_K[:, None])).at[target_K].add(
          -y_z_KxR)
      v_KxR = ((exp_KxW @ weight_c_WxR) * scale_K[:, None]
               - jnp.where(valid_K[:, None], weight_c_WxR[target_K], 0.0))
      return d_weight_WxR, (lse_K, lse_K - target_logit_K, v_KxR)

    def skip(d_weight_WxR):
      return d_weight_WxR, (jnp.zeros((width,), compute), jnp.zeros((width,), compute),
                            jnp.zeros((width, rank), compute))

    return jax.lax.cond(j * width < count, score, skip, d_weight_WxR)

  d_weight_WxR, (lse_LxK, nll_LxK, v_LxKxR) = jax.lax.scan(
      item, jnp.zeros((num_words, rank), compute), jnp.arange(num_items))
  nll_N = _items_to_tokens(order, count, nll_LxK.reshape(-1), num_tokens)
  return nll_N, (proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, lse_LxK,
                 d_weight_WxR, v_LxKxR)


def _cluster_backward(tokens_per_item, residuals, g_N):
  """The ``custom_vjp`` backward: scaled unit gradients when the cotangent is one number on
  the cluster's tokens, else :func:`_cluster_backward_rescan`."""
  (proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, lse_LxK, d_weight_1_WxR,
   v_LxKxR) = residuals
  order, count, width, num_items = _cluster_items(in_cluster_N, tokens_per_item)
  valid = jnp.arange(num_items * width) < count
  g_all = g_N[order].astype(d_weight_1_WxR.dtype)
  g_first = g_all[0]
  uniform = jnp.all(jnp.where(valid, g_all == g_first, True))

  def scaled(_):
    d_z_MxR = jnp.where(valid[:, None], g_all[:, None] * v_LxKxR.reshape(-1, v_LxKxR.shape[-1]),
                        0.0)
    hidden_MxH = hidden_NxH[order].astype(d_z_MxR.dtype)
    d_hidden_NxH = _items_to_tokens(order, count, d_z_MxR @ proj_RxH.astype(d_z_MxR.dtype),
                                    hidden_NxH.shape[0])
    return (d_z_MxR.T @ hidden_MxH, jnp.where(count > 0, g_first, 0.0) * d_weight_1_WxR,
            d_hidden_NxH)

  def rescan(_):
    return _cluster_backward_rescan(
        tokens_per_item, (proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, lse_LxK),
        g_N)

  d_proj_RxH, d_weight_WxR, d_hidden_NxH = jax.lax.cond(uniform, scaled, rescan, None)
  return (d_proj_RxH.astype(proj_RxH.dtype), d_weight_WxR.astype(weight_WxR.dtype),
          d_hidden_NxH.astype(hidden_NxH.dtype), None, None)


def _cluster_backward_rescan(tokens_per_item, residuals, g_N):
  """Backward for any cotangent: rescans the items and recomputes each softmax; returns the
  gradients in the compute dtype."""
  proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N, lse_LxK = residuals
  order, count, width, num_items = _cluster_items(in_cluster_N, tokens_per_item)
  num_words, rank = weight_WxR.shape
  hidden_size = hidden_NxH.shape[1]

  def item(carry, x):
    j, lse_K = x

    def add(carry):
      d_proj_RxH, d_weight_WxR = carry
      index_K = jax.lax.dynamic_slice(order, (j * width,), (width,))
      valid_K = j * width + jnp.arange(width) < count
      hidden_KxH, z_KxR, logits_KxW = _item_logits(proj_RxH, weight_WxR, hidden_NxH, index_K)
      g_K = jnp.where(valid_K, g_N[index_K], 0.0).astype(logits_KxW.dtype)
      # (p - y) g, with p from the forward's log-sum-exp and y subtracted at the targets only.
      d_logits_KxW = (jnp.exp(logits_KxW - lse_K[:, None]) * g_K[:, None]).at[
          jnp.arange(width), relative_N[index_K]].add(-g_K)
      d_z_KxR = d_logits_KxW @ weight_WxR.astype(d_logits_KxW.dtype)
      d_hidden_KxH = d_z_KxR @ proj_RxH.astype(d_z_KxR.dtype)
      return ((d_proj_RxH + d_z_KxR.T @ hidden_KxH, d_weight_WxR + d_logits_KxW.T @ z_KxR),
              d_hidden_KxH)

    skip = lambda carry: (carry, jnp.zeros((width, hidden_size), carry[0].dtype))
    return jax.lax.cond(j * width < count, add, skip, carry)

  compute = jnp.result_type(jnp.float32, hidden_NxH, proj_RxH)
  zeros = (jnp.zeros((rank, hidden_size), compute), jnp.zeros((num_words, rank), compute))
  (d_proj_RxH, d_weight_WxR), d_hidden_LxKxH = jax.lax.scan(
      item, zeros, (jnp.arange(num_items), lse_LxK))
  d_hidden_NxH = _items_to_tokens(order, count, d_hidden_LxKxH.reshape(-1, hidden_size),
                                  hidden_NxH.shape[0])
  return d_proj_RxH, d_weight_WxR, d_hidden_NxH


_cluster_nll.defvjp(_cluster_forward_with_unit_grads, _cluster_backward)


def _cluster_nll_autodiff(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N,
                          tokens_per_item):
  """:func:`_cluster_nll` without the hand-written backward: JAX differentiates the scan in
  either mode (``jax.jvp`` works), at the cost of one stacked ``[K, W]`` array per item."""
  return _cluster_forward(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N,
                          tokens_per_item)[0]


def _cluster_nll_dense(proj_RxH, weight_WxR, hidden_NxH, relative_N, in_cluster_N):
  """:func:`_cluster_nll` as masked dense math (the accelerator form): every token projected,
  ``z = P h`` (``[N, R]``), and the fused loss's accelerator form over the cluster's words
  with ``where=in_cluster`` (one loop over vocabulary blocks, whatever ``N``; no ``[N, W]``
  logits). ``O(N R (H + W))`` work for all ``N`` tokens, against the scan's tokens of the
  cluster only: cheap while ``R`` is small, and no loop over items."""
  compute = jnp.result_type(jnp.float32, hidden_NxH, proj_RxH)
  z_NxR = precision.matmul(hidden_NxH.astype(compute), proj_RxH.astype(compute).T)
  return fused.linear_softmax_cross_entropy(z_NxR, weight_WxR.astype(compute), relative_N,
                                            where=in_cluster_N, implementation="accelerator")
