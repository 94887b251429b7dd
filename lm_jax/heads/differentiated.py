r"""Differentiated softmax (D-softmax): frequent words get more hidden dimensions.

Words sorted by decreasing training count are split into bands; band :math:`b` holds
:math:`n_b` words and scores them from its own slice of the hidden state,
:math:`h_{[o_b, o_b + d_b)}` with :math:`\sum_b d_b = H`, and one softmax normalises over
all words:

.. math::
  s(w, h) = h_{[o_b, o_b + d_b)} \cdot W^{(b)}_w + b_w \ (w \in \text{band } b), \qquad
  \log p(w \mid h) = s(w, h) - \log \sum_{v=1}^{V} \exp s(v, h).

The output layer costs :math:`\sum_b n_b d_b` multiply-adds per token instead of
:math:`V H` (the default bands: 0.275 :math:`V H`). It is exact: ``loss = -log_prob``.

References:
  Chen, Grangier and Auli, "Strategies for training large vocabulary neural language
  models", ACL 2016, Section 3.3.
"""
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads import base
from lm_jax.ops import fused
from lm_jax.ops import losses
from lm_jax.ops import platform
from lm_jax.ops import precision


def parse_bands(spec: str) -> tuple[tuple[int, int], ...]:
  """``"2000:100,3000:60,-1:40"`` -> ``((2000, 100), (3000, 60), (-1, 40))`` (words:dims).

  >>> parse_bands("2000:100, -1:40")
  ((2000, 100), (-1, 40))
  """
  bands = []
  for piece in spec.split(","):
    words, sep, dims = piece.strip().partition(":")
    try:
      bands.append((int(words), int(dims)))
    except ValueError:
      raise ValueError(f"band {piece.strip()!r} in {spec!r} is not 'num_words:dims' "
                       "(two ints, num_words = -1 for the rest)") from None
    if not sep:
      raise ValueError(f"band {piece.strip()!r} in {spec!r} is not 'num_words:dims'")
  return tuple(bands)


def _band_sizes(bands, vocab_size):
  """Checks ``bands`` and returns ``(words, dims)`` with the ``-1`` resolved."""
  bands = [tuple(band) for band in bands]
  if not bands or any(len(band) != 2 for band in bands):
    raise ValueError(f"bands must be a non-empty sequence of (num_words, dims), got {bands}")
  words = [int(n) for n, _ in bands]
  dims = [int(d) for _, d in bands]
  if any(d < 1 for d in dims):
    raise ValueError(f"every band needs dims >= 1, got dims {tuple(dims)}")
  if any(n < 1 for n in words[:-1]) or (words[-1] < 1 and words[-1] != -1):
    raise ValueError(f"every band needs num_words >= 1 (the last may be -1 for the rest), "
                     f"got num_words {tuple(words)}")
  if words[-1] == -1:
    words[-1] = vocab_size - sum(words[:-1])
    if words[-1] < 1:
      raise ValueError(f"bands take {sum(words[:-1])} words before the rest band (-1), but the "
                       f"vocabulary has only {vocab_size}")
  elif sum(words) != vocab_size:
    raise ValueError(f"band num_words {tuple(words)} sum to {sum(words)}, but the vocabulary "
                     f"has {vocab_size} words (use -1 in the last band for the rest)")
  return tuple(words), tuple(dims)


