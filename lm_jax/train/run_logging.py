"""What a training run leaves behind for a person: metrics.jsonl, console progress, plots.

JSON files (``metrics.jsonl``, ``results.json``, ``config.json``) are strict JSON (RFC 8259),
readable by any parser (jq, JavaScript, pandas): a non-finite number (the perplexity of a
diverged run, whose ``loss_nats`` overflows ``e^loss``; the NaN loss of a window whose
every step was skipped) is written as ``null``. :func:`read_metrics` reads ``null`` back as
NaN, so every metric stays a float.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable

from lm_jax.train.checkpointing import CheckpointMismatchError

logger = logging.getLogger("lm_jax")


# metrics.jsonl fields that measure time, so differ between otherwise identical runs.
TIMING_KEYS = ("wall_time", "train_time", "tokens_per_sec")


def configure_console(level: int = logging.INFO) -> None:
  """Sends lm_jax's progress lines to stderr (orbax's INFO chatter stays off)."""
  if not any(getattr(h, "_lm_jax", False) for h in logger.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._lm_jax = True  # pylint: disable=protected-access
    logger.addHandler(handler)
  logger.setLevel(level)
  logger.propagate = False


def strict_json(value: Any) -> Any:
  """``value`` with every non-finite float (in dicts, lists and tuples) replaced by None."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def dumps(value: Any, **kwargs: Any) -> str:
  """Strict JSON text of ``value`` (non-finite floats as ``null``)."""
  return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def format_perplexity(perplexity: float) -> str:
  """Two decimals while readable; from 1e6 on (a diverging run) ``%.4g``: ``3.2e+230``, ``inf``."""
  return f"{perplexity:.2f}" if abs(perplexity) < 1e6 else f"{perplexity:.4g}"


