"""Checkpoint restore: newest readable wins, corrupt ones are set aside, mismatches are named."""
import json
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


# Issue 22: a checkpoint is moved only on proof that its bytes are damaged (the same decoding
# error twice); any other error while reading leaves every checkpoint where it is.

def _tree(root):
  """Every file and directory under ``root``, relative: what moving a checkpoint changes."""
  return sorted(os.path.relpath(os.path.join(r, n), root)
                for r, dirs, files in os.walk(root) for n in dirs + files)


def _inject(monkeypatch, manager, errors, item):
  """Makes orbax's ``manager.restore`` of ``item`` raise ``errors(attempt)`` (None: read).

  Returns the list of steps it was called with for ``item``.
  """
  real, calls = manager.restore, []

  def restore(step, args=None):
    if item in args.keys():
      calls.append(step)
      error = errors(len(calls))
      if error is not None:
        raise error
    return real(step, args=args)
  monkeypatch.setattr(manager, "restore", restore)
  return calls


READ_ERRORS = {  # what storage, memory, time and devices raise: none shows a damaged file
    "os_error": lambda: OSError(5, "Input/output error"),
    "missing_file": lambda: FileNotFoundError(2, "No such file or directory", "state/d/x"),
    "memory": MemoryError,
    "timeout": lambda: TimeoutError("read timed out"),
    "futures_timeout": lambda: __import__("concurrent.futures").futures.TimeoutError(),
    "sharding_value_error": lambda: ValueError(
        "One of device_put args was given the sharding of NamedSharding(mesh=Mesh('data': 4), "
        "spec=PartitionSpec('data',)), which implies that the global size of its dimension 0 "
        "should be divisible by 4, but it is equal to 3"),
    "device_runtime_error": lambda: RuntimeError("INTERNAL: device 3 is not addressable"),
    "tensorstore_unavailable": lambda: ValueError(
        'UNAVAILABLE: Error reading local file "state/d/x": Input/output error'),
}


@pytest.mark.parametrize("item", ["meta", "state"])
@pytest.mark.parametrize("kind", sorted(READ_ERRORS))
def test_read_error_moves_nothing_and_stops_with_it(tmp_path, monkeypatch, kind, item):
  manager = _saved(tmp_path)
  before = _tree(tmp_path)
  error = READ_ERRORS[kind]()
  calls = _inject(monkeypatch, manager, lambda _: error, item)
  with pytest.raises(type(error)) as raised:
    checkpointing.restore_latest(manager, _state(0), CONFIG, attempts=3, backoff_s=0)
  assert raised.value is error
  assert calls == [2, 2, 2]  # retried, and no older checkpoint tried in its place
  note = "\n".join(getattr(raised.value, "__notes__", []))
  assert os.path.join(str(manager.directory), "2") in note and "nothing was moved" in note
  assert _tree(tmp_path) == before


def test_interrupt_while_reading_moves_nothing_and_is_not_retried(tmp_path, monkeypatch):
  manager = _saved(tmp_path)
  before = _tree(tmp_path)
  calls = _inject(monkeypatch, manager, lambda _: KeyboardInterrupt(), "state")
  with pytest.raises(KeyboardInterrupt) as raised:
    checkpointing.restore_latest(manager, _state(0), CONFIG, backoff_s=0)
  assert calls == [2]
  assert any("ckpt/2" in n and "nothing was moved" in n for n in raised.value.__notes__)
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), MemoryError(),
                                   json.JSONDecodeError("Expecting value", "", 0)])
def test_error_that_goes_away_on_retry_restores_normally(tmp_path, monkeypatch, error):
  manager = _saved(tmp_path)
  before = _tree(tmp_path)
  calls = _inject(monkeypatch, manager, lambda attempt: error if attempt == 1 else None, "state")
  step, state, _ = checkpointing.restore_latest(manager, _state(0), CONFIG, backoff_s=0)
  assert step == 2 and calls == [2, 2]
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
  assert _tree(tmp_path) == before


def test_decoding_error_that_changes_between_reads_moves_nothing(tmp_path, monkeypatch):
  """Different garbage on each read is a flaky read, not a damaged file."""
  manager = _saved(tmp_path)
  before = _tree(tmp_path)
  _inject(monkeypatch, manager,
          lambda attempt: json.JSONDecodeError("Expecting value", "", attempt), "meta")
  with pytest.raises(json.JSONDecodeError):
    checkpointing.restore_latest(manager, _state(0), CONFIG, attempts=3, backoff_s=0)
  assert _tree(tmp_path) == before


def _garble_largest_data_file(manager, step):
  data = os.path.join(str(manager.directory), str(step), "state", "d")
  victim = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
  with open(victim, "wb") as f:
    f.write(b"\x00garbage")


# A failed tensorstore read can leave a future that completes after orbax closed its event loop
# ("Event loop is closed", ignored by Python): noise from orbax, not from this code.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_bytes_are_moved_only_after_failing_to_decode_twice(tmp_path, monkeypatch,
                                                                    caplog):
  manager = _saved(tmp_path)
  _garble_largest_data_file(manager, 2)
  real, reads = manager.item_metadata, []
  monkeypatch.setattr(manager, "item_metadata", lambda step: reads.append(step) or real(step))
  step, state, _ = checkpointing.restore_latest(manager, _state(0), CONFIG, backoff_s=0)
  assert step == 1 and reads[:2] == [2, 2] and 2 not in reads[2:]
  np.testing.assert_array_equal(state["w"], [1.0, 1.0, 1.0])
  assert [p.split("-")[0] for p in os.listdir(str(manager.directory) + ".quarantine")] == ["2"]
  assert any("ckpt/2" in r.getMessage() and "twice" in r.getMessage() for r in caplog.records)


