r"""Adaptive softmax (Grave et al., ICML 2017), with PyTorch's ``AdaptiveLogSoftmaxWithLoss``
semantics: a frequent-word shortlist in the head, rarer words in clusters scored through
smaller projections.

Ids are ranks in decreasing frequency (or are mapped to ranks with ``counts=``). With
cutoffs :math:`0 < c_0 < c_1 < \dots < c_{k-1} < V` and :math:`c_k = V`, the head scores
the :math:`c_0` shortlist words and one logit per cluster :math:`i` (ids
:math:`[c_i, c_{i+1})`); cluster :math:`i` is scored through a projection
:math:`P_i \in \mathbb{R}^{R_i \times H}`, :math:`R_i = \lfloor H / d^{\,i+1} \rfloor`
(``div_value`` :math:`d`), then its words :math:`U_i \in \mathbb{R}^{W_i \times R_i}`:

.. math::
  \log p(y \mid h) = \begin{cases}
    \log \mathrm{softmax}(A h + a)_y & y < c_0 \\
    \log \mathrm{softmax}(A h + a)_{c_0 + i} + \log \mathrm{softmax}(U_i P_i h)_{y - c_i}
      & c_i \le y < c_{i+1}
  \end{cases}

References:
  Grave, Joulin, Cissé, Grangier and Jégou, "Efficient softmax approximation for GPUs",
  ICML 2017, Section 4. PyTorch ``torch.nn.AdaptiveLogSoftmaxWithLoss``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import frequency_rank_tables
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.base import with_target_contract
from lm_jax.ops import fused
from lm_jax.ops import losses
from lm_jax.ops import platform


def check_cutoffs(vocab_size: int, cutoffs: Sequence[int]) -> list[int]:
  """PyTorch's rule: unique, increasing ints, each in ``[1, V - 1]``; the checked list."""
  cutoffs = list(cutoffs)
  if (not cutoffs or any(int(c) != c for c in cutoffs) or cutoffs != sorted(set(cutoffs))
      or cutoffs[0] <= 0 or cutoffs[-1] > vocab_size - 1):
    raise ValueError(f"cutoffs {cutoffs} must be a non-empty increasing sequence of unique "
                     f"ints, each between 1 and vocab_size - 1 = {vocab_size - 1} (PyTorch's rule)")
  return [int(c) for c in cutoffs]


def default_cutoffs(counts: Any, *, head_mass: float = 0.8, growth: int = 4) -> list[int]:
  """Cutoffs from training counts: the shortlist is the fewest most frequent words that
  cover ``head_mass`` of the tokens; each further cluster is ``growth`` times larger.

  The list can have more clusters than a small ``H`` can project to (``H // d**(i+1)``
  reaches 0); ``make_head("adaptive")`` therefore builds its default-cutoff head with
  ``min_projection``, which keeps at ``init`` only the clusters a given ``H`` can serve."""
  counts_V = np.sort(np.asarray(counts, np.float64))[::-1]
  vocab_size = counts_V.size
  if vocab_size < 3:
    raise ValueError(f"the adaptive softmax needs V >= 3 (a shortlist and a cluster), got {vocab_size}")
  cover = np.cumsum(counts_V) / max(counts_V.sum(), 1.0)
  first = int(np.searchsorted(cover, head_mass) + 1)
  cutoffs = [min(max(first, 1), vocab_size - 2)]
  while cutoffs[-1] * growth < vocab_size - 1:
    cutoffs.append(cutoffs[-1] * growth)
  return cutoffs


def clusters_for_width(hidden_size: int, num_clusters: int, div_value: float,
                       min_projection: int) -> int:
  """How many of ``num_clusters`` leading clusters keep a projection of at least
  ``min_projection`` rows at hidden size ``H`` (at least 1: the first cluster).

  >>> clusters_for_width(256, 5, 4.0, 8), clusters_for_width(16, 5, 4.0, 8)
  (2, 1)
  """
  sizes = _projection_rows(hidden_size, num_clusters, div_value)
  return max(1, sum(1 for size in sizes if size >= min_projection))


