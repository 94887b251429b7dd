r"""Class-based softmax: a softmax over frequency classes times a softmax inside the class.

Words are binned by frequency into :math:`C` classes (Mikolov et al. 2011) and

.. math::
  p(y \mid h) = p(c(y) \mid h)\; p(y \mid c(y), h),

each factor an ordinary softmax, the second over the members of :math:`c(y)` only. The
word rows are stored class-major, so a class is a window of ``M`` consecutive rows (``M`` the
largest class size); training groups the tokens by class (:func:`class_work_list`) so that
``K`` tokens share each gathered window, and costs :math:`O(H (C + M))` per token instead of
:math:`O(H V)`; with :math:`C = \sqrt V` classes of similar size that is :math:`O(H \sqrt V)`.

References:
  Mikolov, Kombrink, Burget, Cernocky and Khudanpur, "Extensions of recurrent neural
  network language model", ICASSP 2011, Section 3 (frequency binning).
  Goodman, "Classes for fast maximum entropy training", ICASSP 2001.
"""
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import log_prob_from_loss
from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.base import with_target_contract
from lm_jax.ops import platform
from lm_jax.ops import predicates

BINNINGS = ("mass", "sqrt", "equal")
BACKWARDS = ("scan", "autodiff")


def check_counts(counts) -> np.ndarray:
  """``counts`` as a 1-D float64 NumPy array; raises ``ValueError`` naming the problem."""
  counts = np.asarray(counts)
  if counts.ndim != 1:
    raise ValueError(f"counts must be 1-D [V], got shape {counts.shape}")
  if counts.shape[0] < 2:
    raise ValueError(f"need a vocabulary of V >= 2 words, got V = {counts.shape[0]}")
  if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
    raise ValueError(f"counts must be numbers, got dtype {counts.dtype}")
  if not np.all(np.isfinite(counts)) or np.any(counts < 0):
    bad = counts[~(np.isfinite(counts) & (counts >= 0))][0]
    raise ValueError(f"counts must be finite and >= 0, got {bad}")
  return counts.astype(np.float64)


def word_classes(counts, num_classes: Optional[int] = None, *, binning: str = "mass"):
  r"""Frequency binning of the vocabulary into classes of equal shares of (sqrt-)unigram mass.

  Words are sorted by decreasing count (stable: ties by id); word :math:`i` in that order,
  whose preceding words hold the share :math:`s_i = \sum_{j<i} m_j / \sum_j m_j` of the
  mass, goes to class :math:`\lfloor C s_i \rfloor`, with :math:`m_j` the count
  (``binning="mass"``, Mikolov et al. 2011), its square root (``binning="sqrt"``, which
  gives the rare words more, smaller classes) or 1 (``binning="equal"``: :math:`V/C` words
  a class, the largest class smallest). A word heavier than one share would leave
  classes empty; the assignment is then moved the least needed so that every class is
  non-empty. Zero-count words go to the last classes.

  Args:
    counts: ``[V]`` training counts (>= 0), ``V >= 2``.
    num_classes: ``C`` in ``[1, V]``; default :math:`\lceil \sqrt V \rceil`.
    binning: ``"mass"``, ``"sqrt"`` or ``"equal"``.

  Returns:
    ``(class_of_V, position_in_class_V, members_CxM, member_mask_CxM)``: int32 ``[V]``
    class of each id, int32 ``[V]`` its column in ``members_CxM``, int32 ``[C, M]`` the
    ids of each class (padding repeats the class's first id), bool ``[C, M]`` which
    entries are real.

  >>> class_of_V, position_V, members_CxM, mask_CxM = word_classes([1, 6, 1, 2], 2)
  >>> class_of_V.tolist(), position_V.tolist()
  ([1, 0, 1, 1], [1, 0, 2, 0])
  >>> members_CxM.tolist(), mask_CxM.tolist()
  ([[1, 1, 1], [3, 0, 2]], [[True, False, False], [True, True, True]])
  """
  counts = check_counts(counts)
  vocab_size = counts.shape[0]
  if num_classes is None:
    num_classes = math.ceil(math.sqrt(vocab_size))
  if not 1 <= num_classes <= vocab_size:
    raise ValueError(f"num_classes must be in [1, V = {vocab_size}], got {num_classes}")
  if binning not in BINNINGS:
    raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
  order_V = np.argsort(-counts, kind="stable")
  mass_V = {"mass": lambda c: c, "sqrt": np.sqrt, "equal": np.ones_like}[binning](
      counts[order_V].astype(np.float64))
  if mass_V.sum() <= 0:
    mass_V = np.ones_like(mass_V)
  share_before_V = (np.cumsum(mass_V) - mass_V) / mass_V.sum()
  ideal_V = np.minimum(np.floor(num_classes * share_before_V), num_classes - 1)
  # Word i (sorted) may use class i at most and must leave C - 1 - class <= V - 1 - i words.
  rank_V = np.arange(vocab_size)
  clipped_V = np.clip(ideal_V, num_classes - vocab_size + rank_V, rank_V)
  # Steps of at most one class, so no class is skipped: s_i = min_{j<=i}(c_j - j) + i.
  sorted_class_V = (np.minimum.accumulate(clipped_V - rank_V) + rank_V).astype(np.int32)
  class_of_V = np.empty(vocab_size, np.int32)
  class_of_V[order_V] = sorted_class_V
  sizes_C = np.bincount(sorted_class_V, minlength=num_classes)
  starts_C = np.cumsum(sizes_C) - sizes_C
  position_in_class_V = np.empty(vocab_size, np.int32)
  position_in_class_V[order_V] = rank_V - starts_C[sorted_class_V]
  width = int(sizes_C.max())
  column_M = np.arange(width)
  member_mask_CxM = column_M[None, :] < sizes_C[:, None]
  slot_CxM = starts_C[:, None] + np.where(member_mask_CxM, column_M[None, :], 0)
  members_CxM = order_V[slot_CxM].astype(np.int32)
  return class_of_V, position_in_class_V, members_CxM, member_mask_CxM


