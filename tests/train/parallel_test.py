"""Data parallel on 4 fake CPU devices: shard_map and pmap compute what one device computes."""
import functools
import os

import jax
import numpy as np
import pytest

from lm_jax.data import batching
from lm_jax.models import language_model
from lm_jax.train import optimizers
from lm_jax.train import parallel
from lm_jax.train import run_logging
from lm_jax.train import trainer
from lm_jax.train import training
from lm_jax.train.config import TrainConfig

V, B, T = 13, 4, 6
TINY = dict(corpus="synthetic", synthetic_vocab_size=16, synthetic_train_tokens=2000,
            cell="gru", hidden=16, embed=8, batch_size=4, bptt=8, optimizer="adam", lr=1e-2,
            steps=8, checkpoint_every=4, log_every=2, eval_batch_size=3)
close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)


def _model(dropout=0.0, head=None):
  return language_model.make_language_model(vocab_size=V, embed_size=5, hidden_size=8,
                                            num_layers=2, cell="lstm", dropout=dropout, head=head)


def _dp(mode, model, opt, **kwargs):
  return parallel.make_data_parallel(
      mode, functools.partial(training.train_step, model=model, optimizer=opt, **kwargs),
      functools.partial(training.eval_step, model=model))


def test_resolve_mode():
  assert parallel.resolve_mode("auto", 1) == "none"
  assert parallel.resolve_mode("auto", 4) == "shard_map"
  assert parallel.resolve_mode("pmap", 1) == "pmap"
  with pytest.raises(ValueError, match="parallel='dp'"):
    parallel.resolve_mode("dp", 4)


@pytest.mark.parametrize("mode,dropout,head", [
    ("shard_map", 0.0, None),
    ("pmap", 0.0, None),
    # Dropout masks are drawn per global row and a sampled head's shared draws from one key,
    # so these match one device too.
    ("shard_map", 0.3, None), ("shard_map", 0.3, "nce")])
def test_three_carried_steps_equal_one_device(mode, dropout, head):
  """Params, carried state and metrics after 3 sequential steps equal single-device ones."""
  assert jax.device_count() >= 4
  if head is not None:
    from lm_jax import heads  # pylint: disable=g-import-not-at-top
    head = heads.make_head(head, vocab_size=V, counts=np.arange(V, 0, -1), num_samples=4)
  model = _model(dropout, head)
  opt = optimizers.make_optimizer("adam", 1e-2, clip=1.0)
  tokens = np.random.default_rng(0).integers(0, V, 400).astype(np.int32)
  runs = {}
  for name in ("none", mode):
    dp = _dp(name, model, opt)
    state = dp.put_state(training.create_train_state(model, opt, seed=1, batch_size=B))
    losses = []
    for i in range(3):
      batch = batching.get_batch(tokens, batching.BatchPosition(0, i), batch_size=B, bptt=T,
                                 strategy="sequential", seed=0, rows=dp.row_range(B))
      state, metrics = dp.train_step(state, dp.put_batch(batch, B))
      losses.append(float(metrics["loss_sum"]))
    runs[name] = (dp.get_state(state), losses, dp.num_devices)
  (single, l1, p1), (multi, l4, p4) = runs["none"], runs[mode]
  assert (p1, p4) == (1, 4)
  assert multi.rnn_state[0][0].shape == single.rnn_state[0][0].shape  # global [B, H] layout
  jax.tree.map(close, multi.params, single.params)
  jax.tree.map(close, multi.rnn_state, single.rnn_state)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  assert int(multi.step) == 3


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_evaluate_sums_are_exact_across_devices(mode):
  """Padding rows to the device count adds nothing: token counts exact, losses equal."""
  model = _model()
  params = model.init(jax.random.PRNGKey(0))
  tokens = np.random.default_rng(1).integers(0, V, 23).astype(np.int32)
  opt = optimizers.make_optimizer("sgd", 1.0)
  for eval_rows in (3, 30):  # 3: one padded row on 4 devices; 30: more rows than targets
    want = parallel.evaluate(_dp("none", model, opt), params, tokens,
                             initial_state=model.initial_state, batch_size=eval_rows, bptt=5)
    got = parallel.evaluate(_dp(mode, model, opt), params, tokens,
                            initial_state=model.initial_state, batch_size=eval_rows, bptt=5)
    assert got["tokens"] == want["tokens"] == 22
    np.testing.assert_allclose(got["loss_nats"], want["loss_nats"], rtol=1e-6)


