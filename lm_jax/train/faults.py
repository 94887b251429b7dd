"""Stopping a training run cleanly: termination signals and divergence.

``SIGTERM`` (what schedulers and ``kill`` send) and ``SIGINT`` (Ctrl-C) do not kill the
run mid-step: :class:`StopSignals` records them, the loop finishes the step it is on,
saves a checkpoint and raises :class:`TrainingInterrupted`, and ``train_lm.py`` exits
with status ``128 + signal number`` (143 for SIGTERM, 130 for Ctrl-C), as a shell does.
A second Ctrl-C raises ``KeyboardInterrupt`` at once. In a multi-process run every
process must stop at the same step, so the processes agree (:func:`any_process`) on
whether any of them was signalled.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

from lm_jax.train import run_logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
  """A stop signal arrived; the run saved a checkpoint at ``step`` and stopped."""

  def __init__(self, signum: int, step: int, checkpoint: str):
    self.signum, self.step, self.checkpoint = signum, step, checkpoint
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved "
                     f"checkpoint {checkpoint}; rerun the same command to resume")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopSignals:
  """Context manager that turns SIGTERM / SIGINT into a flag polled between steps.

  Handlers are installed only in the main thread (elsewhere Python forbids it, and the
  flag simply stays unset); the previous handlers come back on exit.
  """

  def __init__(self, signals=STOP_SIGNALS):
    self.signals = tuple(signals)
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    if self.signum is None:
      self.signum = signum
      run_logging.logger.warning("received %s: finishing the current step, then saving a "
                                 "checkpoint and stopping", signal.Signals(signum).name)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()


def any_process(signum: int | None) -> int | None:
  """The first nonzero signal number any process saw (every process gets the same answer).

  One process: ``signum`` itself. Several: an all-gather, which waits for the devices,
  so the loop calls it once per step only in multi-process runs.
  """
  if jax.process_count() == 1:
    return signum
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  seen = np.asarray(multihost_utils.process_allgather(np.int32(signum or 0)))
  nonzero = seen[seen != 0]
  return int(nonzero[0]) if nonzero.size else None