def class_major_rows(counts, num_classes: Optional[int] = None, *, binning: str = "equal"
                     ) -> np.ndarray:
  """Row of each word in :func:`class_softmax`'s ``word_weight_VxH``: classes contiguous, in
  class order, each in its :func:`word_classes` member order. Returns int32 ``[V]``.

  >>> class_major_rows([1, 6, 1, 2], 2, binning="mass").tolist()
  [2, 0, 3, 1]
  """
  class_of_V, position_V, _, member_mask_CxM = word_classes(counts, num_classes, binning=binning)
  size_C = member_mask_CxM.sum(axis=1)
  return (np.cumsum(size_C) - size_C)[class_of_V].astype(np.int32) + position_V


class WorkList(NamedTuple):
  """Tokens grouped by class into ``L`` items of ``K`` slots (see :func:`class_work_list`)."""
  item_class_L: jax.Array  # int32 class of each item (padding items: class C - 1).
  token_LxK: jax.Array  # int32 token held by each slot (0 where the slot is empty).
  valid_LxK: jax.Array  # bool, True where the slot holds a token.
  item_N: jax.Array  # int32 item of each token.
  slot_N: jax.Array  # int32 slot of each token in its item.


def num_work_items(num_tokens: int, num_classes: int, tokens_per_item: int) -> int:
  r"""Static item count :math:`L = \lfloor (N + (K-1) \min(C, N)) / K \rfloor`, enough for any
  targets: a class with :math:`n_c > 0` tokens needs :math:`\lceil n_c / K \rceil \le (n_c + K -
  1) / K` items and at most :math:`\min(C, N)` classes are non-empty."""
  return (num_tokens + (tokens_per_item - 1) * min(num_classes, num_tokens)) // tokens_per_item


