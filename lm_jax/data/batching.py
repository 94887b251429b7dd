r"""Minibatches for truncated BPTT: sequential partitioning and random sampling.

Both strategies of the notes (D2L's ``seq_data_iter_sequential`` and
``seq_data_iter_random``) as pure functions of ``(tokens, position, seed)``: the batch
at ``BatchPosition(epoch, index)`` is computed directly, so a run resumes exactly from
a checkpointed position, with no iterator state. Each epoch draws an offset
``o`` in ``[0, T)`` from ``(seed, epoch)`` so that the cut points move between epochs.

* ``"sequential"``: the stream from ``o`` is cut into ``B`` contiguous rows of
  ``n * T`` tokens; batch ``i`` is columns ``[i T, (i + 1) T)``, so row ``r`` of batch
  ``i + 1`` continues row ``r`` of batch ``i`` and the hidden state can be carried
  (``reset`` only on the first batch of an epoch).
* ``"random"``: the non-overlapping subsequences starting at ``o + k T`` are shuffled
  by a permutation drawn from ``(seed, epoch)``; batch ``i`` takes ``B`` of them; the
  state must be reset before every batch.

Targets are the inputs shifted by one token. Both give the same number of batches per
epoch, ``n = (N - T) // (B T)``, independent of the offset: the stream must hold at
least ``B T + T`` tokens. Every training token is used at most once per epoch; fewer
than ``B T + T`` at the end are left out (a different part each epoch).

``eval_batches`` instead covers every target of a split exactly once (no offset, the
ragged end padded and masked), for exact perplexities.

>>> tokens = np.arange(20)
>>> batch = get_batch(tokens, BatchPosition(0, 0), batch_size=2, bptt=3,
...                   strategy="sequential", seed=0)
>>> batch.inputs_BxT.tolist(), batch.targets_BxT.tolist(), batch.reset
([[2, 3, 4], [8, 9, 10]], [[3, 4, 5], [9, 10, 11]], True)
>>> get_batch(tokens, BatchPosition(0, 1), batch_size=2, bptt=3,
...           strategy="sequential", seed=0).inputs_BxT.tolist()  # rows continue
[[5, 6, 7], [11, 12, 13]]

References:
  Dive into Deep Learning, section 9.3.4 "Partitioning Sequences"; Zaremba et al.,
  "Recurrent Neural Network Regularization" (2014), the PTB batching (rows carried).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

STRATEGIES = ("sequential", "random")


class Batch(NamedTuple):
  """One minibatch; ``reset``: the hidden state must be reset before this batch."""
  inputs_BxT: np.ndarray   # int32
  targets_BxT: np.ndarray  # int32
  mask_BxT: np.ndarray     # bool, False where a target is padding
  reset: bool


class BatchPosition(NamedTuple):
  """Where a run is: ``index`` is the batch number within ``epoch`` (both from 0)."""
  epoch: int
  index: int


def _check_sizes(num_tokens: int, batch_size: int, bptt: int) -> None:
  for name, value in (("batch_size", batch_size), ("bptt", bptt)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_tokens < 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")


def _check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")


def num_batches(num_tokens: int, batch_size: int, bptt: int, strategy: str) -> int:
  """Batches per epoch, ``(num_tokens - bptt) // (batch_size * bptt)``, for both strategies.

  Raises ValueError naming the sizes when that is 0 (fewer than
  ``batch_size * bptt + bptt`` tokens).
  """
  _check_strategy(strategy)
  _check_sizes(num_tokens, batch_size, bptt)
  n = max(num_tokens - bptt, 0) // (batch_size * bptt)
  if n == 0:
    raise ValueError(f"{num_tokens} tokens are too few for one batch of batch_size={batch_size}"
                     f" x bptt={bptt}: need at least batch_size * bptt + bptt = "
                     f"{batch_size * bptt + bptt} (the random offset takes up to bptt - 1, "
                     "the targets one more)")
  return n


def _as_tokens(tokens) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} "
                     f"dtype {tokens.dtype}")
  return tokens


def get_batch(tokens, position: BatchPosition, *, batch_size: int, bptt: int, strategy: str,
              seed: int, rows: tuple[int, int] | None = None) -> Batch:
  """The training batch at ``position``: a pure function of its arguments.

  Args:
    tokens: the split's token stream, integer ``[N]``.
    position: ``BatchPosition(epoch, index)`` with ``0 <= index < num_batches(...)``.
    batch_size: ``B`` rows.
    bptt: ``T`` steps.
    strategy: "sequential" or "random" (module docstring).
    seed: with the epoch, determines the offset and the shuffle.
    rows: ``(start, stop)``: build only rows ``[start, stop)`` of the ``B`` (a process's
      share in data-parallel training; equal to ``shard_rows`` of the whole batch).

  Returns:
    ``Batch`` with int32 ``[B, T]`` (or ``[stop - start, T]``) inputs and targets, an
    all-True mask, and ``reset``.
  """
  tokens = _as_tokens(tokens)
  n = num_batches(len(tokens), batch_size, bptt, strategy)
  epoch, index = int(position[0]), int(position[1])
  if epoch < 0 or not 0 <= index < n:
    raise ValueError(f"position {tuple(position)} is outside epoch >= 0, "
                     f"0 <= index < {n} batches")
  rng = np.random.default_rng([seed, epoch])
  offset = int(rng.integers(bptt))
  if strategy == "sequential":
    row_starts_B = offset + np.arange(batch_size) * (n * bptt) + index * bptt
    reset = index == 0
  else:
    num_subsequences = (len(tokens) - bptt) // bptt
    order = rng.permutation(num_subsequences)[index * batch_size:(index + 1) * batch_size]
    row_starts_B = offset + order * bptt
    reset = True
  if rows is not None:
    start, stop = rows
    if not 0 <= start < stop <= batch_size:
      raise ValueError(f"rows={tuple(rows)} must satisfy 0 <= start < stop <= batch_size="
                       f"{batch_size}")
    row_starts_B = row_starts_B[start:stop]
  window_BxT1 = tokens[row_starts_B[:, None] + np.arange(bptt + 1)].astype(np.int32)
  return Batch(inputs_BxT=window_BxT1[:, :-1], targets_BxT=window_BxT1[:, 1:],
               mask_BxT=np.ones(window_BxT1[:, 1:].shape, dtype=bool), reset=bool(reset))


def next_position(position: BatchPosition, n_batches: int) -> BatchPosition:
  """The position after ``position`` in an epoch of ``n_batches`` batches."""
  epoch, index = position
  if index + 1 < n_batches:
    return BatchPosition(epoch, index + 1)
  return BatchPosition(epoch + 1, 0)


def iterate_batches(tokens, *, batch_size: int, bptt: int, strategy: str, seed: int,
                    start: BatchPosition = BatchPosition(0, 0),
                    num_epochs: int | None = None) -> Iterator[tuple[BatchPosition, Batch]]:
  """Yields ``(position, batch)`` from ``start`` on, until epoch ``num_epochs`` (None: forever).

  To resume after training on the batch at ``position``, start at
  ``next_position(position, num_batches(...))``.
  """
  tokens = _as_tokens(tokens)
  n = num_batches(len(tokens), batch_size, bptt, strategy)
  position = BatchPosition(*start)
  while num_epochs is None or position.epoch < num_epochs:
    yield position, get_batch(tokens, position, batch_size=batch_size, bptt=bptt,
                              strategy=strategy, seed=seed)
    position = next_position(position, n)


def eval_batches(tokens, *, batch_size: int, bptt: int, pad_id: int = 1) -> Iterator[Batch]:
  """Sequential batches in which every target of ``tokens`` appears exactly once.

  The ``N - 1`` targets ``tokens[1:]`` are split into ``B`` contiguous rows whose
  lengths differ by at most one (rows may be empty when ``N - 1 < B``); each row is
  cut into ``ceil(max row length / T)`` windows, and positions past a row's end hold
  ``pad_id`` (``Vocab.pad_id`` = 1 by default) with ``mask`` False. Row ``r`` of batch
  ``i + 1`` continues row ``r`` of batch ``i``; only the first batch has ``reset``.

  Args:
    tokens: the split, integer ``[N]``, ``N >= 2``.
    batch_size: ``B`` rows.
    bptt: ``T`` steps.
    pad_id: the id written at masked positions.

  Returns:
    An iterator of ``Batch`` (int32 ``[B, T]`` inputs/targets, bool ``[B, T]`` mask).
  """
  tokens = _as_tokens(tokens)
  _check_sizes(len(tokens), batch_size, bptt)
  num_targets = len(tokens) - 1
  if num_targets < 1:
    raise ValueError(f"eval_batches needs at least 2 tokens (one target), got {len(tokens)}")
  lengths_B = num_targets // batch_size + (np.arange(batch_size) < num_targets % batch_size)
  starts_B = np.concatenate([[0], np.cumsum(lengths_B)[:-1]])
  n = -(-int(lengths_B.max()) // bptt)
  for i in range(n):
    cols_T = i * bptt + np.arange(bptt)
    mask_BxT = cols_T[None, :] < lengths_B[:, None]
    pos_BxT = np.where(mask_BxT, starts_B[:, None] + cols_T[None, :], 0)
    inputs_BxT = np.where(mask_BxT, tokens[pos_BxT], pad_id).astype(np.int32)
    targets_BxT = np.where(mask_BxT, tokens[pos_BxT + 1], pad_id).astype(np.int32)
    yield Batch(inputs_BxT=inputs_BxT, targets_BxT=targets_BxT, mask_BxT=mask_BxT,
                reset=i == 0)


def shard_rows(batch: Batch, num_shards: int, shard_index: int) -> Batch:
  """Rows ``[s B/P, (s + 1) B/P)`` of a batch, for device or process ``s`` of ``P``."""
  batch_size = batch.inputs_BxT.shape[0]
  if num_shards < 1 or batch_size % num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} is outside [0, num_shards={num_shards})")
  rows = batch_size // num_shards
  block = slice(shard_index * rows, (shard_index + 1) * rows)
  return Batch(inputs_BxT=batch.inputs_BxT[block], targets_BxT=batch.targets_BxT[block],
               mask_BxT=batch.mask_BxT[block], reset=batch.reset)
