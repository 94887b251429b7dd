r"""Host-side n-gram tools: hashed context features for MaxEnt LMs and add-k count baselines.

All functions are NumPy on token-id streams (``tokens_T``, non-negative ints).
``hashed_ngram_contexts`` feeds ``loglinear.ContextFeatures``;
``unique_examples`` merges repeated (context, label) rows into counts, which
``loglinear`` takes as ``where=`` multiplicities, an exact and much smaller
objective on text, where most n-grams repeat.
"""
from typing import Sequence

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: per-order salts


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective avalanche mix of uint64 (wraps on purpose)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _check_tokens(tokens_T) -> np.ndarray:
  tokens = np.asarray(tokens_T)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens_T must be a rank-1 integer array, got shape {tokens.shape} "
                     f"dtype {tokens.dtype}.")
  if tokens.size and tokens.min() < 0:
    raise ValueError(f"tokens_T must be non-negative ids, got {tokens.min()}.")
  return tokens


def hashed_ngram_contexts(tokens_T: np.ndarray, *, max_order: int,
                          num_buckets: int) -> np.ndarray:
  r"""Hashed n-gram context predicates for predicting each token from its history.

  Column ``k`` (0-based) is the order-``k + 1`` feature of position ``t``: the
  previous ``k`` tokens :math:`x_{t-k}, \dots, x_{t-1}`, hashed into
  ``[1, num_buckets)``; column 0 (order 1, no history) is the bias / unigram
  predicate, bucket 0 for every position. Positions with fewer than ``k``
  tokens of history get ``-1`` (padding, no feature) in column ``k``. Crossed
  with the label by ``loglinear.ContextFeatures`` this is the MaxEnt n-gram
  model :math:`p(y \mid h) \propto \exp \sum_{k} W[c_k(h), y]`.
  The hash chains SplitMix64's finaliser ``mix`` from the nearest token back:
  :math:`h_0 = 0`, :math:`h_j = \mathrm{mix}(h_{j-1} \oplus \mathrm{mix}(x_{t-j} + 1
  + j G))` with :math:`G` = ``0x9E3779B97F4A7C15`` (mod :math:`2^{64}`), and
  column ``k`` is :math:`1 + h_k \bmod (F - 1)`; it is pinned by tests, because
  changing it changes every fitted model's feature ids.

  Args:
    tokens_T: token ids.
    max_order: highest n-gram order (``K = max_order`` columns), ``>= 1``.
    num_buckets: hash table size ``F`` (bucket 0 reserved for the bias), in ``[2, 2**31]``.

  Returns:
    ``context_TxK`` int32.

  References:
    Rosenfeld (1996), "A maximum entropy approach to adaptive statistical
    language modelling", Computer Speech and Language 10; Mikolov et al. (2011),
    "Strategies for training large scale neural network language models"
    (hashed MaxEnt n-gram features), section 4.

  >>> ctx = hashed_ngram_contexts(np.array([3, 1, 3, 1]), max_order=3, num_buckets=1000)
  >>> ctx[:, 0], ctx[:2, 1:]  # bias; padding where the history is too short
  (array([0, 0, 0, 0], dtype=int32), array([[ -1,  -1],
         [432,  -1]], dtype=int32))
  >>> bool(ctx[1, 1] == ctx[3, 1] != ctx[2, 1])  # same previous token, same bucket
  True
  """
  tokens = _check_tokens(tokens_T)
  if max_order < 1 or not 2 <= num_buckets <= 2**31:
    raise ValueError(f"need max_order >= 1 and 2 <= num_buckets <= 2**31 (int32 ids), got "
                     f"{max_order}, {num_buckets}.")
  t = tokens.shape[0]
  context = np.full((t, max_order), -1, np.int32)
  context[:, 0] = 0
  h = np.zeros(t, np.uint64)
  ids = tokens.astype(np.uint64) + np.uint64(1)
  for k in range(1, max_order):
    # h[t] hashes (order, x_{t-k}, ..., x_{t-1}); extends order k - 1's hash by x_{t-k}.
    prev = np.zeros(t, np.uint64)
    prev[k:] = ids[:t - k]
    h = _mix64(h ^ _mix64(prev + np.uint64(_GOLDEN * k % 2**64)))
    context[k:, k] = 1 + (h[k:] % np.uint64(num_buckets - 1)).astype(np.int64)
  return context