def class_work_list(class_N: jax.typing.ArrayLike, num_classes: int,
                    tokens_per_item: int) -> WorkList:
  r"""Groups the tokens by class into items of ``K`` consecutive same-class tokens.

  Tokens are stably sorted by class; class :math:`c` with :math:`n_c` tokens gets
  :math:`\lceil n_c / K \rceil` items (none if :math:`n_c = 0`), the last one partly empty;
  the ``L`` items (:func:`num_work_items`) are ordered by class, unused ones at the end.
  Each token sits in exactly one slot, so per-slot results are read back with a gather.
  Pure JAX with static shapes; a sort and prefix sums, no loop.

  Args:
    class_N: ``[N]`` int class of each token, in ``[0, C)``.
    num_classes: ``C``.
    tokens_per_item: ``K >= 1``.

  Returns:
    A :class:`WorkList`.

  >>> work = class_work_list(jnp.array([2, 0, 2, 2, 0]), 3, 2)
  >>> work.item_class_L.tolist(), work.token_LxK.tolist()
  ([0, 2, 2, 2], [[1, 4], [0, 2], [3, 0], [0, 0]])
  >>> work.valid_LxK.astype(int).tolist()
  [[1, 1], [1, 1], [1, 0], [0, 0]]
  >>> work.item_N.tolist(), work.slot_N.tolist()
  ([1, 0, 1, 2, 0], [0, 0, 1, 0, 1])
  """
  if tokens_per_item < 1:
    raise ValueError(f"tokens_per_item must be >= 1, got {tokens_per_item}")
  class_N = jnp.asarray(class_N, jnp.int32)
  num_tokens, cap = class_N.shape[0], tokens_per_item
  order_N = jnp.argsort(class_N, stable=True)
  count_C = jnp.zeros(num_classes, jnp.int32).at[class_N].add(1)
  first_token_C = jnp.cumsum(count_C) - count_C
  items_C = (count_C + cap - 1) // cap
  item_end_C = jnp.cumsum(items_C)
  first_item_C = item_end_C - items_C
  item_L = jnp.arange(num_work_items(num_tokens, num_classes, cap), dtype=jnp.int32)
  item_class_L = jnp.minimum(jnp.searchsorted(item_end_C, item_L, side="right", method="compare_all"),
                             num_classes - 1).astype(jnp.int32)
  # Rank within the class of each slot's token; past the class's count (or for padding items,
  # which sit past the last class's items) the slot is empty.
  rank_LxK = ((item_L - first_item_C[item_class_L]) * cap)[:, None] + jnp.arange(cap)
  valid_LxK = rank_LxK < count_C[item_class_L][:, None]
  sorted_LxK = jnp.minimum(first_token_C[item_class_L][:, None] + rank_LxK, num_tokens - 1)
  token_LxK = jnp.where(valid_LxK, order_N[sorted_LxK], 0).astype(jnp.int32)
  sorted_class_N = class_N[order_N]
  rank_sorted_N = jnp.arange(num_tokens) - first_token_C[sorted_class_N]
  unsort = lambda x: jnp.zeros(num_tokens, jnp.int32).at[order_N].set(
      x.astype(jnp.int32), unique_indices=True)
  return WorkList(item_class_L, token_LxK, valid_LxK,
                  unsort(first_item_C[sorted_class_N] + rank_sorted_N // cap),
                  unsort(rank_sorted_N % cap))


def _tokens_per_item(num_tokens, num_classes):
  """Default ``K``: the power of two nearest to the mean tokens per class, in [1, 32]."""
  mean = max(num_tokens / num_classes, 1.0)
  return int(min(32, 2 ** round(math.log2(mean))))


def _class_log_softmax_at(hidden_NxH, class_weight_CxH, class_bias_C, class_N, compute):
  logits_NxC = (jnp.matmul(hidden_NxH, class_weight_CxH.astype(compute).T)
                + class_bias_C.astype(compute))
  max_N = jax.lax.stop_gradient(jnp.max(logits_NxC, axis=-1, keepdims=True))
  shifted_NxC = logits_NxC - max_N
  return (jnp.take_along_axis(shifted_NxC, class_N[:, None], axis=-1)[:, 0]
          - jnp.log(jnp.sum(jnp.exp(shifted_NxC), axis=-1)))


def _item_logits(weight_VxH, bias_V, hidden_KxH, start, mask_M, width, compute):
  """One item's window ``[M, H]`` (sliced in place) and its masked logits ``[M, K]``."""
  w_MxH = jax.lax.dynamic_slice_in_dim(weight_VxH, start, width, 0).astype(compute)
  b_M = jax.lax.dynamic_slice_in_dim(bias_V, start, width, 0).astype(compute)
  logits_MxK = jnp.matmul(w_MxH, hidden_KxH.T) + b_M[:, None]
  return w_MxH, jnp.where(mask_M[:, None], logits_MxK, -jnp.inf)


def _items_hidden(hidden_NxH, work, weight_VxH):
  compute = jnp.result_type(jnp.float32, hidden_NxH, weight_VxH)
  return compute, hidden_NxH.astype(compute)[work.token_LxK]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _windowed_word_nll(width, weight_VxH, bias_V, hidden_NxH, work, start_L, mask_LxM,
                       column_LxK):
  r""":math:`-\log p(y \mid c(y), h)` ``[N]`` for every token, item by item, with its own
  backward (``width`` = ``M``).

  A ``lax.scan`` over the :class:`WorkList` items slices each item's ``M``-row window out of
  ``weight_VxH`` in place (``dynamic_slice``: no ``[L, M, H]`` gathered copy), scores the
  item's ``K`` tokens against it and keeps only a log-sum-exp minus target logit per slot;
  items with no token (the static item count covers the worst case) are skipped with
  ``lax.cond``. The backward scans the items again, recomputes each window's softmax and
  adds :math:`(p - y)\,h` into the window's rows of one ``[V, H]`` gradient carried through
  the scan (updated in place), instead of scattering ``L M`` gathered rows. At V = 100k,
  N = 2048 this forward + backward took ~115 ms against ~235 ms for autodiff of the gathered
  windows (``backward="autodiff"``; WORKSPACE_NOTES.md). Reverse mode only; the CPU form
  (:mod:`lm_jax.ops.platform`: its scan runs once per item).
  """
  return _word_nll_fwd(width, weight_VxH, bias_V, hidden_NxH, work, start_L, mask_LxM,
                       column_LxK)[0]


def _word_nll_fwd(width, weight_VxH, bias_V, hidden_NxH, work, start_L, mask_LxM, column_LxK):
  compute, hidden_LxKxH = _items_hidden(hidden_NxH, work, weight_VxH)
  cap = column_LxK.shape[1]

  def score(x):
    start, hidden_KxH, mask_M, column_K, _ = x
    _, logits_MxK = _item_logits(weight_VxH, bias_V, hidden_KxH, start, mask_M, width, compute)
    max_K = jnp.max(logits_MxK, axis=0)
    lse_K = max_K + jnp.log(jnp.sum(jnp.exp(logits_MxK - max_K), axis=0))
    return lse_K - jnp.take_along_axis(logits_MxK, column_K[None, :], axis=0)[0]

  def body(_, x):
    return None, jax.lax.cond(x[4][0], score, lambda x: jnp.zeros((cap,), compute), x)

  _, nll_LxK = jax.lax.scan(body, None, (start_L, hidden_LxKxH, mask_LxM, column_LxK,
                                         work.valid_LxK))
  residuals = (weight_VxH, bias_V, hidden_NxH, work, start_L, mask_LxM, column_LxK)
  return nll_LxK[work.item_N, work.slot_N], residuals


def _word_nll_bwd(width, residuals, g_N):
  weight_VxH, bias_V, hidden_NxH, work, start_L, mask_LxM, column_LxK = residuals
  compute, hidden_LxKxH = _items_hidden(hidden_NxH, work, weight_VxH)
  cap, hidden_size = column_LxK.shape[1], hidden_NxH.shape[1]
  g_LxK = jnp.where(work.valid_LxK, g_N.astype(compute)[work.token_LxK], 0.0)

  def item_grads(x):
    start, hidden_KxH, mask_M, column_K, g_K, _ = x
    w_MxH, logits_MxK = _item_logits(weight_VxH, bias_V, hidden_KxH, start, mask_M, width,
                                     compute)
    p_MxK = jax.nn.softmax(logits_MxK, axis=0)
    d_MxK = (p_MxK - jax.nn.one_hot(column_K, width, axis=0, dtype=compute)) * g_K
    return jnp.matmul(d_MxK, hidden_KxH), jnp.sum(d_MxK, axis=1), jnp.matmul(d_MxK.T, w_MxH)

  def no_grads(x):
    return (jnp.zeros((width, hidden_size), compute), jnp.zeros((width,), compute),
            jnp.zeros((cap, hidden_size), compute))

  def add_item(carry, x):
    d_window_MxH, d_window_M, d_hidden_KxH = item_grads(x)
    start = x[0]
    update = lambda acc, delta: jax.lax.dynamic_update_slice_in_dim(
        acc, jax.lax.dynamic_slice_in_dim(acc, start, width, 0) + delta, start, 0)
    return (update(carry[0], d_window_MxH), update(carry[1], d_window_M)), d_hidden_KxH

  def body(carry, x):
    # An empty item is skipped, the [V, H] carry untouched. The predicate stays unbatched
    # under vmap (predicates.any_problem): a batched one would make the cond a select of both
    # branches' outputs, the whole [V, H] carry per item (2.8x B the temporaries of one
    # problem); an item empty in one problem but not another adds zeros there.
    return jax.lax.cond(predicates.any_problem(x[5][0]), add_item,
                        lambda carry, x: (carry, no_grads(x)[2]), carry, x)

  zeros = (jnp.zeros(weight_VxH.shape, compute), jnp.zeros(bias_V.shape, compute))
  (d_weight_VxH, d_bias_V), d_hidden_LxKxH = jax.lax.scan(
      body, zeros, (start_L, hidden_LxKxH, mask_LxM, column_LxK, g_LxK, work.valid_LxK))
  d_hidden_NxH = d_hidden_LxKxH[work.item_N, work.slot_N]
  none = jax.tree.map(lambda _: None, (work, start_L, mask_LxM, column_LxK))
  return (d_weight_VxH.astype(weight_VxH.dtype), d_bias_V.astype(bias_V.dtype),
          d_hidden_NxH.astype(hidden_NxH.dtype), *none)


_windowed_word_nll.defvjp(_word_nll_fwd, _word_nll_bwd)


class _Layout(NamedTuple):
  """The class head's static shape: ``V``, ``C``, ``M`` (window rows) and ``K`` (None: from N)."""
  vocab_size: int
  num_classes: int
  width: int
  tokens_per_item: Optional[int]


def _init(layout, init_scale, dtype, key, hidden_size):
  keys = jax.random.split(key, 4)
  shapes = {"class_weight_CxH": (layout.num_classes, hidden_size),
            "class_bias_C": (layout.num_classes,),
            "word_weight_VxH": (layout.vocab_size, hidden_size),
            "word_bias_V": (layout.vocab_size,)}
  return {name: jax.random.uniform(k, shape, dtype, -init_scale, init_scale)
          for k, (name, shape) in zip(keys, sorted(shapes.items()))}


def _work_items(layout, targets_N, tables):
  """``(class_N, work, start_L, mask_LxM)``: the items and their windows' rows."""
  class_N = tables["class_of_V"][targets_N]
  cap = layout.tokens_per_item or _tokens_per_item(targets_N.shape[0], layout.num_classes)
  work = class_work_list(class_N, layout.num_classes, cap)
  return (class_N, work, tables["window_C"][work.item_class_L],
          tables["window_mask_CxM"][work.item_class_L])


def _gather(layout, params, targets_N, key=None, *, tables):
  del key
  targets_N = jnp.asarray(targets_N)
  class_N, work, start_L, mask_LxM = _work_items(layout, targets_N, tables)
  rows_LM = (start_L[:, None] + jnp.arange(layout.width)).reshape(-1)
  rows = {"class_weight_CxH": params["class_weight_CxH"], "class_bias_C": params["class_bias_C"],
          "word_weight_VxH": params["word_weight_VxH"][rows_LM],
          "word_bias_V": params["word_bias_V"][rows_LM]}
  index = {"class_weight_CxH": None, "class_bias_C": None,
           "word_weight_VxH": rows_LM, "word_bias_V": rows_LM}
  return rows, index, (class_N, work, tables["column_V"][targets_N], mask_LxM)


def _sparse_loss(layout, rows, hidden_NxH, aux, *, where=None):
  class_N, work, column_N, mask_LxM = aux
  compute = jnp.result_type(jnp.float32, hidden_NxH, rows["word_weight_VxH"])
  hidden_NxH = jnp.asarray(hidden_NxH, compute)
  class_logp_N = _class_log_softmax_at(hidden_NxH, rows["class_weight_CxH"],
                                       rows["class_bias_C"], class_N, compute)
  num_items = mask_LxM.shape[0]
  weight_LxMxH = rows["word_weight_VxH"].astype(compute).reshape(num_items, layout.width, -1)
  # [L, M, K], window rows leading: XLA:CPU ran this batched matmul at ~60 GFLOP/s against
  # 14 laid out [L, K, M], and the head's forward + backward 1.4x faster (WORKSPACE_NOTES.md).
  logits_LxMxK = (jnp.einsum("lmh,lkh->lmk", weight_LxMxH, hidden_NxH[work.token_LxK])
                  + rows["word_bias_V"].astype(compute).reshape(num_items, layout.width, 1))
  logits_LxMxK = jnp.where(mask_LxM[:, :, None], logits_LxMxK, -jnp.inf)
  max_LxK = jax.lax.stop_gradient(jnp.max(logits_LxMxK, axis=1))
  lse_LxK = max_LxK + jnp.log(jnp.sum(jnp.exp(logits_LxMxK - max_LxK[:, None, :]), axis=1))
  word_logp_N = (logits_LxMxK[work.item_N, column_N, work.slot_N]
                 - lse_LxK[work.item_N, work.slot_N])
  loss_N = -(class_logp_N + word_logp_N)
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _scan_loss(layout, params, hidden_NxH, targets_N, *, where=None, tables):
  hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["word_weight_VxH"])
  class_N, work, start_L, mask_LxM = _work_items(layout, targets_N, tables)
  class_logp_N = _class_log_softmax_at(hidden_NxH.astype(compute), params["class_weight_CxH"],
                                       params["class_bias_C"], class_N, compute)
  word_nll_N = _windowed_word_nll(layout.width, params["word_weight_VxH"], params["word_bias_V"],
                                  hidden_NxH, work, start_L, mask_LxM,
                                  tables["column_V"][targets_N][work.token_LxK])
  loss_N = word_nll_N - class_logp_N
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _gathered_loss(layout, params, hidden_NxH, targets_N, *, where=None, tables):
  hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
  rows, _, aux = _gather(layout, params, targets_N, tables=tables)
  return _sparse_loss(layout, rows, hidden_NxH, aux, where=where)


