"""Checkpoint restore: newest readable wins, corrupt ones are set aside, mismatches are named."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.train import checkpointing

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


def _files(manager, step):
  root = os.path.join(str(manager.directory), str(step))
  return [os.path.join(r, n) for r, _, names in os.walk(root) for n in names]


@pytest.mark.parametrize("damage", ["truncate_largest", "remove_state_dir", "remove_step_metadata",
                                    "empty_step_dir"])
def test_partial_checkpoint_falls_back_with_a_warning_naming_it(tmp_path, caplog, damage):
  """A kill mid-write or a disk problem: truncated data, missing directories or metadata."""
  import shutil
  manager = _saved(tmp_path, steps=(1, 2, 3))
  step_dir = os.path.join(str(manager.directory), "3")
  if damage == "truncate_largest":
    largest = max(_files(manager, 3), key=os.path.getsize)
    with open(largest, "r+b") as f:
      f.truncate(os.path.getsize(largest) // 2)
  elif damage == "remove_state_dir":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif damage == "remove_step_metadata":
    for path in _files(manager, 3):
      if os.path.basename(path).startswith("_"):
        os.remove(path)
    shutil.rmtree(os.path.join(step_dir, "meta"))
  else:
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  manager.reload()
  step, state, meta = checkpointing.restore_latest(manager, _state(0), CONFIG)
  assert step == 2 and meta["position"] == 2
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
  assert any(step_dir in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_missing_checkpoint_directory_is_no_checkpoint(tmp_path):
  import shutil
  manager = _saved(tmp_path, steps=(1,))
  shutil.rmtree(str(manager.directory))
  manager.reload()
  assert checkpointing.restore_latest(manager, _state(0), CONFIG) is None


def test_none_readable_names_every_bad_one(tmp_path):
  manager = _saved(tmp_path)
  _corrupt(manager, 1)
  _corrupt(manager, 2)
  with pytest.raises(RuntimeError, match=r"(?s)no readable checkpoint.*ckpt/2: .*ckpt/1: "):
    checkpointing.restore_latest(manager, _state(0), CONFIG)


def test_restores_onto_this_process_whatever_the_saved_sharding(tmp_path):
  """A target without shardings restores on the first local device (not the saved topology)."""
  import jax
  manager = _saved(tmp_path)
  abstract = jax.eval_shape(lambda: _state(0))
  step, state, _ = checkpointing.restore_latest(manager, abstract, CONFIG)
  assert step == 2 and state["w"].sharding.device_set == {jax.local_devices()[0]}


def test_older_checkpoint_without_head_fields_matches_the_full_head(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), async_save=False)
  checkpointing.save(manager, 1, _state(1), {"config": CONFIG, "position": 1})
  manager.wait_until_finished()
  current = {**CONFIG, "head": "full", "head_options": {}}
  assert checkpointing.restore_latest(manager, _state(0), current)[0] == 1
  with pytest.raises(checkpointing.CheckpointMismatchError, match="head: checkpoint has 'full'"):
    checkpointing.restore_latest(manager, _state(0), {**current, "head": "hsm"})
