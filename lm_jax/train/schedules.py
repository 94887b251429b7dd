r"""Epoch-level learning-rate schedules for recurrent LM training, applied on the host.

Two classic recipes:

* Zaremba et al. 2014 ("Recurrent Neural Network Regularization", section 4.1): keep the
  learning rate for ``decay_start`` epochs, then divide it by ``factor`` every epoch,

  .. math:: \eta_e = \eta_0 \, f^{-\max(0,\; e - e_0)}, \qquad e = 1, 2, \dots

* Mikolov 2012 (thesis, section 3.3.1; the RNNLM toolkit): keep the rate while the
  validation entropy improves by a relative ``min_improvement``; from the first epoch that
  does not, halve it every epoch (and optionally stop when halving no longer helps).

Both are pure functions of small host state, so the state goes into checkpoints as JSON.
"""

from __future__ import annotations

import dataclasses

SCHEDULES = ("constant", "zaremba", "plateau")


def zaremba_learning_rate(base_lr: float, epoch: int, *, decay_start: int, factor: float) -> float:
  """Learning rate for 1-based ``epoch``: constant, then divided by ``factor`` per epoch."""
  if epoch < 1:
    raise ValueError(f"epoch is 1-based, got {epoch}")
  return base_lr / factor ** max(0, epoch - decay_start)


@dataclasses.dataclass
class PlateauState:
  """Mikolov's halving schedule: host state, JSON-serialisable."""

  best_valid_loss: float | None = None
  halving: bool = False
  stop: bool = False


def plateau_update(state: PlateauState, valid_loss: float, *, min_improvement: float = 0.003,
                   stop_when_stalled: bool = False) -> tuple[PlateauState, float]:
  """Updates Mikolov's schedule after an epoch; returns (state, factor for the lr).

  The factor is 0.5 from the first epoch whose validation loss failed to improve on
  the best by the relative ``min_improvement``, and every epoch after; 1.0 before.
  """
  best = state.best_valid_loss
  improved = best is None or valid_loss < best * (1.0 - min_improvement)
  stop = state.stop or (state.halving and not improved and stop_when_stalled)
  halving = state.halving or not improved
  new_best = valid_loss if best is None else min(best, valid_loss)
  return PlateauState(new_best, halving, stop), (0.5 if halving else 1.0)