def test_evaluate_with_one_device_equals_training_evaluate():
  model = _model()
  params = model.init(jax.random.PRNGKey(0))
  tokens = np.random.default_rng(1).integers(0, V, 23).astype(np.int32)
  want = training.evaluate(params, batching.eval_batches(tokens, batch_size=3, bptt=5),
                           model=model, batch_size=3)
  got = parallel.evaluate(_dp("none", model, optimizers.make_optimizer("sgd", 1.0)), params,
                          tokens, initial_state=model.initial_state, batch_size=3, bptt=5)
  assert got == want


def test_pad_rows():
  batch = batching.Batch(np.ones((3, 2), np.int32), np.ones((3, 2), np.int32),
                         np.ones((3, 2), bool), True)
  padded = parallel.pad_rows(batch, 4)
  assert padded.inputs_BxT.shape == (4, 2) and padded.mask_BxT.sum() == 6
  assert padded.inputs_BxT[3].tolist() == [1, 1] and padded.reset
  assert parallel.pad_rows(batch, 3) is batch


def test_shard_map_row_range_and_bad_batch():
  model, opt = _model(), optimizers.make_optimizer("sgd", 1.0)
  dp = _dp("shard_map", model, opt)
  assert dp.row_range(8) == (0, 8)  # one process holds every row
  with pytest.raises(ValueError, match="6 rows is not divisible by 4 devices"):
    dp.row_range(6)
  with pytest.raises(ValueError, match="mode='tpu'"):
    _dp("tpu", model, opt)


def _run(workdir, **overrides):
  return trainer.train_and_evaluate(TrainConfig.from_flags(workdir=str(workdir), **{**TINY, **overrides}))


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in run_logging.TIMING_KEYS}
          for r in run_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _assert_records_close(a, b):
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for x, y in zip(a, b):
    for key in ("loss_nats", "perplexity", "bits_per_token", "grad_norm", "lr"):
      if key in x:
        np.testing.assert_allclose(x[key], y[key], rtol=1e-6, err_msg=f"{key} at {x['step']}")


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("none")
  results = _run(workdir, parallel="none")
  return workdir, results


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_trainer_run_equals_single_device(tmp_path, single_device_run, mode):
  """A whole run (sequential batches, carried state, evaluation) on 4 devices equals 1 device."""
  none_dir, none_results = single_device_run
  results = _run(tmp_path, parallel=mode)
  assert (results["parallel"], results["num_devices"]) == (mode, 4)
  assert none_results["num_devices"] == 1
  _assert_records_close(_records(tmp_path), _records(none_dir))
  jax.tree.map(close, trainer.load_trained(str(tmp_path))[3],
               trainer.load_trained(str(none_dir))[3])


def test_resume_on_another_device_count(tmp_path, single_device_run):
  """Checkpoints hold the global layout: 4 devices for 4 steps, then 1 device, equals 1 device."""
  none_dir, _ = single_device_run
  _run(tmp_path, parallel="shard_map", steps=4)
  _run(tmp_path, parallel="none")
  _assert_records_close(_records(tmp_path), _records(none_dir))
  jax.tree.map(close, trainer.load_trained(str(tmp_path))[3],
               trainer.load_trained(str(none_dir))[3])


@pytest.mark.parametrize("overrides, match", [
    (dict(batch_size=6), r"--batch_size=6 is not divisible by the 4 devices"),
    (dict(batch_size=6, parallel="pmap"), r"--batch_size=6 .* of --parallel=pmap"),
    (dict(parallel="gpus"), r"--parallel='gpus'"),
    (dict(num_processes=2), r"--num_processes=2 needs --coordinator_address"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, --num_processes=2\)")])
def test_bad_parallel_flags_fail_before_any_work(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    _run(tmp_path, **overrides)
  assert not os.listdir(tmp_path)


def test_device_checks_of_validate():
  config = TrainConfig.from_flags(batch_size=6)
  config.validate(num_devices=1)  # one device: anything goes
  TrainConfig.from_flags(batch_size=6, parallel="none").validate(num_devices=4)
  TrainConfig.from_flags(batch_size=4, parallel="pmap").validate(num_devices=1)  # pmap on one device is fine
  with pytest.raises(ValueError, match=r"2 processes x 2 local devices = 4"):
    config.validate(num_devices=4, num_processes=2)
  with pytest.raises(ValueError, match=r"--parallel=pmap cannot span 2 processes"):
    TrainConfig.from_flags(batch_size=4, parallel="pmap").validate(num_devices=4, num_processes=2)
