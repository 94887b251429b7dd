import pytest

from lm_jax.train import schedules


def test_zaremba_small_recipe():
  # Zaremba et al. 2014 small: lr 1 for 4 epochs, then halved every epoch.
  rates = [schedules.zaremba_learning_rate(1.0, e, decay_start=4, factor=2.0) for e in range(1, 8)]
  assert rates == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


def test_zaremba_rejects_epoch_zero():
  with pytest.raises(ValueError, match="1-based"):
    schedules.zaremba_learning_rate(1.0, 0, decay_start=4, factor=2.0)


def test_plateau_halves_from_first_stall_on():
  state = schedules.PlateauState()
  factors = []
  for valid in [5.0, 4.0, 3.999, 3.5, 3.4]:
    state, factor = schedules.plateau_update(state, valid, min_improvement=0.003)
    factors.append(factor)
  # 3.999 is not a 0.3% improvement on 4.0: halving starts there and continues.
  assert factors == [1.0, 1.0, 0.5, 0.5, 0.5]
  assert state.best_valid_loss == 3.4 and state.halving and not state.stop


def test_plateau_stops_when_halving_stalls():
  state = schedules.PlateauState(best_valid_loss=4.0, halving=True)
  state, _ = schedules.plateau_update(state, 4.1, stop_when_stalled=True)
  assert state.stop
  state2, _ = schedules.plateau_update(schedules.PlateauState(4.0, True), 4.1)
  assert not state2.stop
