"""Tests for lm_jax.data.batching: sequential and random minibatches, evaluation batches."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_jax.data import batching

B, T = 3, 5


def epoch_batches(tokens, strategy, epoch=0, seed=0, batch_size=B, bptt=T):
  n = batching.num_batches(len(tokens), batch_size, bptt, strategy)
  return [batching.get_batch(tokens, batching.BatchPosition(epoch, i), batch_size=batch_size,
                             bptt=bptt, strategy=strategy, seed=seed) for i in range(n)]


def test_num_batches():
  assert batching.num_batches(100, 3, 5, "sequential") == (100 - 5) // 15 == 6
  assert batching.num_batches(100, 3, 5, "random") == 6
  assert batching.num_batches(20, 3, 5, "random") == 1


@pytest.mark.parametrize("args, match", [
    ((19, 3, 5, "sequential"), r"19 tokens are too few .* batch_size=3 x bptt=5: need at "
                               r"least batch_size \* bptt \+ bptt = 20"),
    ((100, 0, 5, "random"), "batch_size must be a positive int, got 0"),
    ((100, 3, 2.5, "random"), "bptt must be a positive int, got 2.5"),
    ((100, 3, 5, "shuffled"), "strategy='shuffled' is not one of"),
])
def test_num_batches_errors(args, match):
  with pytest.raises(ValueError, match=match):
    batching.num_batches(*args)


@pytest.mark.parametrize("strategy", batching.STRATEGIES)
def test_batch_types_and_targets_are_shifted_inputs(strategy):
  tokens = np.random.default_rng(0).integers(0, 50, size=200)
  for batch in epoch_batches(tokens, strategy):
    assert batch.inputs_BxT.shape == batch.targets_BxT.shape == batch.mask_BxT.shape == (B, T)
    assert batch.inputs_BxT.dtype == np.int32 and batch.mask_BxT.dtype == bool
    assert batch.mask_BxT.all()
    np.testing.assert_array_equal(batch.inputs_BxT[:, 1:], batch.targets_BxT[:, :-1])


@pytest.mark.parametrize("strategy", batching.STRATEGIES)
def test_every_row_is_a_slice_of_the_stream(strategy):
  tokens = np.random.default_rng(1).integers(0, 1000, size=300)  # values ~unique
  index = {}
  for pos, tok in enumerate(tokens):
    index.setdefault(int(tok), pos)
  for batch in epoch_batches(tokens, strategy, epoch=2):
    for row_in, row_tg in zip(batch.inputs_BxT, batch.targets_BxT):
      start = np.flatnonzero((tokens[:-T] == row_in[0]))
      assert any(np.array_equal(tokens[s:s + T], row_in) and
                 np.array_equal(tokens[s + 1:s + T + 1], row_tg) for s in start)


def test_sequential_rows_continue_across_batches():
  tokens = np.arange(1000)  # the value is the position
  for epoch in range(3):
    batches = epoch_batches(tokens, "sequential", epoch=epoch)
    assert [b.reset for b in batches] == [True] + [False] * (len(batches) - 1)
    for prev, cur in zip(batches, batches[1:]):
      np.testing.assert_array_equal(cur.inputs_BxT[:, 0], prev.inputs_BxT[:, -1] + 1)
      np.testing.assert_array_equal(cur.inputs_BxT[:, 0], prev.targets_BxT[:, -1])
    starts = batches[0].inputs_BxT[:, 0]
    assert 0 <= starts[0] < T  # the random offset
    # Rows are contiguous blocks of n*T tokens laid end to end: no token used twice.
    np.testing.assert_array_equal(np.diff(starts), len(batches) * T)


@pytest.mark.parametrize("strategy", batching.STRATEGIES)
def test_inputs_within_an_epoch_are_disjoint(strategy):
  tokens = np.arange(500)
  used = np.concatenate([b.inputs_BxT.ravel() for b in epoch_batches(tokens, strategy)])
  assert len(np.unique(used)) == len(used)


def test_random_subsequences_are_aligned_shuffled_and_reset():
  tokens = np.arange(500)
  batches = epoch_batches(tokens, "random", epoch=1)
  assert all(b.reset for b in batches)
  starts = np.concatenate([b.inputs_BxT[:, 0] for b in batches])
  offset = starts.min() % T
  assert np.all(starts % T == offset)  # non-overlapping grid from one per-epoch offset
  assert not np.all(np.diff(starts) > 0)  # shuffled


@pytest.mark.parametrize("strategy", batching.STRATEGIES)
def test_deterministic_and_epochs_and_seeds_differ(strategy):
  tokens = np.arange(2000)

  def firsts(epoch, seed):
    return np.stack([b.inputs_BxT for b in epoch_batches(tokens, strategy, epoch, seed)])

  np.testing.assert_array_equal(firsts(0, 0), firsts(0, 0))
  assert not np.array_equal(firsts(0, 0), firsts(1, 0))
  assert not np.array_equal(firsts(0, 0), firsts(0, 1))


def test_get_batch_position_errors():
  with pytest.raises(ValueError, match=r"position \(0, 6\) is outside .* index < 6"):
    batching.get_batch(np.arange(100), batching.BatchPosition(0, 6), batch_size=3, bptt=5,
                       strategy="random", seed=0)
  with pytest.raises(ValueError, match="1-D integer array"):
    batching.get_batch(np.zeros(100), (0, 0), batch_size=3, bptt=5, strategy="random", seed=0)


def test_next_position_and_iterate_batches_resume():
  assert batching.next_position(batching.BatchPosition(0, 4), 6) == (0, 5)
  assert batching.next_position(batching.BatchPosition(0, 5), 6) == (1, 0)
  tokens = np.arange(100)
  kwargs = dict(batch_size=3, bptt=5, strategy="random", seed=4)
  full = list(batching.iterate_batches(tokens, num_epochs=2, **kwargs))
  assert [p for p, _ in full] == [(e, i) for e in range(2) for i in range(6)]
  resumed = list(batching.iterate_batches(tokens, start=batching.BatchPosition(1, 2),
                                          num_epochs=2, **kwargs))
  assert len(resumed) == 4
  for (p, a), (q, b) in zip(full[8:], resumed):
    assert p == q and np.array_equal(a.inputs_BxT, b.inputs_BxT)
  stream = batching.iterate_batches(tokens, **kwargs)  # endless without num_epochs
  assert [next(stream)[0] for _ in range(13)][-1] == (2, 0)


@settings(deadline=None, max_examples=50)
@given(st.integers(2, 80), st.integers(1, 7), st.integers(1, 9))
def test_eval_batches_cover_every_target_exactly_once(n, batch_size, bptt):
  tokens = np.arange(n) + 10  # value - 10 = position
  batches = list(batching.eval_batches(tokens, batch_size=batch_size, bptt=bptt, pad_id=1))
  assert [b.reset for b in batches] == [True] + [False] * (len(batches) - 1)
  targets = []
  for b in batches:
    assert b.inputs_BxT.shape == (batch_size, bptt) and b.inputs_BxT.dtype == np.int32
    np.testing.assert_array_equal(b.targets_BxT[b.mask_BxT], b.inputs_BxT[b.mask_BxT] + 1)
    assert np.all(b.inputs_BxT[~b.mask_BxT] == 1) and np.all(b.targets_BxT[~b.mask_BxT] == 1)
    targets.append(b.targets_BxT[b.mask_BxT])
  np.testing.assert_array_equal(np.sort(np.concatenate(targets)), tokens[1:])
  # Rows continue across batches, and padding only ends a row.
  rows_BxL = np.concatenate([b.inputs_BxT for b in batches], axis=1)
  mask_BxL = np.concatenate([b.mask_BxT for b in batches], axis=1)
  for row, mask in zip(rows_BxL, mask_BxL):
    assert np.all(np.diff(mask.astype(int)) <= 0)
    assert np.all(np.diff(row[mask]) == 1)
  lengths = mask_BxL.sum(1)
  assert lengths.max() - lengths.min() <= 1 and len(batches) == -(-lengths.max() // bptt)


def test_eval_batches_errors():
  with pytest.raises(ValueError, match="at least 2 tokens"):
    list(batching.eval_batches(np.array([3]), batch_size=2, bptt=3))
  with pytest.raises(ValueError, match="bptt must be a positive int"):
    list(batching.eval_batches(np.arange(9), batch_size=2, bptt=0))


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_shard_rows_concatenate_to_the_batch(num_shards):
  batch = next(batching.eval_batches(np.arange(50), batch_size=4, bptt=3))
  shards = [batching.shard_rows(batch, num_shards, s) for s in range(num_shards)]
  for field in ("inputs_BxT", "targets_BxT", "mask_BxT"):
    np.testing.assert_array_equal(np.concatenate([getattr(s, field) for s in shards]),
                                  getattr(batch, field))
  assert all(s.reset == batch.reset for s in shards)


def test_shard_rows_errors():
  batch = next(batching.eval_batches(np.arange(50), batch_size=4, bptt=3))
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by num_shards=3"):
    batching.shard_rows(batch, 3, 0)
  with pytest.raises(ValueError, match=r"shard_index=2 is outside \[0, num_shards=2\)"):
    batching.shard_rows(batch, 2, 2)


@pytest.mark.parametrize("strategy", ["sequential", "random"])
def test_get_batch_rows_equal_shard_rows(strategy):
  """A process builds only its rows; they are exactly its shard of the whole batch."""
  tokens = np.arange(500)
  whole = batching.get_batch(tokens, batching.BatchPosition(1, 2), batch_size=6, bptt=5,
                             strategy=strategy, seed=3)
  for shard in range(3):
    part = batching.get_batch(tokens, batching.BatchPosition(1, 2), batch_size=6, bptt=5,
                              strategy=strategy, seed=3, rows=(2 * shard, 2 * shard + 2))
    want = batching.shard_rows(whole, 3, shard)
    for got, expected in zip(part, want):
      np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match=r"rows=\(4, 9\) must satisfy"):
    batching.get_batch(tokens, batching.BatchPosition(0, 0), batch_size=6, bptt=5,
                       strategy=strategy, seed=3, rows=(4, 9))