def _loss(layout, backward, implementation, params, hidden_NxH, targets_N, *, key=None,
          where=None, tables):
  """The CPU form ``backward`` names, or on GPU/TPU the gathered windows (no item loop)."""
  del key
  cpu_loss = _scan_loss if backward == "scan" else _gathered_loss
  call = lambda f: lambda p, h, y, w, t: f(layout, p, h, y, where=w, tables=t)
  return platform.per_platform(call(cpu_loss), call(_gathered_loss), params, hidden_NxH,
                               targets_N, where, tables, implementation=implementation)


def _class_log_probs(params, hidden_NxH, compute):
  logits_NxC = (jnp.matmul(hidden_NxH, params["class_weight_CxH"].astype(compute).T)
                + params["class_bias_C"].astype(compute))
  return jax.nn.log_softmax(logits_NxC, axis=-1)


def _log_probs(layout, params, hidden_NxH, *, tables):
  hidden_NxH, _ = _check_hidden(hidden_NxH)
  class_of_row = tables["class_of_row_V"]
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["word_weight_VxH"])
  hidden_NxH = hidden_NxH.astype(compute)
  logits_RxN = (jnp.matmul(params["word_weight_VxH"].astype(compute), hidden_NxH.T)
                + params["word_bias_V"].astype(compute)[:, None])  # Rows in class-major order.
  segments = dict(segment_ids=class_of_row, num_segments=layout.num_classes,
                  indices_are_sorted=True)
  max_CxN = jax.lax.stop_gradient(jax.ops.segment_max(logits_RxN, **segments))
  shifted_RxN = logits_RxN - max_CxN[class_of_row]
  lse_CxN = jnp.log(jax.ops.segment_sum(jnp.exp(shifted_RxN), **segments))
  within_RxN = shifted_RxN - lse_CxN[class_of_row]
  word_logp_NxR = _class_log_probs(params, hidden_NxH, compute)[:, class_of_row] + within_RxN.T
  return word_logp_NxR[:, tables["row_of_V"]]