def _default_bands(vocab_size):
  """Word counts of the default bands: the top ceil(V/10), the next ceil(V/5), the rest."""
  top = -(-vocab_size // 10)
  middle = min(-(-vocab_size // 5), vocab_size - top)
  return tuple(n for n in (top, middle, vocab_size - top - middle) if n > 0)


def _default_dims(num_bands, hidden_size):
  """H/2, H/4, H/4 (the first band takes the remainder); fewer bands merge the tail dims."""
  dims = [hidden_size - 2 * (hidden_size // 4), hidden_size // 4, hidden_size // 4]
  dims[num_bands - 1] += sum(dims[num_bands:])
  return tuple(dims[:num_bands])


def _init(words, dims, init_scale, dtype, key, hidden_size):
  band_dims = dims if dims is not None else _default_dims(len(words), hidden_size)
  if sum(band_dims) != hidden_size:
    raise ValueError(f"band dims {band_dims} sum to {sum(band_dims)}, but hidden_size is "
                     f"{hidden_size}")
  keys = jax.random.split(key, len(words) + 1)
  uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -init_scale, init_scale)
  return {"band_weights": [uniform(k, (n, d)) for k, n, d in zip(keys[1:], words, band_dims)],
          "bias_V": uniform(keys[0], (sum(words),))}


def _rank_logits(params, hidden_NxH, tables):
  """Logits ``[N, V]`` in frequency-rank order, float32 (or wider)."""
  hidden_NxH, _ = base._check_hidden(hidden_NxH)
  band_weights = params["band_weights"]
  band_dims = tuple(w.shape[1] for w in band_weights)
  if sum(band_dims) != hidden_NxH.shape[1]:
    raise ValueError(f"band dims {band_dims} sum to {sum(band_dims)}, but hidden_NxH has "
                     f"shape {hidden_NxH.shape}")
  ctype = jnp.result_type(jnp.float32, hidden_NxH, *band_weights)
  offsets = np.cumsum((0,) + band_dims)
  logits = [precision.matmul(hidden_NxH[:, start:stop], w.T)
            for start, stop, w in zip(offsets[:-1], offsets[1:], band_weights)]
  return (jnp.concatenate(logits, axis=-1)
          + params["bias_V"].astype(ctype)[tables["id_of_rank_V"]])


def _chunk_nll(params, tables, hidden_CxH, ranks_C):
  return losses.softmax_cross_entropy_with_integer_labels(
      _rank_logits(params, hidden_CxH, tables), ranks_C)


def _chunked_nll(params, tables, hidden_NxH, ranks_N):
  """The CPU form: token chunks of at most ``2**24`` logits, each rematerialised in the
  backward pass, so the ``[N, V]`` logits never exist at once (the CE kernel's closed-form
  gradient inside)."""
  n, width = hidden_NxH.shape
  chunk = max(1, base._UNFUSED_MAX_LOGITS // params["bias_V"].shape[0])
  if n <= chunk:
    return _chunk_nll(params, tables, hidden_NxH, ranks_N)
  pad = (-n) % chunk
  hidden_KxCxH = jnp.pad(hidden_NxH, ((0, pad), (0, 0))).reshape(-1, chunk, width)
  ranks_KxC = jnp.pad(ranks_N, (0, pad)).reshape(-1, chunk)
  chunk_nll = jax.checkpoint(functools.partial(_chunk_nll, params, tables))
  nll_KxC = jax.lax.map(lambda xs: chunk_nll(*xs), (hidden_KxCxH, ranks_KxC))
  return nll_KxC.reshape(-1)[:n]


def _log_prob(implementation, params, hidden_NxH, targets_N, *, tables):
  hidden_NxH, targets_N = base._check_hidden(hidden_NxH, targets_N)
  ranks_N = tables["rank_of_id_V"][targets_N]
  return -platform.per_platform(_chunked_nll, _banded_nll, params, tables, hidden_NxH, ranks_N,
                                implementation=implementation)


def _loss(log_prob, params, hidden_NxH, targets_N, *, key=None, where=None, tables):
  del key  # D-softmax is exact.
  loss_N = -log_prob(params, hidden_NxH, targets_N, tables=tables)
  return loss_N if where is None else jnp.where(jnp.asarray(where), loss_N, 0.0)


def _log_probs(params, hidden_NxH, *, tables):
  return jax.nn.log_softmax(_rank_logits(params, hidden_NxH, tables),
                            axis=-1)[:, tables["rank_of_id_V"]]


def _sample(params, hidden_NxH, key, *, temperature=1.0, tables):
  return base.sample_from_log_probs(_log_probs(params, hidden_NxH, tables=tables), key,
                                    temperature=temperature)


def _banded_nll(params, tables, hidden_NxH, ranks_N):
  r""":math:`-\log p(y \mid h)` band by band without the ``[N, V]`` logits (the accelerator form).

  Each band's log-normaliser :math:`\mathrm{lse}_b` and, for the tokens whose target it
  holds, its loss :math:`\ell_b = \mathrm{lse}_b - s(y, h)` come from the fused loss's
  accelerator form (one loop over vocabulary blocks, whatever ``N``); then
  :math:`-\log p = \log \sum_b e^{\mathrm{lse}_b} - (\mathrm{lse}_{b(y)} - \ell_{b(y)})`.
  The target logit is recovered as a difference (to float32 rounding of ``lse``), so its
  gradient is the fused kernel's dense one-hot, not a scatter.
  """
  band_weights = params["band_weights"]
  dims = [w.shape[1] for w in band_weights]
  hidden_starts = np.cumsum([0] + dims)
  word_starts = np.cumsum([0] + [w.shape[0] for w in band_weights])
  bias_by_rank_V = params["bias_V"][tables["id_of_rank_V"]]
  lse_BxN, target_logit_N = [], 0.0
  for b, weight_WxD in enumerate(band_weights):
    start, stop = int(word_starts[b]), int(word_starts[b + 1])
    loss_N, lse_N = fused.linear_softmax_cross_entropy(
        hidden_NxH[:, hidden_starts[b]:hidden_starts[b + 1]], weight_WxD,
        jnp.clip(ranks_N - start, 0, stop - start - 1), bias_V=bias_by_rank_V[start:stop],
        return_lse=True, implementation="accelerator")
    lse_BxN.append(lse_N)
    in_band_N = (ranks_N >= start) & (ranks_N < stop)
    target_logit_N = target_logit_N + jnp.where(in_band_N, lse_N - loss_N, 0.0)
  return jax.nn.logsumexp(jnp.stack(lse_BxN), axis=0) - target_logit_N


def differentiated_softmax(counts: Any, bands: Optional[Sequence[tuple[int, int]]] = None, *,
                           init_scale: float = 0.1, dtype=jnp.float32,
                           implementation: str = "auto") -> base.OutputHead:
  r"""D-softmax over words banded by frequency (Chen et al. 2016).

  Params: ``{"band_weights": [W_b of shape [n_b, d_b], ...], "bias_V": [V]}``; row ``j`` of
  ``W_b`` belongs to the word of frequency rank ``n_0 + ... + n_{b-1} + j`` (stable sort by
  decreasing count, ties by id); ``bias_V`` is indexed by token id. The band dims are read
  from the params' shapes.

  Args:
    counts: ``[V]`` training count of each token id.
    bands: ``(num_words, dims)`` per band, most frequent first; the last may have
      ``num_words = -1`` (the rest); dims must sum to the ``hidden_size`` given to ``init``.
      ``None``: the top ceil(V/10) words get H/2 dims, the next ceil(V/5) H/4, the rest H/4
      (decided at ``init``).
    init_scale: half-width of the uniform initialisation.
    dtype: parameter dtype.
    implementation: how ``loss``/``log_prob`` avoid the ``[N, V]`` logits: ``"auto"``
      (default) chooses when the program is lowered: on a CPU token chunks of at most
      ``2**24`` logits, rematerialised in the backward (``lax.map``); on GPU and TPU
      :func:`_banded_nll`, whose only loops run over vocabulary blocks. ``"cpu"`` or
      ``"accelerator"`` forces one.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead` (``sparse=None``; ``loss`` ignores ``key``).

  >>> head = differentiated_softmax([5, 9, 1], bands=[(1, 2), (-1, 1)])
  >>> params = {"band_weights": [jnp.array([[1.0, 0.0]]), jnp.array([[0.0], [1.0]])],
  ...           "bias_V": jnp.zeros(3)}
  >>> h_NxH = jnp.array([[1.0, 2.0, 0.0]])  # word 1 (band 0) scores 1, words 0 and 2 score 0, 0
  >>> print(jnp.round(jnp.exp(head.log_probs(params, h_NxH)), 4))
  [[0.2119 0.5761 0.2119]]
  """
  platform.check_implementation(implementation)
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0):
    raise ValueError(f"counts must be a non-empty [V] vector of non-negative counts, got shape "
                     f"{counts.shape}")
  vocab_size = counts.size
  order_V = np.argsort(-counts.astype(np.int64), kind="stable")  # rank -> id
  tables = {"rank_of_id_V": jnp.asarray(np.argsort(order_V), jnp.int32),
            "id_of_rank_V": jnp.asarray(order_V, jnp.int32)}
  words, dims = (_band_sizes(bands, vocab_size) if bands is not None
                 else (_default_bands(vocab_size), None))
  log_prob = functools.partial(_log_prob, implementation)
  return base.with_target_contract(
      base.OutputHead(functools.partial(_init, words, dims, init_scale, dtype),
                      functools.partial(_loss, log_prob), log_prob, _log_probs, _sample,
                      tables=tables, mixed_precision=True),
      vocab_size)
