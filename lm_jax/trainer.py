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
that is killed and restarted end bit-identical to one that was not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from lm_jax import batching
from lm_jax import checkpointing
from lm_jax import corpora
from lm_jax import language_model as lm_lib
from lm_jax import run_logging
from lm_jax import schedules
from lm_jax import training
from lm_jax.config import TrainConfig, model_fingerprint


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


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
                  letters_only=config.letters_only)
  return corpora.load_corpus(config.corpus, config.data_dir, **kwargs)


def build_model(config: TrainConfig, vocab_size: int) -> lm_lib.LanguageModel:
  return lm_lib.make_language_model(
      vocab_size=vocab_size, embed_size=config.embed, hidden_size=config.hidden,
      num_layers=config.layers, cell=config.cell, dropout=config.dropout,
      init_scale=config.init_scale)


def _learning_rate_for_epoch(config: TrainConfig, epoch: int, current: float) -> float:
  if config.lr_schedule == "zaremba":
    return schedules.zaremba_learning_rate(config.lr, epoch, decay_start=config.lr_decay_start,
                                           factor=config.lr_decay_factor)
  return current


def _write_json(path: str, payload: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _check_vocab(workdir: str, vocab) -> None:
  path = os.path.join(workdir, "vocab.json")
  if os.path.exists(path):
    saved = type(vocab).load(path)
    if saved != vocab:
      raise checkpointing.CheckpointMismatchError(
          f"{path} (size {len(saved)}) differs from the vocabulary of this run's corpus "
          f"(size {len(vocab)}); use a new --workdir or the original corpus flags")
  else:
    vocab.save(path)


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Trains and evaluates a recurrent LM as ``config`` says; returns results.json's dict."""
  config.validate()
  t_start = time.time()
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0
  corpus = load_corpus(config)
  vocab = corpus.vocab
  run_logging.logger.info("corpus %s: %d types, train/valid/test tokens %d/%d/%s; OOV mapped to <unk>: %s",
               corpus.name, len(vocab), len(corpus.train), len(corpus.valid),
               "-" if corpus.test is None else len(corpus.test), getattr(corpus, "oov_counts", {}))
  if is_writer:
    _check_vocab(workdir, vocab)
    _write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(config))

  model = build_model(config, len(vocab))
  optimizer = training.make_optimizer(config.optimizer, config.lr, clip=config.clip or None)
  state = training.create_train_state(model, optimizer, seed=config.seed,
                                      batch_size=config.batch_size)
  steps_per_epoch = batching.num_batches(len(corpus.train), config.batch_size, config.bptt,
                                         config.batching)
  total_steps = config.steps or config.epochs * steps_per_epoch
  fingerprint = model_fingerprint(config, len(vocab))

  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  plateau = schedules.PlateauState()
  restored = checkpointing.restore_latest(manager, state, fingerprint)
  start_step = 0
  if restored is not None:
    start_step, state, meta = restored
    plateau = schedules.PlateauState(**meta["plateau"])
    run_logging.logger.info("resumed from step %d (epoch %d, batch %d)", start_step,
                 meta["position"]["epoch"], meta["position"]["index"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  writer = run_logging.MetricsWriter(metrics_path, resume_step=start_step, enabled=is_writer)

  train_fn = jax.jit(lambda s, b: training.train_step(
      s, b, model=model, optimizer=optimizer, grad_reduction=config.grad_reduction),
      donate_argnums=0)
  eval_fn = jax.jit(lambda p, s, b: training.eval_step(p, s, b, model=model))

  def evaluate(split_tokens):
    batches = batching.eval_batches(split_tokens, batch_size=config.eval_batch_size,
                                    bptt=config.bptt)
    return training.evaluate(state.params, batches, model=model,
                             batch_size=config.eval_batch_size, eval_fn=eval_fn)

  progress = run_logging.Progress(total_steps, config.batch_size * config.bptt, start_step)
  window = {"loss_sum": 0.0, "token_count": 0.0, "grad_norm": 0.0, "steps": 0}
  pending: list[tuple[int, Any]] = []

  def drain():
    """Fetches dispatched steps' metrics; stops on a non-finite loss."""
    for step_done, metrics in pending:
      m = jax.device_get(metrics)
      if not (math.isfinite(float(m["loss_sum"])) and math.isfinite(float(m["grad_norm"]))):
        last_good = manager.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step_done} (loss_sum={m['loss_sum']}, "
            f"grad_norm={m['grad_norm']}); nothing was saved after it. Last good checkpoint: "
            f"{'none' if last_good is None else os.path.join(str(manager.directory), str(last_good))}")
      window["loss_sum"] += float(m["loss_sum"])
      window["token_count"] += float(m["token_count"])
      window["grad_norm"] += float(m["grad_norm"])
      window["steps"] += 1
      window["lr"] = float(m["learning_rate"])
    pending.clear()

  def report_train(step, epoch):
    drain()
    if not window["steps"]:
      return
    summary = training.summarize_loss(window["loss_sum"], window["token_count"])
    rate = progress.rate(step)
    record = {"step": step, "epoch": epoch, "split": "train", "loss_nats": summary["loss_nats"],
              "perplexity": summary["perplexity"], "bits_per_token": summary["bits_per_token"],
              "tokens_per_sec": rate, "lr": window["lr"],
              "grad_norm": window["grad_norm"] / window["steps"],
              "wall_time": time.time() - t_start}
    writer.write(record)
    run_logging.logger.info("step %d/%d epoch %d | loss %.4f ppl %.2f | %.0f tok/s | lr %.4g | gnorm %.3g"
                 " | ETA %s", step, total_steps, epoch, summary["loss_nats"],
                 summary["perplexity"], rate, window["lr"], record["grad_norm"],
                 run_logging.format_eta(progress.eta_seconds(step)))
    window.update(loss_sum=0.0, token_count=0.0, grad_norm=0.0, steps=0)

  # Evaluations already recorded at the restored step are not repeated (nor re-logged).
  last_eval: dict[tuple[int, str], dict[str, Any]] = {
      (r["step"], r["split"]): r for r in writer.kept
      if r["step"] == start_step and r.get("split") in ("valid", "test")}

  def report_eval(step, epoch, split, tokens):
    if (step, split) in last_eval:  # the final evaluation may already have happened
      return last_eval[(step, split)]
    summary = last_eval[(step, split)] = evaluate(tokens)
    record = {"step": step, "epoch": epoch, "split": split, **summary,
              "wall_time": time.time() - t_start}
    writer.write(record)
    run_logging.logger.info("step %d %s: loss %.4f nats, perplexity %.2f, %.4f bits/token", step, split,
                 summary["loss_nats"], summary["perplexity"], summary["bits_per_token"])
    return summary

  def checkpoint(step):
    epoch, index = divmod(step, steps_per_epoch)
    save_meta = {"config": fingerprint, "plateau": dataclasses.asdict(plateau),
                 "position": {"epoch": epoch, "index": index}}
    checkpointing.save(manager, step, state, save_meta)

  step = start_step
  while step < total_steps and not plateau.stop:
    epoch, index = divmod(step, steps_per_epoch)
    if index == 0:
      lr = _learning_rate_for_epoch(config, epoch + 1, float(training.get_learning_rate(state)))
      state = training.set_learning_rate(state, lr)
    batch = batching.get_batch(corpus.train, batching.BatchPosition(epoch, index),
                               batch_size=config.batch_size, bptt=config.bptt,
                               strategy=config.batching, seed=config.seed)
    state, metrics = train_fn(state, training.batch_to_arrays(batch))
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
        state = training.set_learning_rate(
            state, float(training.get_learning_rate(state)) * factor)
      if is_writer:
        run_logging.plot_learning_curve(run_logging.read_metrics(metrics_path),
                                        os.path.join(workdir, "learning_curve.png"),
                                        true_entropy_bits=corpus.true_entropy_bits,
                                        title=f"{config.cell} on {corpus.name}")
    if due_checkpoint:
      checkpoint(step)
  drain()
  manager.wait_until_finished()

  final_epoch = max(1, math.ceil(step / steps_per_epoch))
  results: dict[str, Any] = {"steps": step, "epochs": step / steps_per_epoch}
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
    _write_json(os.path.join(workdir, "results.json"), results)
    run_logging.plot_learning_curve(run_logging.read_metrics(metrics_path),
                                    os.path.join(workdir, "learning_curve.png"),
                                    true_entropy_bits=corpus.true_entropy_bits,
                                    title=f"{config.cell} on {corpus.name}")
  run_logging.logger.info("results: %s", {k: v for k, v in results.items() if k != "flags"})
  return results
