"""The language-model training loop behind ``experiments/train_lm.py``.

``train_and_evaluate(config)`` loads a corpus, builds the model and optimizer, resumes
from the newest checkpoint in ``config.run.workdir`` if there is one, trains with truncated
BPTT, evaluates exact perplexity on the validation split every epoch (and every
``eval_every`` steps), and writes ``metrics.jsonl``, ``learning_curve.png``,
``vocab.json``, ``config.json``, orbax checkpoints and ``results.json`` to the workdir.
It is :class:`Trainer`'s steps in order: ``restore``, ``train_epoch`` until the step
budget (or the plateau schedule) ends, ``finish``; each step can be called on its own.

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
import optax

from lm_jax import heads
from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import text
from lm_jax.models import language_model as lm_lib
from lm_jax.ops import allocator
from lm_jax.train import checkpointing
from lm_jax.train import evaluation
from lm_jax.train import faults
from lm_jax.train import optimizers
from lm_jax.train import parallel
from lm_jax.train import run_logging
from lm_jax.train import schedules
from lm_jax.train import training
from lm_jax.train.config import FlagError
from lm_jax.train.config import TrainConfig
from lm_jax.train.config import model_fingerprint

NonFiniteLossError = faults.NonFiniteLossError
TrainingInterrupted = faults.TrainingInterrupted
COUNTS_FILE = "token_counts.json"  # [V] training count of each id, as the head saw them


class WorkdirError(FileNotFoundError):
  """A workdir that is not a trained ``train_lm.py`` workdir (no config, no checkpoint)."""


def load_corpus(config: TrainConfig) -> corpora.Corpus:
  data = config.data
  kwargs: dict[str, Any] = {}
  if data.corpus == "synthetic":
    kwargs = dict(seed=config.run.seed, num_train=data.synthetic_train_tokens,
                  num_valid=max(1, data.synthetic_train_tokens // 10),
                  num_test=max(1, data.synthetic_train_tokens // 10))
    if data.synthetic_vocab_size:
      kwargs["vocab_size"] = data.synthetic_vocab_size
  elif data.corpus == "text":
    if not data.text_path:
      raise ValueError("--corpus=text needs --text_path")
    kwargs = dict(path=data.text_path, tokenizer=data.text_tokenizer(),
                  lowercase=data.lowercase, letters_only=data.letters_only,
                  max_tokens=data.text_max_tokens, valid_path=data.valid_path,
                  test_path=data.test_path, valid_fraction=data.valid_fraction,
                  test_fraction=data.test_fraction)
    if data.text_tokenizer() == "bpe":
      kwargs["bpe_vocab_size"] = data.bpe_vocab_size
    else:
      kwargs.update(min_freq=data.min_count, max_size=data.max_vocab or None)
  return corpora.load_corpus(data.corpus, data.data_dir, **kwargs)


def build_model(config: TrainConfig, vocab_size: int, counts: Any = None, *,
                head: heads.OutputHead | None = None) -> lm_lib.LanguageModel:
  """The model the flags describe; ``counts``: [V] training counts (every head but full);
  ``head``: use this head instead of the one ``config`` names (benchmarks of head variants)."""
  model = config.model
  if head is None:
    head = heads.make_head(model.head, vocab_size=vocab_size, counts=counts,
                           init_scale=model.init_scale, **config.head_options())
  return lm_lib.make_language_model(
      vocab_size=vocab_size, embed_size=model.embed, hidden_size=model.hidden,
      num_layers=model.layers, cell=model.cell, dropout=model.dropout,
      init_scale=model.init_scale, head=head, tie_weights=model.tie_weights,
      variational_dropout=model.variational_dropout,
      dtype=None if model.dtype == "float32" else model.dtype)


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """The optimizer the flags describe (clipping included)."""
  opt = config.optimization
  return optimizers.make_optimizer(opt.optimizer, opt.lr, clip=opt.clip or None,
                                   weight_decay=opt.weight_decay)


def check_data(config: TrainConfig, corpus: corpora.Corpus) -> int:
  """Batches per epoch; a ValueError naming the flags if the splits are too small."""
  data = config.data
  try:
    steps_per_epoch = batching.num_batches(len(corpus.train), data.batch_size, data.bptt,
                                           data.batching)
  except ValueError as e:
    raise FlagError([f"--batch_size={data.batch_size} and --bptt={data.bptt} are too "
                     f"large for the train split of {corpus.name}: {e}"]) from None
  if len(corpus.valid) < 2:
    raise FlagError([f"the valid split of {corpus.name} has {len(corpus.valid)} token(s); "
                     "evaluation needs at least 2 (one target): a longer file or a larger "
                     "--valid_fraction"])
  return steps_per_epoch


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


class Trainer:
  """One training run, in steps that can be called (and tested) one at a time.

  ``Trainer(config)`` validates the flags, starts the devices (and processes), loads the
  corpus and builds the model, optimizer and checkpoint manager; it writes nothing.
  :meth:`restore` resumes from the newest checkpoint that matches the run (or stops,
  naming what differs) and only then writes ``config.json``; :meth:`train_epoch` trains to
  the end of the current epoch, reporting, evaluating and checkpointing as the flags say;
  :meth:`evaluate` and :meth:`checkpoint` do one of those now; :meth:`finish` evaluates
  the valid and test splits and writes ``results.json``. :meth:`run` is all of them.
  """

  def __init__(self, config: TrainConfig):
    config.validate()
    self.config = config
    run = config.run
    parallel.initialize_distributed(run.coordinator_address, run.num_processes, run.process_id)
    # The training application's explicit choice (--nokeep_freed_memory skips it), after
    # distributed init and before the backend starts; XLA:CPU only.
    # One line about malloc: keep_freed_memory_on_cpu() logs what it did; skipped, say so.
    if run.keep_freed_memory:
      allocator.keep_freed_memory_on_cpu()
    else:
      run_logging.logger.info("glibc malloc left at its defaults (--nokeep_freed_memory)")
    config.validate(num_devices=jax.device_count(), num_processes=jax.process_count())
    self.t_start = time.time()
    self.workdir = run.workdir
    self.is_writer = jax.process_index() == 0
    self.corpus = corpus = load_corpus(config)
    self.steps_per_epoch = check_data(config, corpus)
    run_logging.logger.info(
        "corpus %s%s: %d types, train/valid/test tokens %d/%d/%s%s; OOV mapped to <unk>: %s",
        corpus.name, f" ({corpus.tokenizer.name} tokenizer)" if corpus.tokenizer else "",
        len(corpus.vocab), len(corpus.train), len(corpus.valid),
        "-" if corpus.test is None else len(corpus.test),
        f", {corpus.chars_per_token('train'):.2f} characters/token"
        if corpus.chars_per_token("train") else "", dict(corpus.oov_counts))
    self.counts = np.bincount(corpus.train, minlength=len(corpus.vocab))
    self.model = build_model(config, len(corpus.vocab), self.counts)
    optimizer = build_optimizer(config)
    self.dp = parallel.make_data_parallel(
        parallel.resolve_mode(run.parallel, jax.device_count()),
        functools.partial(training.train_step, model=self.model, optimizer=optimizer,
                          grad_reduction=config.optimization.grad_reduction,
                          skip_nonfinite=run.skip_nonfinite),
        functools.partial(training.eval_step, model=self.model),
        tables=self.model.head.tables)  # arguments of the steps, never V-sized constants
    run_logging.logger.info("data parallel: %s over %d device(s) in %d process(es)",
                            self.dp.mode, self.dp.num_devices, jax.process_count())
    self.state = self.dp.put_state(training.create_train_state(
        self.model, optimizer, seed=run.seed, batch_size=config.data.batch_size))
    head_params = jax.eval_shape(self.model.init, jax.random.PRNGKey(0)).get("head", {})
    run_logging.logger.info(
        "head %s %s: %d parameters, shapes %s", config.model.head, config.head_options() or "",
        sum(x.size for x in jax.tree.leaves(head_params)),
        jax.tree.map(lambda x: tuple(x.shape), head_params))
    self.total_steps = run.steps or run.epochs * self.steps_per_epoch
    self.fingerprint = model_fingerprint(config, len(corpus.vocab),
                                         data_sha256=corpora.content_sha256(corpus))
    self.manager = None  # made by restore(): orbax creates its directory
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.rows = self.dp.row_range(config.data.batch_size)
    self.step, self.skipped_total = 0, 0
    self.train_seconds, self._clock = 0.0, None  # training time (see training_time)
    self._next_timed_eval = run.eval_every_seconds
    self.plateau, self.window = schedules.PlateauState(), run_logging.TrainWindow()
    self.last_eval: dict[tuple[int, str], dict[str, float]] = {}
    self.pending: list[tuple[int, Any]] = []
    self.writer: run_logging.MetricsWriter | None = None
    self.progress: run_logging.Progress | None = None
    self._compiled = False  # whether this process has run (and so compiled) a train step

  def restore(self) -> int:
    """Resumes from the newest matching checkpoint, if any; then writes ``config.json``.

    Returns the step training continues from. A checkpoint that does not match the run
    raises :class:`~lm_jax.train.checkpointing.CheckpointMismatchError` before any write.
    """
    os.makedirs(self.workdir, exist_ok=True)
    if self.is_writer:
      run_logging.check_or_save_vocab(self.workdir, self.corpus.vocab)
    self.manager = checkpointing.make_manager(os.path.join(self.workdir, "checkpoints"))
    restored = checkpointing.restore_latest(self.manager, self.dp.get_state(self.state),
                                            self.fingerprint)
    evals_at_start = {}
    if restored is not None:
      self.step, restored_state, meta = restored
      _check_position(meta, self.step, self.steps_per_epoch, self.manager)
      self.state = self.dp.put_state(restored_state)
      self.plateau = schedules.PlateauState(**meta["plateau"])
      self.window = run_logging.TrainWindow(**meta.get("window", {}))
      self.skipped_total, evals_at_start = meta.get("skipped_total", 0), meta.get("evals", {})
      self.train_seconds = float(meta.get("train_seconds", 0.0))
      if run_every := self.config.run.eval_every_seconds:
        self._next_timed_eval = (math.floor(self.train_seconds / run_every) + 1) * run_every
      run_logging.logger.info("resumed from step %d (epoch %d, batch %d)", self.step,
                              meta["position"]["epoch"], meta["position"]["index"])
      if self.step > self.total_steps:
        run = self.config.run
        asked = f"--steps={run.steps}" if run.steps else f"--epochs={run.epochs}"
        raise FlagError([f"{asked} ({self.total_steps} steps) is below the {self.step} steps "
                         f"already done in {self.workdir}: ask for more to train on, or use "
                         "a new --workdir"])
    if self.is_writer:  # only now: a checkpoint that does not match stopped the run above
      run_logging.write_json(os.path.join(self.workdir, "config.json"), self.config.flags())
      if self.corpus.tokenizer is not None:  # lm-jax-evaluate / -generate read text with it
        self.corpus.tokenizer.save(os.path.join(self.workdir, evaluation.TOKENIZER_FILE))
      # The head (tree, classes, noise) is built from these; generate.py reads them.
      run_logging.write_json(os.path.join(self.workdir, COUNTS_FILE), self.counts.tolist())
    # Evaluations recorded in the restored checkpoint are not repeated (nor re-logged).
    self.last_eval = {(self.step, split): summary for split, summary in evals_at_start.items()}
    self.writer = run_logging.MetricsWriter(
        self.metrics_path, resume_step=self.step, enabled=self.is_writer,
        keep_at_resume_step=lambda r: (r.get("split") == "train"
                                       or r.get("split") in evals_at_start),
        tensorboard=self.config.run.tensorboard)
    self.progress = run_logging.Progress(
        self.total_steps, self.config.data.batch_size * self.config.data.bptt, self.step)
    return self.step

  def done(self) -> bool:
    return self.step >= self.total_steps or self.plateau.stop or self.budget_spent()

  def training_time(self) -> float:
    """Seconds spent training so far, over all resumes: the train loop's time, less
    evaluation, checkpointing and plotting (``train_time`` in metrics.jsonl; what
    ``--time_budget`` limits). Steps are dispatched asynchronously, so a running clock
    may be ahead of the device by the one step in flight."""
    running = 0.0 if self._clock is None else time.perf_counter() - self._clock
    return self.train_seconds + running

  def budget_spent(self) -> bool:
    budget = self.config.run.time_budget
    return bool(budget) and self.training_time() >= budget

  def _timed_eval_due(self) -> bool:
    """Whether training time has passed the next multiple of ``--eval_every_seconds`` since
    the last evaluation (never in the same step as the budget running out: finish evaluates)."""
    every = self.config.run.eval_every_seconds
    if not every or self.budget_spent():
      return False
    spent = self.training_time()
    if spent < self._next_timed_eval:
      return False
    self._next_timed_eval = (math.floor(spent / every) + 1) * every
    return True

  def _start_clock(self) -> None:
    if self._clock is None:
      self._clock = time.perf_counter()

  def _stop_clock(self, wait: bool = True) -> None:
    """Waits for the dispatched steps (their metrics), then stops the training clock."""
    if self._clock is not None:
      if wait:
        self._drain()
      self.train_seconds += time.perf_counter() - self._clock
      self._clock = None

  def train_epoch(self, stop: faults.StopSignals | None = None) -> None:
    """Trains from the current step to the end of its epoch (or of the step budget).

    Reports train metrics every ``log_every`` steps and at checkpoints, evaluates on
    validation every ``eval_every`` steps (and ``eval_every_seconds`` of training time) and
    at the epoch's end (where the plateau
    schedule acts), and checkpoints every ``checkpoint_every`` steps and at the end. It
    also ends (reporting and checkpointing) once ``--time_budget`` seconds of training
    time (:meth:`training_time`) are spent. With
    ``stop`` (:class:`~lm_jax.train.faults.StopSignals`), a SIGTERM/SIGINT saves a
    checkpoint after the current step and raises ``TrainingInterrupted``.
    """
    config = self.config
    epoch, index = divmod(self.step, self.steps_per_epoch)
    if index == 0 and config.optimization.lr_schedule == "zaremba":
      opt = config.optimization
      self._set_learning_rate(schedules.zaremba_learning_rate(
          opt.lr, epoch + 1, decay_start=opt.lr_decay_start, factor=opt.lr_decay_factor))
    self._start_clock()
    try:
      self._train_to_epoch_end(stop, epoch, index)
    finally:
      self._stop_clock(wait=False)  # a normal return has waited already (checkpoint)

  def _train_to_epoch_end(self, stop, epoch: int, index: int) -> None:
    config, dp, spe = self.config, self.dp, self.steps_per_epoch
    while True:
      batch = batching.get_batch(self.corpus.train, batching.BatchPosition(epoch, index),
                                 batch_size=config.data.batch_size, bptt=config.data.bptt,
                                 strategy=config.data.batching, seed=config.run.seed,
                                 rows=self.rows)
      self.state, metrics = dp.train_step(self.state,
                                          dp.put_batch(batch, config.data.batch_size))
      if self.pending:  # fetch step t-1's metrics after dispatching step t
        self._drain()
      self.pending.append((self.step + 1, metrics))
      self.step, index = self.step + 1, index + 1
      if not self._compiled:  # wait for the first step: its compilation is in no window
        self._drain()
        self._compiled = True
        self.progress.restart(self.step, self.training_time())
      epoch_done = index == spe
      out_of_time = self.budget_spent()
      due_checkpoint = (self.step % config.run.checkpoint_every == 0 or epoch_done
                        or self.step == self.total_steps or out_of_time)
      if self.step % config.run.log_every == 0 or due_checkpoint:
        self.report_train(epoch + 1)
      timed_eval = self._timed_eval_due()
      if (epoch_done or timed_eval
          or (config.run.eval_every and self.step % config.run.eval_every == 0)):
        self._stop_clock()
        valid = self.evaluate("valid", epoch + 1)
        if epoch_done and config.optimization.lr_schedule == "plateau":
          self.plateau, factor = schedules.plateau_update(
              self.plateau, valid["loss_nats"],
              stop_when_stalled=config.optimization.stop_when_stalled)
          self._set_learning_rate(float(training.get_learning_rate(self.state)) * factor)
        self.plot()
      if due_checkpoint:
        self._stop_clock()
        self.checkpoint()
      self._start_clock()
      signum = None if stop is None else faults.any_process(stop.signum)
      if signum is not None:
        if not due_checkpoint:
          self.checkpoint()
        self.manager.wait_until_finished()
        raise TrainingInterrupted(signum, self.step,
                                  os.path.join(str(self.manager.directory), str(self.step)))
      if out_of_time:
        run_logging.logger.info("time budget of %.0f s of training spent at step %d",
                                config.run.time_budget, self.step)
      if epoch_done or self.step >= self.total_steps or out_of_time:
        return

  def _set_learning_rate(self, lr: float) -> None:
    self.state = self.dp.put_state(training.set_learning_rate(self.dp.get_state(self.state), lr))

  def _drain(self) -> None:
    """Fetches dispatched steps' metrics; stops on a non-finite loss unless told to skip."""
    for step_done, metrics in self.pending:
      m = jax.device_get(metrics)
      if float(m["nonfinite"]) and not self.config.run.skip_nonfinite:
        self.manager.wait_until_finished()  # the checkpoint named below must be complete
        last_good = self.manager.latest_step()
        where = ("none" if last_good is None
                 else os.path.join(str(self.manager.directory), str(last_good)))
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step_done} (loss_sum={m['loss_sum']}, "
            f"grad_norm={m['grad_norm']}); nothing was saved after it. Last good checkpoint: "
            f"{where}; lower --lr, set --clip, or pass --skip_nonfinite")
      if float(m["nonfinite"]):
        self.skipped_total += 1
        run_logging.logger.warning("step %d: non-finite loss or gradient; update skipped "
                                   "(%d skipped so far)", step_done, self.skipped_total)
      self.window.add(m)
    self.pending.clear()

  def report_train(self, epoch: int) -> None:
    """Writes the train metrics since the last report (metrics.jsonl and the console)."""
    self._drain()
    window = self.window
    if not (window.steps or window.skipped):
      return
    summary = (training.summarize_loss(window.loss_sum, window.token_count) if window.steps
               else dict.fromkeys(("loss_nats", "perplexity", "bits_per_token"), math.nan))
    rate = self.progress.rate(self.step, self.training_time())
    record = {"step": self.step, "epoch": epoch, "split": "train",
              "loss_nats": summary["loss_nats"], "perplexity": summary["perplexity"],
              "bits_per_token": summary["bits_per_token"], "tokens_per_sec": rate,
              "lr": window.lr,
              "grad_norm": window.grad_norm / window.steps if window.steps else math.nan,
              "skipped_steps": int(window.skipped), "wall_time": time.time() - self.t_start,
              "train_time": self.training_time()}
    if (bpc := self.corpus.bits_per_character("train", summary["bits_per_token"])) is not None:
      record["bits_per_character"] = bpc
    self.writer.write(record)
    skipped = (f" | skipped {int(window.skipped)} (total {self.skipped_total})"
               if self.config.run.skip_nonfinite else "")
    eta = self.progress.eta_seconds(self.step)
    if self.config.run.time_budget:
      skipped += f" | trained {record['train_time']:.0f} of {self.config.run.time_budget:.0f} s"
      eta = min(eta, max(self.config.run.time_budget - record["train_time"], 0.0))

    bpc = (f" bpc {record['bits_per_character']:.3f}" if "bits_per_character" in record
           else "")
    run_logging.logger.info(
        "step %d/%d epoch %d | loss %.4f ppl %s%s | %s tok/s | lr %.4g | gnorm %.3g%s | ETA %s",
        self.step, self.total_steps, epoch, summary["loss_nats"],
        run_logging.format_perplexity(summary["perplexity"]), bpc,
        f"{rate:.0f}" if math.isfinite(rate) else "n/a (first step: compiling)",
        window.lr, record["grad_norm"], skipped,
        run_logging.format_eta(eta))
    window.reset()

  def evaluate(self, split: str, epoch: int) -> dict[str, float]:
    """Exact loss, perplexity and bits per token on ``split`` ("valid" or "test") now."""
    if (self.step, split) in self.last_eval:  # the final evaluation may already have happened
      return self.last_eval[(self.step, split)]
    tokens = getattr(self.corpus, split)
    summary = self.last_eval[(self.step, split)] = parallel.evaluate(
        self.dp, self.state.params, tokens, initial_state=self.model.initial_state,
        batch_size=self.config.data.eval_batch_size, bptt=self.config.data.bptt)
    if (bpc := self.corpus.bits_per_character(split, summary["bits_per_token"])) is not None:
      summary["bits_per_character"] = bpc  # comparable across tokenizers
    self.writer.write({"step": self.step, "epoch": epoch, "split": split, **summary,
                       "wall_time": time.time() - self.t_start,
                       "train_time": self.training_time()})
    bpc = (f", {summary['bits_per_character']:.4f} bits/char"
           if "bits_per_character" in summary else "")
    run_logging.logger.info("step %d %s: loss %.4f nats, perplexity %s, %.4f bits/token%s",
                            self.step, split, summary["loss_nats"],
                            run_logging.format_perplexity(summary["perplexity"]),
                            summary["bits_per_token"], bpc)
    return summary

  def plot(self) -> None:
    if self.is_writer:
      run_logging.plot_learning_curve(
          run_logging.read_metrics(self.metrics_path),
          os.path.join(self.workdir, "learning_curve.png"),
          true_entropy_bits=self.corpus.true_entropy_bits,
          title=f"{self.config.model.cell} on {self.corpus.name}")

  def checkpoint(self) -> None:
    """Saves the state with everything a bit-identical resume needs (async; see orbax)."""
    self._drain()
    epoch, index = divmod(self.step, self.steps_per_epoch)
    meta = {"config": self.fingerprint, "plateau": dataclasses.asdict(self.plateau),
            "position": {"epoch": epoch, "index": index,
                         "steps_per_epoch": self.steps_per_epoch},
            "window": self.window.as_dict(), "skipped_total": self.skipped_total,
            "evals": {split: v for (s, split), v in self.last_eval.items() if s == self.step},
            "train_seconds": self.training_time()}
    checkpointing.save(self.manager, self.step, self.dp.get_state(self.state), meta)

  def finish(self) -> dict[str, Any]:
    """Evaluates valid (and test), writes ``results.json`` and the plot; returns the results."""
    self._drain()
    self.manager.wait_until_finished()
    corpus, step = self.corpus, self.step
    final_epoch = max(1, math.ceil(step / self.steps_per_epoch))
    results: dict[str, Any] = {"steps": step, "epochs": step / self.steps_per_epoch,
                               "skipped_steps": self.skipped_total, "parallel": self.dp.mode,
                               "num_devices": self.dp.num_devices,
                               "num_processes": jax.process_count()}
    for split in ("valid", "test"):
      tokens = getattr(corpus, split)
      if tokens is None or len(tokens) < 2:
        continue
      summary = self.evaluate(split, final_epoch)
      results.update({f"{split}_perplexity": summary["perplexity"],
                      f"{split}_bits_per_token": summary["bits_per_token"],
                      f"{split}_loss_nats": summary["loss_nats"]})
      if "bits_per_character" in summary:
        results[f"{split}_bits_per_character"] = summary["bits_per_character"]
    if corpus.true_entropy_bits is not None:
      results["true_entropy_bits_per_token"] = corpus.true_entropy_bits
      results["valid_gap_to_entropy"] = (results["valid_bits_per_token"]
                                         / corpus.true_entropy_bits - 1.0)
      run_logging.logger.info(
          "validation cross-entropy %.4f bits/token vs the language's true entropy rate %.4f: "
          "gap %.2f%% (H(p) <= H(p, q): the gap is what the model has left to learn)",
          results["valid_bits_per_token"], corpus.true_entropy_bits,
          100 * results["valid_gap_to_entropy"])
    train_records = [r for r in run_logging.read_metrics(self.metrics_path)
                     if r.get("split") == "train"] if self.is_writer else []
    if train_records:
      rates = [r["tokens_per_sec"] for r in train_records
               if r.get("tokens_per_sec") is not None and math.isfinite(r["tokens_per_sec"])]
      results["train_tokens_per_sec_median"] = float(np.median(rates)) if rates else math.nan
    results.update(wall_time_sec=time.time() - self.t_start, train_seconds=self.training_time(),
                   stopped_by_time_budget=self.budget_spent(), flags=self.config.flags(),
                   num_parameters=int(sum(x.size for x in jax.tree.leaves(self.state.params))))
    if self.is_writer:
      run_logging.write_json(os.path.join(self.workdir, "results.json"), results)
    self.plot()
    self.writer.tensorboard.close()
    run_logging.logger.info("results: %s", {k: v for k, v in results.items() if k != "flags"})
    return results

  def run(self) -> dict[str, Any]:
    """restore, train_epoch until done, finish."""
    self.restore()
    with faults.StopSignals() as stop:
      while not self.done():
        self.train_epoch(stop)
    return self.finish()


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Trains and evaluates a recurrent LM as ``config`` says; returns results.json's dict.

  Raises:
    ValueError: bad flags or data too small for them, before any work.
    NonFiniteLossError: NaN/Inf loss or gradient (without ``skip_nonfinite``).
    TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
  """
  return Trainer(config).run()


def load_trained(workdir: str, *, dtype: str | None = None
                 ) -> tuple[TrainConfig, text.Vocab, lm_lib.LanguageModel, Any]:
  """Config, vocabulary, model and the newest decodable checkpoint's parameters of a workdir
  (read-only: a damaged checkpoint is skipped, never moved). ``dtype``: compute in it
  instead of the run's ``--dtype`` (the parameters are float32 either way)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise WorkdirError(f"{config_path} not found: is {workdir!r} a train_lm.py workdir?")
  with open(config_path) as f:
    values = json.load(f)
  if values.get("corpus") == "text":  # written before the 80/10/10 split: 90/10, no test
    values.setdefault("test_fraction", 0.0)
  if dtype:
    values["dtype"] = dtype
  config = TrainConfig.from_flags(**values)
  vocab = text.Vocab.load(os.path.join(workdir, "vocab.json"))
  counts = None
  counts_path = os.path.join(workdir, COUNTS_FILE)
  if os.path.exists(counts_path):  # workdirs from before the heads issue have none (full only)
    with open(counts_path) as f:
      counts = json.load(f)
  elif config.model.head != "full":
    raise WorkdirError(f"{counts_path} not found: head {config.model.head!r} is built "
                            "from the training counts train_lm.py saves there")
  model = build_model(config, len(vocab), counts)
  abstract = jax.eval_shape(lambda: training.create_train_state(
      model, build_optimizer(config), seed=config.run.seed,
      batch_size=config.data.batch_size))
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  restored = checkpointing.restore_latest(manager, abstract,  # never moves a checkpoint
                                          model_fingerprint(config, len(vocab)), read_only=True)
  if restored is None:
    raise WorkdirError(f"no checkpoint in {workdir}/checkpoints: train first (lm-jax-train "
                       f"--workdir={workdir} ...)")
  return config, vocab, model, restored[1].params