def write_json(path: str, payload: Any) -> None:
  """Writes strict JSON atomically (a temporary file, then a rename)."""
  with open(path + ".tmp", "w") as f:
    f.write(dumps(payload, indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def check_or_save_vocab(workdir: str, vocab) -> None:
  """Saves ``vocab.json``, or checks that the one already there is the same vocabulary."""
  path = os.path.join(workdir, "vocab.json")
  if os.path.exists(path):
    saved = type(vocab).load(path)
    if saved != vocab:
      raise CheckpointMismatchError(
          f"{path} (size {len(saved)}) differs from the vocabulary of this run's corpus "
          f"(size {len(vocab)}); use a new --workdir or the original corpus flags (a "
          "--text_path workdir trained before the 80/10/10 split, 2026-12-05, needs "
          "--test_fraction=0)")
  else:
    vocab.save(path)


class MetricsWriter:
  """Appends one JSON object per report to ``metrics.jsonl``.

  On resume the file is first cut back to the reports at or before the restored step,
  so a run that was killed and restarted ends with the same records (apart from wall
  times and speeds) as one that never stopped.
  """

  def __init__(self, path: str, *, resume_step: int | None = None, enabled: bool = True,
               keep_at_resume_step: Callable[[dict[str, Any]], bool] | None = None,
               tensorboard: bool = False):
    """``keep_at_resume_step``: which records AT ``resume_step`` to keep (default all);
    ``tensorboard``: also write :class:`TensorBoardWriter` events in ``tensorboard/`` beside
    the file."""
    self.path = path
    self.enabled = enabled
    self.kept: list[dict[str, Any]] = []
    self.tensorboard = TensorBoardWriter(
        os.path.join(os.path.dirname(path) or ".", "tensorboard"),
        enabled=enabled and tensorboard, resume_step=resume_step or None)
    if not enabled:
      return
    kept = []
    if resume_step is not None and os.path.exists(path):
      keep = keep_at_resume_step or (lambda r: True)
      kept = [r for r in read_metrics(path) if r.get("step", 0) < resume_step
              or (r.get("step", 0) == resume_step and keep(r))]
    with open(path + ".tmp", "w") as f:
      for record in kept:
        f.write(dumps(record) + "\n")
    os.replace(path + ".tmp", path)
    self.kept = kept

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(dumps(record) + "\n")
      f.flush()
    self.tensorboard.write(record)


class TensorBoardWriter:
  """TensorBoard event files beside ``metrics.jsonl`` (``<workdir>/tensorboard``), written with
  ``tensorboardX`` (the install extra ``tensorboard``) when it is installed: each record's
  loss, perplexity, bits, learning rate, gradient norm and tokens/s as ``<split>/<name>``
  scalars at its step. Without the package it writes nothing and says so once."""

  SCALARS = ("loss_nats", "perplexity", "bits_per_token", "bits_per_character", "lr",
             "grad_norm", "tokens_per_sec")

  def __init__(self, logdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.logdir, self.writer, self.summary_writer = logdir, None, None
    # Resumed: events after the restored step are dropped, as metrics.jsonl's records are.
    self.purge_step = None if resume_step is None else resume_step + 1
    if not enabled:
      return
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (an optional extra)
    except ImportError:
      logger.info("TensorBoard: tensorboardX is not installed (pip install 'lm_jax["
                  "tensorboard]'); metrics.jsonl only")
      return
    self.summary_writer = tensorboardX.SummaryWriter  # opened at the first record

  def write(self, record: dict[str, Any]) -> None:
    if self.summary_writer is None:
      return
    if self.writer is None:
      self.writer = self.summary_writer(self.logdir, purge_step=self.purge_step)
    split, step = record.get("split", "train"), int(record.get("step", 0))
    for name in self.SCALARS:
      value = record.get(name)
      if isinstance(value, (int, float)) and math.isfinite(value):
        self.writer.add_scalar(f"{split}/{name}", value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class TrainWindow:
  """Sums of the train metrics since the last report, as plain floats.

  Checkpoints store :meth:`as_dict`, so a run stopped between reports resumes with the
  same sums and writes the same next report. Steps whose loss or gradient was not
  finite (skipped by ``--skip_nonfinite``) count in ``skipped`` and nowhere else.
  """
  FIELDS = ("loss_sum", "token_count", "grad_norm", "steps", "skipped", "lr")

  def __init__(self, **values: float):
    unknown = set(values) - set(self.FIELDS)
    if unknown:
      raise ValueError(f"unknown TrainWindow fields {sorted(unknown)}")
    for name in self.FIELDS:
      setattr(self, name, float(values.get(name, 0.0)))

  def add(self, metrics: dict[str, float]) -> None:
    self.lr = float(metrics["learning_rate"])
    if float(metrics.get("nonfinite", 0.0)):
      self.skipped += 1
      return
    self.loss_sum += float(metrics["loss_sum"])
    self.token_count += float(metrics["token_count"])
    self.grad_norm += float(metrics["grad_norm"])
    self.steps += 1

  def reset(self) -> None:
    self.__init__()

  def as_dict(self) -> dict[str, float]:
    return {name: getattr(self, name) for name in self.FIELDS}


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All complete records of a metrics.jsonl file (a torn last line is dropped); a ``null``
  metric (non-finite when written) reads as NaN."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break
      records.append(nan_for_null(record))
  return records


def nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
  """A strict-JSON record with each ``null`` metric (non-finite when written) read as NaN."""
  return {k: math.nan if v is None else v for k, v in record.items()}


class Progress:
  """Console progress: tokens/s, loss, perplexity and ETA, at most every ``every`` s."""

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.start_step = start_step
    self.start_time = time.time()
    self.last_time = self.start_time
    self.last_step = start_step

  def rate(self, step: int, clock: float | None = None) -> float:
    """Tokens per second since the previous call (or :meth:`restart`), by ``clock`` (the
    trainer's training time, which leaves out evaluation and checkpointing; default the wall
    clock); NaN when no step was taken since."""
    now = time.time() if clock is None else clock
    tokens = (step - self.last_step) * self.tokens_per_step
    elapsed = now - self.last_time
    self.last_time, self.last_step = now, step
    return tokens / elapsed if tokens and elapsed > 0 else math.nan

  def restart(self, step: int, clock: float | None = None) -> None:
    """Starts the next window here: after the first step, so compilation is in no window."""
    self.last_time, self.last_step = (time.time() if clock is None else clock), step

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return math.nan
    return (time.time() - self.start_time) / done * (self.total_steps - step)


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_learning_curve(records: Iterable[dict[str, Any]], path: str, *,
                        true_entropy_bits: float | None = None, title: str = "") -> None:
  """Bits per token against step for the train and evaluation splits, as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  by_split: dict[str, tuple[list, list]] = {}
  for r in records:
    if "bits_per_token" in r and "split" in r:
      steps, values = by_split.setdefault(r["split"], ([], []))
      steps.append(r["step"])
      values.append(r["bits_per_token"])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for split, (steps, values) in sorted(by_split.items()):
    style = "-" if split == "train" else "o-"
    ax.plot(steps, values, style, label=split, markersize=4)
  if true_entropy_bits is not None:
    ax.axhline(true_entropy_bits, color="k", linestyle="--",
               label=f"true entropy rate {true_entropy_bits:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per token")
  if by_split:
    # 2^bits capped at 2^1000: a diverged run's thousands of bits would give infinite limits.
    sec = ax.secondary_yaxis("right", functions=(lambda b: _safe_exp2(b),
                                                  lambda p: _safe_log2(p)))
    sec.set_ylabel("perplexity")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _safe_exp2(b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.exp2(np.minimum(b, 1000.0))


def _safe_log2(p):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.log2(np.maximum(p, 1e-12))
