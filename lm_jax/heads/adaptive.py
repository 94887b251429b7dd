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
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import frequency_rank_tables
from lm_jax.heads.base import log_prob_from_loss
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.base import with_target_contract
from lm_jax.heads.adaptive_clusters import _cluster_nll
from lm_jax.heads.adaptive_clusters import _cluster_nll_autodiff
from lm_jax.heads.adaptive_clusters import _cluster_nll_dense
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


class _Layout(NamedTuple):
  """The head's static shape: ``V``, the cutoffs, and how ``init`` sizes the params."""
  vocab_size: int
  cutoffs: tuple
  div_value: float
  head_bias: bool
  min_projection: Optional[int]

  def clusters(self, num_clusters):
    """``(bounds, width_C)`` of the first ``num_clusters`` clusters, the last one running
    to ``V``."""
    bounds = list(self.cutoffs[:num_clusters]) + [self.vocab_size]
    return bounds, [bounds[i + 1] - bounds[i] for i in range(num_clusters)]


def _init(layout, init_scale, dtype, key, hidden_size):
  num_clusters, shortlist = len(layout.cutoffs), layout.cutoffs[0]
  if layout.min_projection is not None:
    num_clusters = clusters_for_width(hidden_size, num_clusters, layout.div_value,
                                      layout.min_projection)
  sizes = projection_sizes(hidden_size, num_clusters, layout.div_value)
  _, width_C = layout.clusters(num_clusters)
  keys = iter(jax.random.split(key, 2 + 2 * num_clusters))

  def uniform(shape, fan_in):
    bound = init_scale if init_scale is not None else 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(next(keys), shape, dtype, -bound, bound)

  params = {"head_weight_SxH": uniform((shortlist + num_clusters, hidden_size), hidden_size),
            "tail": [{"proj_RxH": uniform((r, hidden_size), hidden_size),
                      "weight_WxR": uniform((w, r), r)} for r, w in zip(sizes, width_C)]}
  if layout.head_bias:
    params["head_bias_S"] = uniform((shortlist + num_clusters,), hidden_size)
  return params


def _compute(hidden_NxH, params):
  return jnp.result_type(jnp.float32, hidden_NxH, params["head_weight_SxH"])


def _head_logits(params, hidden_NxH, compute):
  logits_NxS = jnp.matmul(hidden_NxH.astype(compute), params["head_weight_SxH"].astype(compute).T)
  if "head_bias_S" in params:
    logits_NxS = logits_NxS + params["head_bias_S"].astype(compute)
  return logits_NxS


def _head_log_softmax(params, hidden_NxH, compute):
  return jax.nn.log_softmax(_head_logits(params, hidden_NxH, compute), axis=-1)


def _cluster_log_softmax(tail, hidden_NxH, compute):
  logits_NxW = ((hidden_NxH @ tail["proj_RxH"].astype(compute).T)
                @ tail["weight_WxR"].astype(compute).T)
  return jax.nn.log_softmax(logits_NxW, axis=-1)


def _cluster_loss(backward, tokens_per_item, implementation, *args):
  """One cluster's :func:`_cluster_nll`: the item scan ``backward`` names on a CPU, the masked
  dense form (:func:`_cluster_nll_dense`) on GPU and TPU."""
  scanned = functools.partial(_cluster_nll if backward == "scan" else _cluster_nll_autodiff,
                              tokens_per_item=tokens_per_item)
  return platform.per_platform(scanned, _cluster_nll_dense, *args, implementation=implementation)


def _loss(layout, cluster_loss, params, hidden_NxH, targets_N, *, key=None, where=None, tables):
  del key
  hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
  compute = _compute(hidden_NxH, params)
  hidden_NxH = hidden_NxH.astype(compute)
  rank_N = tables["rank_of_id_V"][targets_N] if "rank_of_id_V" in tables else targets_N
  bounds, width_C = layout.clusters(len(params["tail"]))
  shortlist = layout.cutoffs[0]
  cluster_N = jnp.sum(rank_N[:, None] >= jnp.asarray(bounds[:-1])[None, :], axis=1)  # 0: head
  head_index_N = jnp.where(cluster_N == 0, rank_N, shortlist + cluster_N - 1)
  # lm_jax's CE kernel: its backward keeps only the [N] log-normalisers besides the logits.
  loss_N = losses.softmax_cross_entropy_with_integer_labels(
      _head_logits(params, hidden_NxH, compute), head_index_N)
  for i, tail in enumerate(params["tail"]):
    in_cluster_N = cluster_N == i + 1
    if where is not None:
      in_cluster_N = in_cluster_N & jnp.asarray(where, bool)
    relative_N = jnp.clip(rank_N - bounds[i], 0, width_C[i] - 1)
    loss_N = loss_N + cluster_loss(tail["proj_RxH"], tail["weight_WxR"], hidden_NxH, relative_N,
                                   in_cluster_N).astype(compute)
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _log_probs(layout, params, hidden_NxH, *, tables):
  hidden_NxH, _ = _check_hidden(hidden_NxH)
  compute = _compute(hidden_NxH, params)
  hidden_NxH = hidden_NxH.astype(compute)
  shortlist = layout.cutoffs[0]
  head_logp_NxS = _head_log_softmax(params, hidden_NxH, compute)
  parts = [head_logp_NxS[:, :shortlist]]
  for i, tail in enumerate(params["tail"]):
    parts.append(_cluster_log_softmax(tail, hidden_NxH, compute)
                 + head_logp_NxS[:, shortlist + i:shortlist + i + 1])
  logp_NxV = jnp.concatenate(parts, axis=-1)  # columns in rank order
  return logp_NxV[:, tables["rank_of_id_V"]] if "rank_of_id_V" in tables else logp_NxV


def _walk(layout, params, hidden_NxH, key, tables):
  compute = _compute(hidden_NxH, params)
  hidden_NxH = hidden_NxH.astype(compute)
  bounds, _ = layout.clusters(len(params["tail"]))
  key_head, *key_tail = jax.random.split(key, 1 + len(params["tail"]))
  choice_N = jax.random.categorical(key_head, _head_log_softmax(params, hidden_NxH, compute))
  rank_N = choice_N
  for i, tail in enumerate(params["tail"]):
    word_N = jax.random.categorical(key_tail[i], _cluster_log_softmax(tail, hidden_NxH, compute))
    rank_N = jnp.where(choice_N == layout.cutoffs[0] + i, bounds[i] + word_N, rank_N)
  rank_N = rank_N.astype(jnp.int32)
  return tables["id_of_rank_V"][rank_N] if "id_of_rank_V" in tables else rank_N


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
  if tokens_per_item < 1:
    raise ValueError(f"tokens_per_item must be >= 1, got {tokens_per_item}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward={backward!r} is not one of {BACKWARDS}")
  platform.check_implementation(implementation)
  tables = {}
  if counts is not None:
    counts_V = np.asarray(counts)
    if counts_V.shape != (vocab_size,):
      raise ValueError(f"counts has shape {counts_V.shape}, expected [V] = ({vocab_size},)")
    tables = frequency_rank_tables(counts_V)
  layout = _Layout(vocab_size, tuple(cutoffs), div_value, head_bias, min_projection)
  partial = functools.partial
  loss = partial(_loss, layout,
                 partial(_cluster_loss, backward, tokens_per_item, implementation))
  log_probs = partial(_log_probs, layout)
  return with_target_contract(
      OutputHead(partial(_init, layout, init_scale, dtype), loss, log_prob_from_loss(loss),
                 log_probs, sample_by_walk(partial(_walk, layout), log_probs), None, tables),
      vocab_size)
