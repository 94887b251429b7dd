r"""A class hierarchy: frequency classes subdivided again, with a softmax at every level.

Words are ranked by decreasing training count and the ranks split into a complete
:math:`B`-ary tree of depth :math:`L + 1` (``levels`` :math:`= L` levels of classes above
the words): the root's children are the top classes, each class's children its
sub-classes, the last classes' children the words, every node holding :math:`B`
consecutive ranks' worth of its level (the last node of a level may hold fewer). With
:math:`c_1(y), \dots, c_L(y)` the classes on the way to :math:`y`,

.. math::
  p(y \mid h) = p(c_1 \mid h)\, p(c_2 \mid c_1, h) \cdots p(y \mid c_L, h),

each factor a softmax over the :math:`\le B` children of one node (the lecture's
"hierarchical class based speedup", eq. 7.6, for :math:`L = 2`). With
:math:`B = \lceil V^{1/(L+1)} \rceil` a token costs :math:`O(H (L + 1) V^{1/(L+1)})`:
:math:`L = 1` is the class softmax over :math:`\sqrt V` equal-size frequency classes,
:math:`L = 2` costs :math:`O(H V^{1/3})` (100 rows a level at V = 1M), :math:`L = 3`
:math:`O(H V^{1/4})`. Frequency order keeps the frequent words in the first classes, as
Mikolov's frequency binning does, so most tokens walk the same few nodes.

References:
  Mikolov, Kombrink, Burget, Cernocky and Khudanpur, "Extensions of recurrent neural
  network language model", ICASSP 2011, Section 3. Goodman, "Classes for fast maximum
  entropy training", ICASSP 2001 (the two-level factorisation, and its deeper form).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import frequency_rank_tables
from lm_jax.heads.base import log_prob_from_loss
from lm_jax.heads.base import loss_from_sparse
from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.base import with_target_contract
from lm_jax.heads.class_based import check_counts
from lm_jax.ops import losses

LEVELS = (1, 2, 3)


def hierarchy_branching(vocab_size: int, levels: int) -> int:
  r"""The smallest :math:`B \ge 2` with :math:`B^{L+1} \ge V`: :math:`\lceil V^{1/(L+1)} \rceil`
  computed in integers.

  >>> hierarchy_branching(10_000, 1), hierarchy_branching(1_000_000, 2), hierarchy_branching(33_280, 2)
  (100, 100, 33)
  """
  if levels < 1:
    raise ValueError(f"levels must be >= 1 (1: the class softmax), got {levels}")
  if vocab_size < 2:
    raise ValueError(f"need a vocabulary of V >= 2 words, got V = {vocab_size}")
  branching = max(2, int(round(vocab_size ** (1.0 / (levels + 1)))) - 1)
  while branching ** (levels + 1) < vocab_size:
    branching += 1
  return branching


def level_sizes(vocab_size: int, levels: int, branching: int) -> list[int]:
  r"""``Q_d``, the nodes at depth ``d + 1`` (rows of level ``d``'s weights), ``d = 0..L``:
  :math:`\lceil V / B^{L - d} \rceil`, so the last level has ``V`` rows, one per word.

  >>> level_sizes(10, 2, 3)
  [2, 4, 10]
  """
  return [-(-vocab_size // branching ** (levels - d)) for d in range(levels + 1)]


class _Tree(NamedTuple):
  """The hierarchy's static shape: ``V``, ``B``, nodes per level ``Q_d`` and each level's
  span (rank ``r``'s node at depth ``d + 1`` is ``r // span[d]``; the last span is 1)."""
  vocab_size: int
  branching: int
  sizes: tuple
  spans: tuple


def _init(tree, init_scale, dtype, key, hidden_size):
  keys = jax.random.split(key, 2 * len(tree.sizes))
  uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -init_scale, init_scale)
  return {"levels": [{"weight_QxH": uniform(keys[2 * d], (q, hidden_size)),
                      "bias_Q": uniform(keys[2 * d + 1], (q,))}
                     for d, q in enumerate(tree.sizes)]}


def _compute_dtype(hidden_NxH, params):
  return jnp.result_type(jnp.float32, hidden_NxH, params["levels"][0]["weight_QxH"])


def _children(tree, parent_N, d):
  """Rows ``[N, B]`` of level ``d`` holding the children of nodes ``parent_N`` (clipped to
  the level) and which of them exist (the last node of a level may have fewer)."""
  rows_NxB = parent_N[:, None] * tree.branching + jnp.arange(tree.branching)
  return jnp.minimum(rows_NxB, tree.sizes[d] - 1), rows_NxB < tree.sizes[d]


def _sibling_logits(weight_NxBxH, bias_NxB, valid_NxB, hidden_NxH, compute):
  """Logits ``[N, B]`` of gathered sibling rows, ``-inf`` where a child does not exist."""
  logits_NxB = (jnp.einsum("nbh,nh->nb", weight_NxBxH.astype(compute), hidden_NxH)
                + bias_NxB.astype(compute))
  return jnp.where(valid_NxB, logits_NxB, -jnp.inf)


def _root_logits(level, hidden_NxH, compute):
  return (jnp.matmul(hidden_NxH, level["weight_QxH"].astype(compute).T)
          + level["bias_Q"].astype(compute))


def _gather(tree, params, targets_N, key=None, *, tables):
  """Level 0 whole; at each deeper level the ``B`` sibling rows of each token's node."""
  del key
  rank_N = tables["rank_of_id_V"][jnp.asarray(targets_N)]
  rows = {"levels": [params["levels"][0]]}
  index = {"levels": [{"weight_QxH": None, "bias_Q": None}]}
  columns, valid = [rank_N // tree.spans[0]], [None]
  for d in range(1, len(tree.sizes)):
    node_N = rank_N // tree.spans[d]
    rows_NxB, valid_NxB = _children(tree, node_N // tree.branching, d)
    valid.append(valid_NxB)
    rows_NB = rows_NxB.reshape(-1)
    level = params["levels"][d]
    rows["levels"].append({"weight_QxH": level["weight_QxH"][rows_NB],
                           "bias_Q": level["bias_Q"][rows_NB]})
    index["levels"].append({"weight_QxH": rows_NB, "bias_Q": rows_NB})
    columns.append(node_N % tree.branching)
  return rows, index, (columns, valid)


def _sparse_loss(tree, rows, hidden_NxH, aux, *, where=None):
  columns, valid = aux
  compute = _compute_dtype(hidden_NxH, rows)
  hidden_NxH = jnp.asarray(hidden_NxH).astype(compute)
  loss_N = jnp.zeros(hidden_NxH.shape[:1], compute)
  for d, level in enumerate(rows["levels"]):
    if d == 0:
      logits_NxB = _root_logits(level, hidden_NxH, compute)
    else:
      logits_NxB = _sibling_logits(
          level["weight_QxH"].reshape(-1, tree.branching, hidden_NxH.shape[1]),
          level["bias_Q"].reshape(-1, tree.branching), valid[d], hidden_NxH, compute)
    loss_N = loss_N + losses.softmax_cross_entropy_with_integer_labels(logits_NxB, columns[d])
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _log_probs(tree, params, hidden_NxH, *, tables):
  hidden_NxH, _ = _check_hidden(hidden_NxH)
  compute = _compute_dtype(hidden_NxH, params)
  hidden_NxH = hidden_NxH.astype(compute)
  num_tokens, branching = hidden_NxH.shape[0], tree.branching
  logp_NxV = jnp.zeros((num_tokens, tree.vocab_size), compute)
  for d, level in enumerate(params["levels"]):
    logits_NxQ = _root_logits(level, hidden_NxH, compute)
    parents = -(-tree.sizes[d] // branching)  # nodes at depth d (1: the root)
    pad = parents * branching - tree.sizes[d]
    logits_NxPxB = jnp.pad(logits_NxQ, ((0, 0), (0, pad)), constant_values=-jnp.inf
                           ).reshape(num_tokens, parents, branching)
    logp_NxQ = jax.nn.log_softmax(logits_NxPxB, axis=-1).reshape(num_tokens, parents * branching)
    # Node q covers ranks [q span, (q + 1) span): repeat each column span times (a
    # broadcast, not a V-sized index constant), then cut to V.
    logp_NxV = logp_NxV + jnp.broadcast_to(
        logp_NxQ[:, :, None], (num_tokens, logp_NxQ.shape[1], tree.spans[d])
    ).reshape(num_tokens, parents * branching * tree.spans[d])[:, :tree.vocab_size]
  return logp_NxV[:, tables["rank_of_id_V"]]


def _walk(tree, params, hidden_NxH, key, tables):
  compute = _compute_dtype(hidden_NxH, params)
  hidden_NxH = hidden_NxH.astype(compute)
  keys = jax.random.split(key, len(tree.sizes))
  node_N = jnp.zeros(hidden_NxH.shape[0], jnp.int32)
  for d, level in enumerate(params["levels"]):
    if d == 0:
      logits_NxB = _root_logits(level, hidden_NxH, compute)
    else:
      rows_NxB, valid_NxB = _children(tree, node_N, d)
      logits_NxB = _sibling_logits(level["weight_QxH"][rows_NxB], level["bias_Q"][rows_NxB],
                                   valid_NxB, hidden_NxH, compute)
    node_N = (node_N * tree.branching
              + jax.random.categorical(keys[d], logits_NxB).astype(jnp.int32))
  return tables["id_of_rank_V"][node_N]


def class_hierarchy_softmax(counts: Any, levels: int = 2, *, branching: Optional[int] = None,
                            init_scale: float = 0.1, dtype=jnp.float32) -> OutputHead:
  r"""The class-hierarchy head (module docstring) over ``V = len(counts)`` words.

  Params ``{"levels": [{"weight_QxH", "bias_Q"}, ...]}``, one entry per level ``d = 0..L``:
  ``Q_d`` rows (:func:`level_sizes`), row ``q`` of level ``d`` scoring node ``q`` at depth
  ``d + 1`` against its siblings, the children ``[p B, p B + B)`` of node ``p`` at depth
  ``d``; the last level's row ``r`` is the word of frequency rank ``r``. Uniform in
  ``[-init_scale, init_scale]``.

  ``loss`` (exact, equal to ``-log_prob``; ignores ``key``) walks each token's path: level 0
  is one ``[N, Q_0]`` matmul, each deeper level gathers the ``B`` sibling rows of the
  token's node (``[N, B, H]``) and takes their softmax: :math:`O(H B)` per token per level.
  ``sparse`` is that gather (so :func:`~lm_jax.heads.base.sparse_sgd_step` updates only the
  rows a step reads), and ``loss`` is its loss on the gathered rows.
  ``log_probs`` scores every node of every level (:math:`O(H V)`) and adds the levels'
  log-softmaxes along each word's path. ``sample`` at temperature 1 walks down from the
  root, one categorical draw per level.

  Args:
    counts: ``[V]`` training counts of each id (ranks: decreasing count, ties by id).
    levels: ``L``, class levels above the words: 1 (the class softmax), 2 or 3.
    branching: ``B``; default :func:`hierarchy_branching` (the smallest with
      :math:`B^{L+1} \ge V`).
    init_scale: half-width of the uniform initialisation.
    dtype: parameter dtype.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead`.

  >>> head = class_hierarchy_softmax([4, 3, 2, 1], levels=1)  # classes {0, 1} and {2, 3}
  >>> params = head.init(jax.random.key(0), 3)
  >>> p = np.exp(np.asarray(head.log_probs(params, jnp.ones((1, 3)))))
  >>> [len(level["bias_Q"]) for level in params["levels"]], round(float(p.sum()), 5)
  ([2, 4], 1.0)
  """
  counts = check_counts(counts)
  vocab_size = counts.shape[0]
  if levels not in LEVELS:
    raise ValueError(f"levels must be one of {LEVELS}, got {levels}")
  if branching is None:
    branching = hierarchy_branching(vocab_size, levels)
  if branching < 2 or branching ** (levels + 1) < vocab_size:
    raise ValueError(f"branching={branching} must be >= 2 with branching**(levels + 1) >= "
                     f"V = {vocab_size} (levels={levels})")
  tree = _Tree(vocab_size, branching, tuple(level_sizes(vocab_size, levels, branching)),
               tuple(branching ** (levels - d) for d in range(levels + 1)))
  partial = functools.partial
  sparse = RowSparse(partial(_gather, tree), partial(_sparse_loss, tree))
  loss = loss_from_sparse(sparse)
  log_probs = partial(_log_probs, tree)
  return with_target_contract(
      OutputHead(partial(_init, tree, init_scale, dtype), loss, log_prob_from_loss(loss),
                 log_probs, sample_by_walk(partial(_walk, tree), log_probs), sparse,
                 frequency_rank_tables(counts)),
      vocab_size)