def _walk(layout, params, hidden_NxH, key, tables):
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["word_weight_VxH"])
  hidden_NxH = hidden_NxH.astype(compute)
  key_class, key_word = jax.random.split(key)
  class_N = jax.random.categorical(key_class, _class_log_probs(params, hidden_NxH, compute))
  rows_NxM = tables["window_C"][class_N][:, None] + jnp.arange(layout.width)
  word_logits_NxM = (
      jnp.einsum("nmh,nh->nm", params["word_weight_VxH"][rows_NxM].astype(compute), hidden_NxH)
      + params["word_bias_V"][rows_NxM].astype(compute))
  word_logits_NxM = jnp.where(tables["window_mask_CxM"][class_N], word_logits_NxM, -jnp.inf)
  column_N = jax.random.categorical(key_word, word_logits_NxM)
  row_N = jnp.take_along_axis(rows_NxM, column_N[:, None], axis=-1)[:, 0]
  return tables["words_by_row_V"][row_N]


def _class_tables(counts, num_classes, binning):
  """``(layout fields V, C, M; tables)``: the class map and the class-major window layout."""
  class_of_V, _, members_CxM, member_mask_CxM = word_classes(counts, num_classes, binning=binning)
  vocab_size = class_of_V.shape[0]
  num_classes, width = members_CxM.shape
  size_C = member_mask_CxM.sum(axis=1)
  first_row_C = np.cumsum(size_C) - size_C
  row_of_V = class_major_rows(counts, num_classes, binning=binning)
  words_by_row = np.argsort(row_of_V).astype(np.int32)
  window_C = np.minimum(first_row_C, vocab_size - width).astype(np.int32)
  row_CxM = window_C[:, None] + np.arange(width)
  window_mask_CxM = (row_CxM >= first_row_C[:, None]) & (row_CxM < (first_row_C + size_C)[:, None])
  tables = {"class_of_V": class_of_V, "column_V": (row_of_V - window_C[class_of_V]).astype(np.int32),
            "window_C": window_C, "window_mask_CxM": window_mask_CxM,
            "class_of_row_V": class_of_V[words_by_row].astype(np.int32), "row_of_V": row_of_V,
            "words_by_row_V": words_by_row}
  return (vocab_size, num_classes, width), {name: jnp.asarray(x) for name, x in tables.items()}