def test_decode_failures_are_told_apart_from_read_failures():
  decode = [json.JSONDecodeError("Expecting value", "", 0), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"),
            ValueError('DATA_LOSS: Error decoding local file "m": Error decoding manifest'),
            ValueError('OUT_OF_RANGE: Requested byte range [0, 239) is not valid for value '
                       'of size 8'),
            ValueError('FAILED_PRECONDITION: Error reading local file "_sharding": Invalid JSON'),
            KeyError('Item "state" was not found in the checkpoint. Available items: []')]
  read = [OSError(5, "EIO"), FileNotFoundError(2, "missing"), MemoryError(), TimeoutError(),
          ValueError("UNAVAILABLE: Input/output error"), ValueError("NOT_FOUND: missing"),
          ValueError("the global size of its dimension 0 should be divisible by 4"),
          RuntimeError("INTERNAL: device"), KeyError("w"), KeyboardInterrupt()]
  assert [checkpointing.is_decode_failure(e) for e in decode] == [True] * len(decode)
  assert [checkpointing.is_decode_failure(e) for e in read] == [False] * len(read)


def test_tensorstore_errors_naming_the_same_files_count_as_the_same():
  """Tensorstore names whichever array of a damaged file failed first, which varies."""
  def error(array, file):
    return ValueError(f'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "{array}/.zarray" '
                      f'in OCDBT database at local file "/c/2/state/": Error reading local file '
                      f'"/c/2/state/d/{file}": Requested byte range [0, 239) is not valid')
  assert (checkpointing._signature(error("w", "ab12"))
          == checkpointing._signature(error("step", "ab12")))
  assert (checkpointing._signature(error("w", "ab12"))
          != checkpointing._signature(error("w", "cd34")))


# A failed tensorstore read can leave a future that completes after orbax closed its event loop
# ("Event loop is closed", ignored by Python): noise from orbax, not from this code.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_only_never_moves_a_checkpoint_even_a_damaged_one(tmp_path, caplog):
  manager = _saved(tmp_path)
  _garble_largest_data_file(manager, 2)
  before = _tree(tmp_path)
  step, _, _ = checkpointing.restore_latest(manager, _state(0), CONFIG, read_only=True,
                                            backoff_s=0)
  assert step == 1 and _tree(tmp_path) == before
  assert any("left it where it is" in r.getMessage() for r in caplog.records)
  _garble_largest_data_file(manager, 1)
  before = _tree(tmp_path)
  with pytest.raises(RuntimeError, match=r"(?s)nothing was moved.*ckpt/2: .*ckpt/1: "):
    checkpointing.restore_latest(manager, _state(0), CONFIG, read_only=True, backoff_s=0)
  assert _tree(tmp_path) == before


def test_every_process_stops_when_another_cannot_read(tmp_path, monkeypatch):
  """Several processes: this one read the checkpoint, another did not (an all-gather of
  verdicts, simulated here): every process stops, nothing is moved."""
  manager = _saved(tmp_path)
  before = _tree(tmp_path)
  gathered = []
  monkeypatch.setattr(checkpointing, "_worst_over_processes",
                      lambda verdict, path: gathered.append(verdict) or checkpointing._FAILED)
  with pytest.raises(checkpointing.CheckpointReadError, match="another process.*nothing was moved"):
    checkpointing.restore_latest(manager, _state(0), CONFIG, attempts=3, backoff_s=0)
  assert gathered == [checkpointing._OK] * 3  # every attempt in lockstep with the others
  assert _tree(tmp_path) == before


def test_every_process_sets_aside_the_step_another_cannot_decode(tmp_path, monkeypatch):
  """Another process's bytes of step 2 failed to decode twice (simulated): this process (0,
  the mover) sets step 2 aside too, though it read it, and every process uses step 1."""
  manager = _saved(tmp_path)
  verdicts = iter([checkpointing._DECODED_BADLY_TWICE])
  monkeypatch.setattr(checkpointing, "_worst_over_processes",
                      lambda verdict, path: max(verdict, next(verdicts, checkpointing._OK)))
  step, _, _ = checkpointing.restore_latest(manager, _state(0), CONFIG, backoff_s=0)
  assert step == 1
  assert [p.split("-")[0] for p in os.listdir(str(manager.directory) + ".quarantine")] == ["2"]


def test_verdicts_out_of_step_with_orbax_barriers_stop_every_process(monkeypatch):
  """A process that failed inside orbax's restore skipped its closing barrier (an all-gather
  of a name hash); its verdict then meets another process's barrier: detected, all stop."""
  import jax
  from jax.experimental import multihost_utils
  tagged = lambda verdict: checkpointing._VERDICT_TAG * 4 + verdict
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gathered = [tagged(checkpointing._OK), tagged(checkpointing._DECODED_BADLY_TWICE)]
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.asarray(gathered))
  assert checkpointing._worst_over_processes(0, "ckpt/2") == checkpointing._DECODED_BADLY_TWICE
  gathered = [tagged(checkpointing._FAILED), 2327561758]
  with pytest.raises(checkpointing.CheckpointReadError, match="out of step.*nothing was moved"):
    checkpointing._worst_over_processes(checkpointing._FAILED, "ckpt/2")