def unique_examples(context_NxK: np.ndarray,
                    labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distinct (context row, label) pairs and their counts: ``(context_UxK, labels_U, counts_U)``."""
  context, labels = np.asarray(context_NxK), np.asarray(labels_N)
  if context.ndim != 2 or labels.shape != context.shape[:1]:
    raise ValueError(f"need context_NxK and labels_N, got shapes {context.shape} and "
                     f"{labels.shape}.")
  rows, counts = np.unique(np.concatenate([context, labels[:, None].astype(context.dtype)], 1),
                           axis=0, return_counts=True)
  return rows[:, :-1], rows[:, -1].astype(labels.dtype), counts


def compact_ids(context_NxK: np.ndarray, used_F: np.ndarray) -> np.ndarray:
  """Renumbers ids by their rank in the sorted ``used_F``; ids not in it (and padding) become -1.

  With ``used_F = np.unique(train[train >= 0])`` this shrinks a hashed table to
  the buckets the training data touches, an exact reparametrisation of a model
  started at zero: an untouched bucket's weights get zero gradient, stay zero
  under L2, and score 0 on new data, like padding.

  >>> compact_ids(np.array([[0, 907, -1], [0, 5, 907]]), np.array([0, 5, 907]))
  array([[ 0,  2, -1],
         [ 0,  1,  2]], dtype=int32)
  """
  context, used = np.asarray(context_NxK), np.asarray(used_F)
  if used.ndim != 1 or np.any(np.diff(used) <= 0):
    raise ValueError(f"used_F must be sorted distinct ids, got shape {used.shape}.")
  rank = np.clip(np.searchsorted(used, context), 0, max(len(used) - 1, 0))
  found = (context >= 0) & (used[rank] == context) if len(used) else np.zeros(context.shape, bool)
  return np.where(found, rank, -1).astype(np.int32)


def char_ids(text: str, chars: Sequence[str]) -> np.ndarray:
  """Ids of ``text``'s characters in ``chars``; unseen characters get ``len(chars)`` (``<unk>``)."""
  index = {c: i for i, c in enumerate(chars)}
  if len(index) != len(chars):
    raise ValueError(f"chars must be distinct, got {len(chars)} with {len(index)} distinct.")
  return np.fromiter((index.get(c, len(chars)) for c in text), np.int32, len(text))


def ngram_counts(tokens_T: np.ndarray, *, order: int, vocab_size: int) -> np.ndarray:
  """Dense n-gram counts, ``counts[x_{t-n+1}, ..., x_t]``, shape ``[V] * order`` (int64)."""
  tokens = _check_tokens(tokens_T)
  if order < 1 or tokens.size and tokens.max() >= vocab_size:
    raise ValueError(f"need order >= 1 and ids < vocab_size={vocab_size}, got order {order}"
                     f", max id {tokens.max() if tokens.size else None}.")
  t = tokens.shape[0] - order + 1
  grams = tuple(tokens[j:j + t] for j in range(order)) if t > 0 else (tokens[:0],) * order
  flat = np.ravel_multi_index(grams, (vocab_size,) * order)
  return np.bincount(flat, minlength=vocab_size ** order).reshape((vocab_size,) * order)


def add_k_log_probs(counts: np.ndarray, k: float = 1.0) -> np.ndarray:
  r"""Add-:math:`k` (Laplace for :math:`k = 1`) conditional log-probabilities, last axis normalised.

  .. math::
    \log p(y \mid h) = \log \frac{c(h, y) + k}{c(h) + k V}.

  Args:
    counts: n-gram counts ``[..., V]`` (history axes first).
    k: pseudo-count, ``> 0``.

  Returns:
    float64 log-probabilities of the same shape.

  References:
    Jurafsky and Martin, Speech and Language Processing (3rd ed. draft),
    section 3.5.

  >>> np.exp(add_k_log_probs(np.array([3, 0, 1]), k=1.0)).round(4)
  array([0.5714, 0.1429, 0.2857])
  """
  if not k > 0:
    raise ValueError(f"k must be > 0, got {k}.")
  counts = np.asarray(counts, np.float64)
  return np.log(counts + k) - np.log(counts.sum(-1, keepdims=True) + k * counts.shape[-1])


def ngram_token_log_probs(log_probs: np.ndarray, tokens_T: np.ndarray,
                          start: int) -> np.ndarray:
  """``log p(x_t | x_{t-n+1..t-1})`` for ``t`` in ``[start, T)`` from an order-``n`` table ``[V] * n``."""
  tokens = _check_tokens(tokens_T)
  order = np.ndim(log_probs)
  if not order - 1 <= start <= tokens.shape[0]:
    raise ValueError(f"start must lie in [{order - 1}, {tokens.shape[0]}] for an order-{order} "
                     f"table, got {start}.")
  t = tokens.shape[0] - start
  return log_probs[tuple(tokens[start - order + 1 + j:start - order + 1 + j + t]
                         for j in range(order))]
