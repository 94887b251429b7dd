"""Tests for lm_jax.train.config: grouped flags, one declaration each, flat round trip."""
import dataclasses
import os
import subprocess
import sys

import pytest

from lm_jax.data import batching
from lm_jax.models import rnn
from lm_jax.train import optimizers
from lm_jax.train import schedules
from lm_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flags_are_grouped_each_with_help_and_round_trip_flat():
  groups = {g.name for g in dataclasses.fields(TrainConfig)}
  assert groups == {"data", "model", "optimization", "run"}
  names = [f.name for _, f in TrainConfig.flag_fields()]
  assert len(names) == len(set(names)) >= 50
  assert all(f.metadata["help"].strip() for _, f in TrainConfig.flag_fields())
  config = TrainConfig.from_flags(hidden=17, corpus="ptb", lr=0.5, seed=3)
  assert (config.model.hidden, config.data.corpus, config.optimization.lr, config.run.seed) == (
      17, "ptb", 0.5, 3)
  assert TrainConfig.from_flags(**config.flags()) == config
  assert config.replace(seed=4).run.seed == 4 and config.run.seed == 3
  with pytest.raises(ValueError, match=r"unknown flag\(s\) \['hiden'\]"):
    TrainConfig.from_flags(hiden=3)


def test_choices_come_from_the_modules_that_own_them():
  for flag_name, choices in (("cell", rnn.CELL_NAMES), ("optimizer", optimizers.OPTIMIZERS),
                             ("lr_schedule", schedules.SCHEDULES),
                             ("batching", batching.STRATEGIES)):
    with pytest.raises(ValueError, match=f"--{flag_name}='bogus' is not one of"):
      TrainConfig.from_flags(**{flag_name: "bogus"}).validate()
    for choice in choices:
      problems = ""
      try:
        TrainConfig.from_flags(**{flag_name: choice}).validate()
      except ValueError as e:
        problems = str(e)
      assert f"--{flag_name}={choice!r} is not one of" not in problems, problems


def test_train_lm_defines_exactly_the_config_flags_with_their_help():
  out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train_lm.py"),
                        "--helpfull"], capture_output=True, text=True, timeout=120)
  for group, field in TrainConfig.flag_fields():
    assert f"--{field.name}:" in out.stdout or f"--[no]{field.name}:" in out.stdout, field.name
  assert "[model] output layer: full, class" in out.stdout and "--head_cutoffs" in out.stdout
