"""Checkpoint restore: newest readable wins, corrupt ones are set aside, mismatches are named."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import checkpointing

CONFIG = {"vocab_size": 10, "hidden": 4}


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _saved(tmp_path, steps=(1, 2)):
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), async_save=False)
  for step in steps:
    checkpointing.save(manager, step, _state(step), {"config": CONFIG, "position": step})
  manager.wait_until_finished()
  return manager


def test_restores_newest(tmp_path):
  manager = _saved(tmp_path)
  step, state, meta = checkpointing.restore_latest(manager, _state(0), CONFIG)
  assert step == 2 and meta["position"] == 2
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])


def test_empty_directory_gives_none(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), async_save=False)
  assert checkpointing.restore_latest(manager, _state(0), CONFIG) is None


def _corrupt(manager, step):
  for root, _, files in os.walk(os.path.join(str(manager.directory), str(step))):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


def test_corrupt_newest_is_quarantined_and_previous_used(tmp_path, caplog):
  manager = _saved(tmp_path)
  _corrupt(manager, 2)
  step, state, _ = checkpointing.restore_latest(manager, _state(0), CONFIG)
  assert step == 1
  np.testing.assert_array_equal(state["w"], [1.0, 1.0, 1.0])
  assert os.listdir(str(manager.directory) + ".quarantine")
  assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  manager = _saved(tmp_path)
  _corrupt(manager, 1)
  _corrupt(manager, 2)
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    checkpointing.restore_latest(manager, _state(0), CONFIG)


def test_config_mismatch_names_the_field(tmp_path):
  manager = _saved(tmp_path)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="hidden: checkpoint has 4"):
    checkpointing.restore_latest(manager, _state(0), {**CONFIG, "hidden": 8})