def _projection_rows(hidden_size: int, num_clusters: int, div_value: float) -> list[int]:
  return [int(hidden_size // (div_value ** (i + 1))) for i in range(num_clusters)]


def projection_sizes(hidden_size: int, num_clusters: int, div_value: float) -> list[int]:
  """``R_i = int(H // div_value ** (i + 1))``, as PyTorch computes them."""
  sizes = _projection_rows(hidden_size, num_clusters, div_value)
  if min(sizes) < 1:
    raise ValueError(f"hidden size {hidden_size} with div_value={div_value} gives projection "
                     f"sizes {sizes}; every cluster needs at least 1 (fewer cutoffs or a "
                     "smaller div_value)")
  return sizes


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  r"""lm_jax params from a PyTorch ``AdaptiveLogSoftmaxWithLoss.state_dict()``.

  ========================  =========================  ================
  PyTorch key               lm_jax leaf                shape
  ========================  =========================  ================
  ``head.weight``           ``head_weight_SxH``        ``[c_0 + k, H]``
  ``head.bias``             ``head_bias_S``            ``[c_0 + k]`` (``head_bias=True``)
  ``tail.{i}.0.weight``     ``tail[i]["proj_RxH"]``    ``[R_i, H]``
  ``tail.{i}.1.weight``     ``tail[i]["weight_WxR"]``  ``[W_i, R_i]``
  ========================  =========================  ================

  Values may be NumPy arrays or tensors (anything ``np.asarray`` reads, after
  ``.detach().cpu()`` for tensors). The head built with the same ``vocab_size``,
  ``cutoffs``, ``div_value`` and ``head_bias`` (and no ``counts``) then gives PyTorch's
  log-probabilities.
  """
  def array(x):
    if hasattr(x, "detach"):
      x = x.detach().cpu().numpy()
    return jnp.asarray(np.asarray(x))

  num_clusters = len({k.split(".")[1] for k in state_dict if k.startswith("tail.")})
  params = {"head_weight_SxH": array(state_dict["head.weight"]),
            "tail": [{"proj_RxH": array(state_dict[f"tail.{i}.0.weight"]),
                      "weight_WxR": array(state_dict[f"tail.{i}.1.weight"])}
                     for i in range(num_clusters)]}
  if "head.bias" in state_dict:
    params["head_bias_S"] = array(state_dict["head.bias"])
  return params


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
  z_NxR = jnp.matmul(hidden_NxH, proj_RxH.T, preferred_element_type=compute)
  return fused.linear_softmax_cross_entropy(z_NxR, weight_WxR.astype(compute), relative_N,
                                            where=in_cluster_N, implementation="accelerator")


BACKWARDS = ("scan", "autodiff")


def adaptive_softmax(vocab_size: int, cutoffs: Sequence[int], *, div_value: float = 4.0,
                     head_bias: bool = False, counts: Optional[Any] = None,
                     tokens_per_item: int = 32, init_scale: Optional[float] = None,
                     backward: str = "scan", min_projection: Optional[int] = None,
                     dtype=jnp.float32, implementation: str = "auto") -> OutputHead:
  r"""The adaptive softmax over ``V`` words (module docstring), as an ``OutputHead``.

  Params ``{"head_weight_SxH", ["head_bias_S"], "tail": [{"proj_RxH", "weight_WxR"}, ...]}``
  (``S = c_0 + k``; :func:`params_from_torch` maps PyTorch's). ``loss`` (exact, equal to
  ``-log_prob``; ignores ``key``) scores the head for every token and each cluster only for
  the tokens whose target is in it (:func:`_cluster_nll`): per token
  :math:`O(H S)` plus :math:`O(R_i (H + W_i))` for its own cluster. ``log_probs`` builds
  every cluster for every token; ``sample`` at temperature 1 draws from the head, then from
  the drawn cluster.

  Args:
    vocab_size: ``V``.
    cutoffs: ``[c_0, ..., c_{k-1}]``, increasing, ``0 < c_i < V - 1`` (PyTorch's rule).
    div_value: ``d``; cluster ``i``'s projection has ``H // d**(i+1)`` rows.
    head_bias: whether the head has a bias (PyTorch's ``head_bias``).
    counts: optional ``[V]`` training counts. Without them ids are taken to be frequency
      ranks (PyTorch's convention); with them the head maps each id to its rank first (a
      table), so that any vocabulary order works.
    tokens_per_item: ``K``, tokens a cluster scores at a time.
    init_scale: params uniform in ``[-init_scale, init_scale]``; None: PyTorch's
      ``nn.Linear`` default, uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`.
    backward: ``"scan"`` (default): the clusters' loss has a hand-written backward
      (:func:`_cluster_nll`), reverse mode only (``jax.grad``, ``jax.vjp``; ``jax.jvp``
      raises); ``"autodiff"``: JAX differentiates the same forward, so forward mode works
      too (about 3x slower backward at V = 100k, N = 2048). Used by the CPU form only.
    min_projection: None (default): every cutoff is a cluster, and ``init`` raises if a
      projection would have no rows (PyTorch's rule). An int: ``init(key, H)`` keeps only
      the leading clusters whose projection keeps at least this many rows (at least one
      cluster, :func:`clusters_for_width`); the last kept cluster takes the rest of the
      vocabulary. The functions read the number of clusters from ``params["tail"]``.
    dtype: parameter dtype.
    implementation: ``"auto"`` (default): on a CPU the item scans ``backward`` names, on
      GPU and TPU :func:`_cluster_nll_dense` (masked dense math over vocabulary blocks; the
      item scans' trip counts grow with ``N``), chosen when the program is lowered
      (:func:`lm_jax.ops.platform.per_platform`); ``"cpu"`` or ``"accelerator"`` forces one.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead`.

  >>> head = adaptive_softmax(4, [2], div_value=1.0)  # shortlist {0, 1}, one cluster {2, 3}
  >>> params = {"head_weight_SxH": jnp.zeros((3, 1)),
  ...           "tail": [{"proj_RxH": jnp.ones((1, 1)), "weight_WxR": jnp.zeros((2, 1))}]}
  >>> print(np.round(np.exp(head.log_probs(params, jnp.array([[1.0]]))), 4))
  [[0.3333 0.3333 0.1667 0.1667]]
  """
  cutoffs = check_cutoffs(vocab_size, cutoffs)
  shortlist = cutoffs[0]

  def layout(num_clusters):
    """``(bounds, width_C)`` of the first ``num_clusters`` clusters, the last one running
    to ``V``."""
    bounds = cutoffs[:num_clusters] + [vocab_size]
    return bounds, [bounds[i + 1] - bounds[i] for i in range(num_clusters)]
  if tokens_per_item < 1:
    raise ValueError(f"tokens_per_item must be >= 1, got {tokens_per_item}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward={backward!r} is not one of {BACKWARDS}")
  platform.check_implementation(implementation)
  scanned_nll = functools.partial(
      _cluster_nll if backward == "scan" else _cluster_nll_autodiff,
      tokens_per_item=tokens_per_item)

  def cluster_nll(*args):
    return platform.per_platform(scanned_nll, _cluster_nll_dense, *args,
                                 implementation=implementation)
  tables = {}
  if counts is not None:
    counts_V = np.asarray(counts)
    if counts_V.shape != (vocab_size,):
      raise ValueError(f"counts has shape {counts_V.shape}, expected [V] = ({vocab_size},)")
    tables = frequency_rank_tables(counts_V)

  def init(key, hidden_size):
    num_clusters = len(cutoffs)
    if min_projection is not None:
      num_clusters = clusters_for_width(hidden_size, num_clusters, div_value, min_projection)
    sizes = projection_sizes(hidden_size, num_clusters, div_value)
    _, width_C = layout(num_clusters)
    keys = iter(jax.random.split(key, 2 + 2 * num_clusters))

    def uniform(shape, fan_in):
      bound = init_scale if init_scale is not None else 1.0 / math.sqrt(fan_in)
      return jax.random.uniform(next(keys), shape, dtype, -bound, bound)

    params = {"head_weight_SxH": uniform((shortlist + num_clusters, hidden_size), hidden_size),
              "tail": [{"proj_RxH": uniform((r, hidden_size), hidden_size),
                        "weight_WxR": uniform((w, r), r)} for r, w in zip(sizes, width_C)]}
    if head_bias:
      params["head_bias_S"] = uniform((shortlist + num_clusters,), hidden_size)
    return params

  def _compute(hidden_NxH, params):
    return jnp.result_type(jnp.float32, hidden_NxH, params["head_weight_SxH"])

  def head_logits(params, hidden_NxH, compute):
    logits_NxS = jnp.matmul(hidden_NxH.astype(compute),
                            params["head_weight_SxH"].astype(compute).T)
    if "head_bias_S" in params:
      logits_NxS = logits_NxS + params["head_bias_S"].astype(compute)
    return logits_NxS

  def head_log_softmax(params, hidden_NxH, compute):
    return jax.nn.log_softmax(head_logits(params, hidden_NxH, compute), axis=-1)

  def ranks(targets_N, tables):
    return tables["rank_of_id_V"][targets_N] if "rank_of_id_V" in tables else targets_N

  def loss(params, hidden_NxH, targets_N, *, key=None, where=None, tables):
    del key
    hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
    compute = _compute(hidden_NxH, params)
    hidden_NxH = hidden_NxH.astype(compute)
    rank_N = ranks(targets_N, tables)
    bounds, width_C = layout(len(params["tail"]))
    cluster_N = jnp.sum(rank_N[:, None] >= jnp.asarray(bounds[:-1])[None, :], axis=1)  # 0: head
    head_index_N = jnp.where(cluster_N == 0, rank_N, shortlist + cluster_N - 1)
    # lm_jax's CE kernel: its backward keeps only the [N] log-normalisers besides the logits.
    loss_N = losses.softmax_cross_entropy_with_integer_labels(
        head_logits(params, hidden_NxH, compute), head_index_N)
    for i, tail in enumerate(params["tail"]):
      in_cluster_N = cluster_N == i + 1
      if where is not None:
        in_cluster_N = in_cluster_N & jnp.asarray(where, bool)
      relative_N = jnp.clip(rank_N - bounds[i], 0, width_C[i] - 1)
      loss_N = loss_N + cluster_nll(tail["proj_RxH"], tail["weight_WxR"], hidden_NxH,
                                     relative_N, in_cluster_N).astype(compute)
    return loss_N if where is None else jnp.where(where, loss_N, 0.0)

  def log_prob(params, hidden_NxH, targets_N, *, tables):
    return -loss(params, hidden_NxH, targets_N, tables=tables)

  def cluster_log_softmax(tail, hidden_NxH, compute):
    logits_NxW = ((hidden_NxH @ tail["proj_RxH"].astype(compute).T)
                  @ tail["weight_WxR"].astype(compute).T)
    return jax.nn.log_softmax(logits_NxW, axis=-1)

  def log_probs(params, hidden_NxH, *, tables):
    hidden_NxH, _ = _check_hidden(hidden_NxH)
    compute = _compute(hidden_NxH, params)
    hidden_NxH = hidden_NxH.astype(compute)
    head_logp_NxS = head_log_softmax(params, hidden_NxH, compute)
    parts = [head_logp_NxS[:, :shortlist]]
    for i, tail in enumerate(params["tail"]):
      parts.append(cluster_log_softmax(tail, hidden_NxH, compute)
                   + head_logp_NxS[:, shortlist + i:shortlist + i + 1])
    logp_NxV = jnp.concatenate(parts, axis=-1)  # columns in rank order
    return logp_NxV[:, tables["rank_of_id_V"]] if "rank_of_id_V" in tables else logp_NxV

  def walk(params, hidden_NxH, key, tables):
    compute = _compute(hidden_NxH, params)
    hidden_NxH = hidden_NxH.astype(compute)
    bounds, _ = layout(len(params["tail"]))
    key_head, *key_tail = jax.random.split(key, 1 + len(params["tail"]))
    choice_N = jax.random.categorical(key_head, head_log_softmax(params, hidden_NxH, compute))
    rank_N = choice_N
    for i, tail in enumerate(params["tail"]):
      word_N = jax.random.categorical(key_tail[i], cluster_log_softmax(tail, hidden_NxH, compute))
      rank_N = jnp.where(choice_N == shortlist + i, bounds[i] + word_N, rank_N)
    rank_N = rank_N.astype(jnp.int32)
    return tables["id_of_rank_V"][rank_N] if "id_of_rank_V" in tables else rank_N

  return with_target_contract(
      OutputHead(init, loss, log_prob, log_probs, sample_by_walk(walk, log_probs), None, tables),
      vocab_size)
