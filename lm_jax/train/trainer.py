"""The language-model training loop behind ``experiments/train_lm.py``.

``train_and_evaluate(config)`` loads a corpus, builds the model and optimizer, resumes
from the newest checkpoint in ``config.workdir`` if there is one, trains with truncated
BPTT, evaluates exact perplexity on the validation split every epoch (and every
``eval_every`` steps), and writes ``metrics.jsonl``, ``learning_curve.png``,
``vocab.json``, ``config.json``, orbax checkpoints and ``results.json`` to the workdir.

Determinism and resume: the batch at step ``s`` is a pure function of
``(seed, epoch, index)``, the dropout key is ``fold_in(rng, step)``, and the carried
hidden state is part of the checkpointed ``TrainState``; train metrics are reported at
every checkpoint step as well as every ``log_every`` steps. Together these make a run
that is killed and restarted end bit-identical to one that was not. A checkpoint also
keeps the train-metric sums since the last report and the evaluations done at its step,
so a stop between reports (SIGTERM / Ctrl-C: finish the step, save, raise
``TrainingInterrupted``) resumes bit-identically too.

Devices and processes: ``lm_jax.train.parallel`` runs the per-device steps under ``shard_map``
(default with several devices), ``pmap`` or plain ``jit``; every process builds only its
rows of each batch, only process 0 writes files other than checkpoints, and orbax
saves and restores checkpoints collectively. A NaN/Inf loss or gradient stops the run
naming the step and the last good checkpoint, or with ``skip_nonfinite`` the update is
skipped inside the jitted step and counted (``skipped_steps`` in metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from lm_jax import heads
from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import text
from lm_jax.models import language_model as lm_lib
from lm_jax.ops import allocator
from lm_jax.train import checkpointing
from lm_jax.train import faults
from lm_jax.train import optimizers
from lm_jax.train import parallel
from lm_jax.train import run_logging
from lm_jax.train import schedules
from lm_jax.train import training
from lm_jax.train.config import TrainConfig, model_fingerprint


NonFiniteLossError = faults.NonFiniteLossError
TrainingInterrupted = faults.TrainingInterrupted


def load_corpus(config: TrainConfig) -> corpora.Corpus:
  kwargs: dict[str, Any] = {}
  if config.corpus == "synthetic":
    kwargs = dict(seed=config.seed, num_train=config.synthetic_train_tokens,
                  num_valid=max(1, config.synthetic_train_tokens // 10),
                  num_test=max(1, config.synthetic_train_tokens // 10))
    if config.synthetic_vocab_size:
      kwargs["vocab_size"] = config.synthetic_vocab_size
  elif config.corpus == "text":
    if not config.text_path:
      raise ValueError("--corpus=text needs --text_path")
    kwargs = dict(path=config.text_path, level=config.level, lowercase=config.lowercase,
                  letters_only=config.letters_only, max_tokens=config.text_max_tokens)
  return corpora.load_corpus(config.corpus, config.data_dir, **kwargs)


COUNTS_FILE = "token_counts.json"  # [V] training count of each id, as the head saw them


def build_model(config: TrainConfig, vocab_size: int, counts: Any = None, *,
                head: heads.OutputHead | None = None) -> lm_lib.LanguageModel:
  """The model the flags describe; ``counts``: [V] training counts (every head but full);
  ``head``: use this head instead of the one ``config`` names (benchmarks of head variants)."""
  if head is None:
    head = heads.make_head(config.head, vocab_size=vocab_size, counts=counts,
                           init_scale=config.init_scale, **config.head_options())
  return lm_lib.make_language_model(
      vocab_size=vocab_size, embed_size=config.embed, hidden_size=config.hidden,
      num_layers=config.layers, cell=config.cell, dropout=config.dropout,
      init_scale=config.init_scale, head=head, tie_weights=config.tie_weights,
      variational_dropout=config.variational_dropout)


def check_data(config: TrainConfig, corpus: corpora.Corpus) -> int:
  """Batches per epoch; a ValueError naming the flags if the splits are too small."""
  try:
    steps_per_epoch = batching.num_batches(len(corpus.train), config.batch_size, config.bptt,
                                           config.batching)
  except ValueError as e:
    raise ValueError(f"--batch_size={config.batch_size} and --bptt={config.bptt} are too "
                     f"large for the train split of {corpus.name}: {e}") from None
  if len(corpus.valid) < 2:
    raise ValueError(f"the valid split of {corpus.name} has {len(corpus.valid)} token(s); "
                     "evaluation needs at least 2 (one target)")
  return steps_per_epoch


def _learning_rate_for_epoch(config: TrainConfig, epoch: int, current: float) -> float:
  if config.lr_schedule == "zaremba":
    return schedules.zaremba_learning_rate(config.lr, epoch, decay_start=config.lr_decay_start,
                                           factor=config.lr_decay_factor)
  return current


def _check_position(meta: dict, step: int, steps_per_epoch: int, manager) -> None:
  """The data position saved with a checkpoint must be the one its step gives this run
  (else the data itself changed, e.g. a different corpus file): stop, naming both."""
  saved = meta.get("position", {})
  expected = dict(zip(("epoch", "index"), divmod(step, steps_per_epoch)),
                  steps_per_epoch=steps_per_epoch)
  differing = {k: (saved[k], v) for k, v in expected.items() if k in saved and saved[k] != v}
  if differing:
    path = os.path.join(str(manager.directory), str(step))
    raise checkpointing.CheckpointMismatchError(
        f"checkpoint {path} was saved at data position {saved}, but step {step} of this run's "
        f"data is {expected} (the training data changed); nothing was written or moved. "
        "Rerun on the original data, or pass another --workdir to start fresh.")


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Trains and evaluates a recurrent LM as ``config`` says; returns results.json's dict.

  Raises:
    ValueError: bad flags or data too small for them, before any work.
    NonFiniteLossError: NaN/Inf loss or gradient (without ``skip_nonfinite``).
    TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
  """
  config.validate()
  if not config.keep_freed_memory:
    allocator.disable_cpu_default()
  parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
  # After distributed init (it must come before the backend starts): XLA:CPU only.
  run_logging.logger.info("glibc malloc keeps freed memory: %s (XLA:CPU only; backend %s)",
                          allocator.apply_cpu_default(), jax.default_backend())
  config.validate(num_devices=jax.device_count(), num_processes=jax.process_count())
  mode = parallel.resolve_mode(config.parallel, jax.device_count())
  t_start = time.time()
  workdir = config.workdir
  is_writer = jax.process_index() == 0
  corpus = load_corpus(config)
  vocab = corpus.vocab
  steps_per_epoch = check_data(config, corpus)
  run_logging.logger.info(
      "corpus %s: %d types, train/valid/test tokens %d/%d/%s; OOV mapped to <unk>: %s",
      corpus.name, len(vocab), len(corpus.train), len(corpus.valid),
      "-" if corpus.test is None else len(corpus.test), dict(corpus.oov_counts))
  os.makedirs(workdir, exist_ok=True)
  if is_writer:
    run_logging.check_or_save_vocab(workdir, vocab)

  counts = np.bincount(corpus.train, minlength=len(vocab))
  model = build_model(config, len(vocab), counts)
  optimizer = optimizers.make_optimizer(config.optimizer, config.lr, clip=config.clip or None,
                                      weight_decay=config.weight_decay)
  dp = parallel.make_data_parallel(
      mode, functools.partial(training.train_step, model=model, optimizer=optimizer,
                              grad_reduction=config.grad_reduction,
                              skip_nonfinite=config.skip_nonfinite),
      functools.partial(training.eval_step, model=model))
  run_logging.logger.info("data parallel: %s over %d device(s) in %d process(es)", dp.mode,
                          dp.num_devices, jax.process_count())
  state = dp.put_state(training.create_train_state(model, optimizer, seed=config.seed,
                                                   batch_size=config.batch_size))
  total_steps = config.steps or config.epochs * steps_per_epoch
  fingerprint = model_fingerprint(config, len(vocab))

  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  plateau, window, skipped_total = schedules.PlateauState(), run_logging.TrainWindow(), 0
  restored = checkpointing.restore_latest(manager, dp.get_state(state), fingerprint)
  start_step, evals_at_start = 0, {}
  if restored is not None:
    start_step, restored_state, meta = restored
    _check_position(meta, start_step, steps_per_epoch, manager)
    state = dp.put_state(restored_state)
    plateau = schedules.PlateauState(**meta["plateau"])
    window = run_logging.TrainWindow(**meta.get("window", {}))
    skipped_total, evals_at_start = meta.get("skipped_total", 0), meta.get("evals", {})
    run_logging.logger.info("resumed from step %d (epoch %d, batch %d)", start_step,
                            meta["position"]["epoch"], meta["position"]["index"])
  # Written only now: a checkpoint that does not match this run stops it above, before any write.
  if is_writer:
    run_logging.write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(config))
    # The head (tree, classes, noise) is built from these; generate.py reads them.
    run_logging.write_json(os.path.join(workdir, COUNTS_FILE), counts.tolist())
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  writer = run_logging.MetricsWriter(
      metrics_path, resume_step=start_step, enabled=is_writer,
      keep_at_resume_step=lambda r: r.get("split") == "train" or r.get("split") in evals_at_start)
  # Evaluations recorded in the restored checkpoint are not repeated (nor re-logged).
  last_eval = {(start_step, split): summary for split, summary in evals_at_start.items()}
  progress = run_logging.Progress(total_steps, config.batch_size * config.bptt, start_step)
  pending: list[tuple[int, Any]] = []
  rows = dp.row_range(config.batch_size)

  def drain():
    """Fetches dispatched steps' metrics; stops on a non-finite loss unless told to skip."""
    nonlocal skipped_total
    for step_done, metrics in pending:
      m = jax.device_get(metrics)
      if float(m["nonfinite"]) and not config.skip_nonfinite:
        manager.wait_until_finished()  # the checkpoint named below must be complete
        last_good = manager.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step_done} (loss_sum={m['loss_sum']}, "
            f"grad_norm={m['grad_norm']}); nothing was saved after it. Last good checkpoint: "
            f"{'none' if last_good is None else os.path.join(str(manager.directory), str(last_good))}"
            "; lower --lr, set --clip, or pass --skip_nonfinite")
      if float(m["nonfinite"]):
        skipped_total += 1
        run_logging.logger.warning("step %d: non-finite loss or gradient; update skipped "
                                   "(%d skipped so far)", step_done, skipped_total)
      window.add(m)
    pending.clear()

  def report_train(step, epoch):
    drain()
    if not (window.steps or window.skipped):
      return
    summary = (training.summarize_loss(window.loss_sum, window.token_count) if window.steps
               else dict.fromkeys(("loss_nats", "perplexity", "bits_per_token"), math.nan))
    rate = progress.rate(step)
    record = {"step": step, "epoch": epoch, "split": "train", "loss_nats": summary["loss_nats"],
              "perplexity": summary["perplexity"], "bits_per_token": summary["bits_per_token"],
              "tokens_per_sec": rate, "lr": window.lr,
              "grad_norm": window.grad_norm / window.steps if window.steps else math.nan,
              "skipped_steps": int(window.skipped), "wall_time": time.time() - t_start}
    writer.write(record)
    run_logging.logger.info(
        "step %d/%d epoch %d | loss %.4f ppl %.2f | %.0f tok/s | lr %.4g | gnorm %.3g%s | ETA %s",
        step, total_steps, epoch, summary["loss_nats"], summary["perplexity"], rate, window.lr,
        record["grad_norm"], f" | skipped {int(window.skipped)} (total {skipped_total})"
        if config.skip_nonfinite else "", run_logging.format_eta(progress.eta_seconds(step)))
    window.reset()

  def report_eval(step, epoch, split, tokens):
    if (step, split) in last_eval:  # the final evaluation may already have happened
      return last_eval[(step, split)]
    summary = last_eval[(step, split)] = parallel.evaluate(
        dp, state.params, tokens, initial_state=model.initial_state,
        batch_size=config.eval_batch_size, bptt=config.bptt)
    writer.write({"step": step, "epoch": epoch, "split": split, **summary,
                  "wall_time": time.time() - t_start})
    run_logging.logger.info("step %d %s: loss %.4f nats, perplexity %.2f, %.4f bits/token", step,
                            split, summary["loss_nats"], summary["perplexity"],
                            summary["bits_per_token"])
    return summary

  def plot():
    if is_writer:
      run_logging.plot_learning_curve(run_logging.read_metrics(metrics_path),
                                      os.path.join(workdir, "learning_curve.png"),
                                      true_entropy_bits=corpus.true_entropy_bits,
                                      title=f"{config.cell} on {corpus.name}")

  def checkpoint(step):
    drain()
    epoch, index = divmod(step, steps_per_epoch)
    save_meta = {"config": fingerprint, "plateau": dataclasses.asdict(plateau),
                 "position": {"epoch": epoch, "index": index,
                              "steps_per_epoch": steps_per_epoch},
                 "window": window.as_dict(),
                 "skipped_total": skipped_total,
                 "evals": {split: v for (s, split), v in last_eval.items() if s == step}}
    checkpointing.save(manager, step, dp.get_state(state), save_meta)

  step = start_step
  with faults.StopSignals() as stop:
    while step < total_steps and not plateau.stop:
      epoch, index = divmod(step, steps_per_epoch)
      if index == 0:
        lr = _learning_rate_for_epoch(config, epoch + 1, float(training.get_learning_rate(state)))
        state = dp.put_state(training.set_learning_rate(dp.get_state(state), lr))
      batch = batching.get_batch(corpus.train, batching.BatchPosition(epoch, index),
                                 batch_size=config.batch_size, bptt=config.bptt,
                                 strategy=config.batching, seed=config.seed, rows=rows)
      state, metrics = dp.train_step(state, dp.put_batch(batch, config.batch_size))
      if len(pending) >= 1:  # fetch step t-1's metrics after dispatching step t
        drain()
      pending.append((step + 1, metrics))
      step += 1
      epoch_done = step % steps_per_epoch == 0
      due_checkpoint = step % config.checkpoint_every == 0 or epoch_done or step == total_steps
      if step % config.log_every == 0 or due_checkpoint:
        report_train(step, epoch + 1)
      if epoch_done or (config.eval_every and step % config.eval_every == 0):
        valid = report_eval(step, epoch + 1, "valid", corpus.valid)
        if epoch_done and config.lr_schedule == "plateau":
          plateau, factor = schedules.plateau_update(plateau, valid["loss_nats"],
                                                     stop_when_stalled=config.stop_when_stalled)
          lr = float(training.get_learning_rate(state)) * factor
          state = dp.put_state(training.set_learning_rate(dp.get_state(state), lr))
        plot()
      if due_checkpoint:
        checkpoint(step)
      signum = faults.any_process(stop.signum)
      if signum is not None:
        if not due_checkpoint:
          checkpoint(step)
        manager.wait_until_finished()
        raise TrainingInterrupted(signum, step, os.path.join(str(manager.directory), str(step)))
  drain()
  manager.wait_until_finished()

  final_epoch = max(1, math.ceil(step / steps_per_epoch))
  results: dict[str, Any] = {"steps": step, "epochs": step / steps_per_epoch,
                             "skipped_steps": skipped_total, "parallel": dp.mode,
                             "num_devices": dp.num_devices, "num_processes": jax.process_count()}
  valid = report_eval(step, final_epoch, "valid", corpus.valid)
  results.update(valid_perplexity=valid["perplexity"], valid_bits_per_token=valid["bits_per_token"],
                 valid_loss_nats=valid["loss_nats"])
  if corpus.test is not None and len(corpus.test) > 1:
    test = report_eval(step, final_epoch, "test", corpus.test)
    results.update(test_perplexity=test["perplexity"], test_bits_per_token=test["bits_per_token"],
                   test_loss_nats=test["loss_nats"])
  if corpus.true_entropy_bits is not None:
    results["true_entropy_bits_per_token"] = corpus.true_entropy_bits
    results["valid_gap_to_entropy"] = valid["bits_per_token"] / corpus.true_entropy_bits - 1.0
    run_logging.logger.info(
        "validation cross-entropy %.4f bits/token vs the language's true entropy rate %.4f: "
        "gap %.2f%% (H(p) <= H(p, q): the gap is what the model has left to learn)",
        valid["bits_per_token"], corpus.true_entropy_bits, 100 * results["valid_gap_to_entropy"])
  train_records = [r for r in run_logging.read_metrics(metrics_path)
                   if r.get("split") == "train"] if is_writer else []
  if train_records:
    results["train_tokens_per_sec_median"] = float(np.median(
        [r["tokens_per_sec"] for r in train_records[1:] or train_records]))
  results.update(wall_time_sec=time.time() - t_start, flags=dataclasses.asdict(config),
                 num_parameters=int(sum(x.size for x in jax.tree.leaves(state.params))))
  if is_writer:
    run_logging.write_json(os.path.join(workdir, "results.json"), results)
  plot()
  run_logging.logger.info("results: %s", {k: v for k, v in results.items() if k != "flags"})
  return results


def load_trained(workdir: str) -> tuple[TrainConfig, text.Vocab, lm_lib.LanguageModel, Any]:
  """Config, vocabulary, model and the newest checkpoint's parameters of a workdir."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a train_lm.py workdir?")
  with open(config_path) as f:
    config = TrainConfig(**json.load(f))
  vocab = text.Vocab.load(os.path.join(workdir, "vocab.json"))
  counts = None
  counts_path = os.path.join(workdir, COUNTS_FILE)
  if os.path.exists(counts_path):  # workdirs from before the heads issue have none (full only)
    with open(counts_path) as f:
      counts = json.load(f)
  elif config.head != "full":
    raise FileNotFoundError(f"{counts_path} not found: head {config.head!r} is built from the "
                            "training counts train_lm.py saves there")
  model = build_model(config, len(vocab), counts)
  optimizer = optimizers.make_optimizer(config.optimizer, config.lr, clip=config.clip or None,
                                      weight_decay=config.weight_decay)
  abstract = jax.eval_shape(lambda: training.create_train_state(
      model, optimizer, seed=config.seed, batch_size=config.batch_size))
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  restored = checkpointing.restore_latest(manager, abstract,
                                          model_fingerprint(config, len(vocab)))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  return config, vocab, model, restored[1].params