def class_softmax(counts, num_classes: Optional[int] = None, *, binning: str = "equal",
                  tokens_per_item: Optional[int] = None, init_scale: float = 0.1,
                  dtype=jnp.float32, backward: str = "scan",
                  implementation: str = "auto") -> OutputHead:
  r"""Two-level class-based softmax over frequency classes (see :func:`word_classes`).

  .. math::
    \log p(y \mid h) = \big(u_{c} \cdot h + a_{c} - \log \textstyle\sum_{c'} e^{u_{c'} \cdot h
    + a_{c'}}\big) + \big(w_y \cdot h + b_y - \log \textstyle\sum_{v \in c} e^{w_v \cdot h
    + b_v}\big), \quad c = c(y).

  Params ``{"class_weight_CxH", "class_bias_C", "word_weight_VxH", "word_bias_V"}``, uniform
  in ``[-init_scale, init_scale]``. The word rows are stored **class-major**: row ``r`` holds
  word ``words_by_row[r]`` (classes contiguous, each in decreasing frequency), so a class is
  the ``M``-row window starting at ``min(first row of c, V - M)`` (``M`` the largest class),
  with no padding rows. Training (``loss``, ``log_prob``) sorts the tokens by class into
  :func:`class_work_list` items of ``K`` tokens and scores each item's ``[K, H]`` hidden
  states against its class's window, then reads back each token's log-sum-exp and target
  logit: :math:`O(H (C + M))` per token, ``K`` tokens sharing each window. By default
  (``backward="scan"``) the windows are sliced out of ``word_weight_VxH`` in place, item by
  item, and the backward adds each window's gradient into one ``[V, H]`` array
  (:func:`_windowed_word_nll`); ``sparse`` (and ``backward="autodiff"``) gathers the ``L``
  windows into one ``[L, M, H]`` array and scores them in one batched matmul. ``loss``
  ignores ``key``. ``log_probs`` builds the full ``[N, V]`` distribution in :math:`O(V H)`.
  ``sample`` at ``temperature=1.0`` (a Python number) draws the class, then the word in it,
  in :math:`O(H (C + M))`; tempering does not factor over the two levels, so any other
  temperature, or a traced one, samples from ``log_probs`` via
  :func:`~lm_jax.heads.base.sample_from_log_probs`. ``sparse`` gathers the items' windows.

  The training cost grows with ``M``, so the default ``binning="equal"`` makes it smallest
  (:math:`M = V / C`: 316 at ``V = 100k``, against 628 for ``"sqrt"`` at a Zipfian
  ``V = 100k`` and 3742 for ``"mass"``, whose equal-mass classes put thousands of rare words
  together). On PTB's Elman LM it trains 2.4x faster than ``"sqrt"`` (which is no faster
  than the full softmax there); see WORKSPACE_NOTES.md for the perplexities.

  Args:
    counts: ``[V]`` training counts of each id.
    num_classes: ``C``; default :math:`\lceil \sqrt V \rceil`.
    binning: ``"equal"``, ``"sqrt"`` or ``"mass"`` (Mikolov).
    tokens_per_item: ``K``; default the power of two nearest to ``N / C`` (at most 32).
    init_scale: half-width of the uniform initialisation.
    dtype: parameter dtype.
    backward: how ``loss`` is differentiated: ``"scan"`` (default; windows sliced in place
      item by item with a hand-written backward, :func:`_windowed_word_nll`; reverse mode
      only) or ``"autodiff"`` (autodiff of the gathered windows, ``sparse.loss``; slower,
      but ``jax.jvp`` works). ``sparse`` is the same for both. Used by the CPU form only.
    implementation: ``"auto"`` (default): on a CPU the form ``backward`` names, on GPU and
      TPU the gathered windows scored in one batched matmul (``sparse.loss``: no loop over
      the items, whose number grows with ``N``), chosen when the program is lowered
      (:func:`lm_jax.ops.platform.per_platform`); ``"cpu"`` or ``"accelerator"`` forces one.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead`.

  References:
    Mikolov et al., ICASSP 2011, Eq. (4); Chen, Grangier and Auli, ACL 2016, Section 3.2.

  >>> head = class_softmax([3, 2, 1], 2, binning="mass")  # classes {0} and {1, 2}
  >>> params = {"class_weight_CxH": jnp.array([[1.0], [0.0]]), "class_bias_C": jnp.zeros(2),
  ...           "word_weight_VxH": jnp.zeros((3, 1)), "word_bias_V": jnp.array([0.0, 1.0, 0.0])}
  >>> print(jnp.round(jnp.exp(head.log_probs(params, jnp.array([[0.0]]))), 4))
  [[0.5    0.3655 0.1345]]
  """
  if tokens_per_item is not None and tokens_per_item < 1:
    raise ValueError(f"tokens_per_item must be >= 1, got {tokens_per_item}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  platform.check_implementation(implementation)
  sizes, tables = _class_tables(counts, num_classes, binning)
  layout = _Layout(*sizes, tokens_per_item)
  partial = functools.partial
  sparse = RowSparse(partial(_gather, layout), partial(_sparse_loss, layout))
  loss = partial(_loss, layout, backward, implementation)
  log_probs = partial(_log_probs, layout)
  return with_target_contract(
      OutputHead(partial(_init, layout, init_scale, dtype), loss, log_prob_from_loss(loss),
                 log_probs, sample_by_walk(partial(_walk, layout), log_probs), sparse, tables),
      layout.vocab_size)
