"""Orbax checkpoints of a run: the train state plus the host state needed to resume exactly.

Each checkpoint holds two items: ``state`` (the ``TrainState`` pytree: params, optimizer
state with its learning rate, RNG key, step and the carried hidden state) and ``meta``
(JSON: data position, schedule state, and a ``config`` fingerprint of what determines
the shapes: vocabulary size, model flags). Restoring compares the fingerprint with the
current run's and fails with a message naming every differing field, rather than
somewhere deep inside orbax with a shape error.

A checkpoint is moved aside only on proof that its bytes are damaged: the same decoding
error twice in a row (:func:`is_decode_failure`). Any other error while reading (I/O,
memory, a timeout, an interrupt, devices or shardings) is retried a few times and then
raised with every checkpoint left where it is. In a run of several processes each read is
retried in lockstep and every process takes the same decision (an all-gather of a small
verdict); read-only callers never move anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, Callable

from absl import logging
import jax
import msgpack
import numpy as np
import orbax.checkpoint as ocp

from lm_jax.data.corpora import LEVEL_TOKENIZERS as LEVELS
from lm_jax.train.config import FINGERPRINT_DEFAULTS


class CheckpointMismatchError(ValueError):
  """A readable checkpoint was written by a run whose flags or state tree differ."""


class CheckpointReadError(RuntimeError):
  """Another process could not read a checkpoint (not shown to be damaged); nothing moved."""


# Tensorstore raises ValueError("<absl status code>: ..."); these codes say that bytes it
# read are not what the format needs (truncated, garbage), not that reading them failed.
# Kept narrow on purpose (a miss stops the run, which loses nothing; a false match moves a
# good checkpoint): "parse"/"decode" wording can also come from an older reader of a newer
# format, so only what corrupting real files produced is matched.
_DECODE_STATUS = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE):|^FAILED_PRECONDITION:.*"
                            r"(Invalid JSON|[Cc]orrupt|[Cc]hecksum)")
# Orbax's KeyError when a listed step directory lacks one of its items (state, meta).
_MISSING_ITEM = re.compile(r"was not found in the checkpoint|Unknown key: ")
_OK, _DECODED_BADLY_TWICE, _FAILED = 0, 1, 2  # per-read verdicts, worst last
_VERDICT_TAG = 0x1D5A  # sent with each verdict: tells it from orbax's own barrier all-gathers


def is_decode_failure(error: BaseException) -> bool:
  """Whether ``error`` says a checkpoint's bytes or layout are invalid, rather than that
  reading them failed: a JSON, msgpack or text decoding error, tensorstore's
  ``DATA_LOSS``/``OUT_OF_RANGE`` (or ``FAILED_PRECONDITION`` on invalid content), or
  orbax's missing-item ``KeyError``. ``OSError`` (a missing file too), ``MemoryError``,
  timeouts and jax's sharding or device errors are not."""
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError,
                        msgpack.exceptions.UnpackException, msgpack.exceptions.ExtraData)):
    return True
  if isinstance(error, KeyError):
    return bool(_MISSING_ITEM.search(str(error)))
  return isinstance(error, ValueError) and bool(_DECODE_STATUS.search(str(error)))


def _signature(error: BaseException) -> str:
  """What must repeat for two failed reads to count as the same: the error's type and
  message; for tensorstore, its status code and the files it names (it reports whichever
  array failed first, which varies from read to read)."""
  text = str(error)
  files = sorted(set(re.findall(r'local file "([^"]+)"', text)))
  if files:
    text = text.split(":", 1)[0] + " in " + ", ".join(files)
  return f"{type(error).__qualname__}: {text}"


def _describe(error: BaseException | None) -> str:
  return "on another process" if error is None else f"{type(error).__name__}: {error}"


def _worst_over_processes(verdict: int, path: str) -> int:
  """The largest of every process's ``verdict`` (an all-gather; itself on one process).

  Orbax's restore ends with a barrier that is itself an all-gather, which a process whose
  read raised has skipped; if the processes fell out of step that way, raises (all stop).
  """
  if jax.process_count() == 1:
    return verdict
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(np.int32(_VERDICT_TAG * 4 + verdict)))
  if np.any(gathered // 4 != _VERDICT_TAG):
    raise CheckpointReadError(
        f"the processes fell out of step reading checkpoint {path} (one failed inside orbax's "
        "restore, another finished it); nothing was moved. Rerun to resume.")
  return int(np.max(gathered % 4))


def _read(read: Callable[[], Any], path: str, *, attempts: int, backoff_s: float
          ) -> tuple[Any, str | None]:
  """``(read(), None)``, retrying failures; ``(None, why)`` once ``path``'s bytes failed to
  decode with the same error twice in a row (on some process; none failed otherwise).

  Every process takes part in every attempt and gets the same outcome. An interrupt is
  raised at once; any other failure that lasts ``attempts`` tries is raised with a note
  naming ``path`` (:class:`CheckpointReadError` on a process whose own read worked).
  Moves nothing.
  """
  previous, error = None, None
  for attempt in range(attempts):
    value, error = None, None
    try:
      value = read()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    except BaseException as e:  # KeyboardInterrupt, SystemExit: no retry
      e.add_note(f"interrupted while reading checkpoint {path}; nothing was moved")
      raise
    signature = None if error is None else _signature(error)
    verdict = (_OK if error is None else _DECODED_BADLY_TWICE
               if is_decode_failure(error) and signature == previous else _FAILED)
    try:
      worst = _worst_over_processes(verdict, path)
    except CheckpointReadError as e:
      raise e from error
    if worst == _OK:
      return value, None
    if worst == _DECODED_BADLY_TWICE:
      return None, _describe(error)
    previous = signature
    if attempt + 1 < attempts:
      delay = backoff_s * 2 ** attempt
      logging.warning("reading checkpoint %s failed (%s); attempt %d of %d in %.1f s", path,
                      _describe(error), attempt + 2, attempts, delay)
      time.sleep(delay)
  note = (f"checkpoint {path} could not be read in {attempts} attempts; nothing was moved "
          "(every checkpoint is where it was): only bytes that fail to decode the same way "
          "twice in a row show a damaged checkpoint, and this error is not that. Fix its "
          "cause and rerun to resume.")
  logging.error("%s (%s)", note, _describe(error))
  if error is None:
    raise CheckpointReadError("another process: " + note)
  error.add_note(note)
  raise error


def make_manager(directory: str, *, max_to_keep: int = 3, async_save: bool = True
                 ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  # Handlers named up front, so that a fresh process can read a checkpoint's state metadata
  # (its tree, shapes and dtypes) before restoring it.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Saves ``state`` and ``meta`` under ``step`` (asynchronously if the manager is)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def _restore_target(x: Any) -> jax.ShapeDtypeStruct:
  """The leaf's shape, dtype and sharding; without a sharding, this process's first device.

  Orbax otherwise falls back to the sharding saved in the checkpoint, which names the
  devices of the run that wrote it and fails on another device count.
  """
  struct = ocp.utils.to_shape_dtype_struct(x)
  if getattr(struct, "sharding", None) is None:
    struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                  sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return struct


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _named_leaves(tree: Any) -> dict[str, Any]:
  """``{dotted path: leaf}`` of a pytree's array-like leaves (arrays, abstract arrays or
  orbax's array metadata), named as orbax names them (``opt_state.0.mu.embed_VxE``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat
          if hasattr(leaf, "shape")}


def state_differences(saved_metadata: Any, abstract_state: Any) -> list[str]:
  """Where a checkpoint's saved state tree (orbax metadata) and this run's state disagree:
  leaves only one of them has, and leaves whose shape or dtype differ."""
  saved, current = ({name: (tuple(leaf.shape), str(leaf.dtype))
                     for name, leaf in _named_leaves(tree).items()}
                    for tree in (getattr(saved_metadata, "tree", saved_metadata), abstract_state))
  problems = [f"state leaf {name}: only in the checkpoint ({saved[name][0]} {saved[name][1]})"
              for name in sorted(set(saved) - set(current))]
  problems += [f"state leaf {name}: only in this run ({current[name][0]} {current[name][1]})"
               for name in sorted(set(current) - set(saved))]
  problems += [f"state leaf {name}: checkpoint has {saved[name]}, this run has {current[name]}"
               for name in sorted(set(saved) & set(current)) if saved[name] != current[name]]
  return problems


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """``current``'s fields that ``saved`` disagrees on, each with both values.

  Keys that older checkpoints lack are compared with ``config.FINGERPRINT_DEFAULTS`` when it
  knows the value they had; fields added to the fingerprint later (``clip``, ``bptt``, ...)
  cannot be checked against such a checkpoint, which is said in a warning. Keys only the
  checkpoint has are not compared: this caller does not check them (``load_trained`` has
  no corpus, so no ``data_sha256``).
  """
  saved = {**{k: v for k, v in FINGERPRINT_DEFAULTS.items() if k in current}, **saved}
  if "tokenizer" in current and "tokenizer" not in saved and saved.get("level") in LEVELS:
    saved["tokenizer"] = LEVELS[saved["level"]]  # written before --tokenizer: --level's
  unknown = sorted(k for k in current if k not in saved)
  if unknown:
    logging.warning("the checkpoint predates fingerprint fields %s; their values cannot be "
                    "checked against this run's", unknown)
  keys = sorted(set(current) - set(unknown))
  return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: dict[str, Any], *, read_only: bool = False, attempts: int = 3,
                   backoff_s: float = 0.5) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable checkpoint, or returns None if there is none.

  A checkpoint whose bytes fail to decode (:func:`is_decode_failure`: a truncated or garbled
  file, an item missing from its directory) with the same error twice in a row is moved
  aside to ``<directory>.quarantine/`` with a warning naming it (with ``read_only``, left
  where it is), and the previous one is tried; if checkpoints exist but none decodes, raises
  ``RuntimeError`` listing why each failed. Any other error while reading is retried
  (``attempts`` tries in all, sleeping ``backoff_s``, then twice that, ...) and then raised
  with a note naming the checkpoint: nothing is moved. A checkpoint that reads fine but does
  not match this run (its config fingerprint, or its state tree's leaves, shapes and dtypes)
  is never moved: the run stops with :class:`CheckpointMismatchError` before any write.

  Raises:
    CheckpointMismatchError: the newest readable checkpoint differs from this run, naming
      each differing flag or state leaf with both values.
    CheckpointReadError: another process could not read the checkpoint (this one could).
  """
  if attempts < 2:
    raise ValueError(f"attempts={attempts}: a decoding error must be seen twice")
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target = jax.tree.map(_restore_target, abstract_state)
  failures = []

  def quarantine(step, path, why):
    failures.append(f"{path}: {why}")
    if read_only:
      logging.warning("checkpoint %s does not decode (%s); left it where it is (read-only) "
                      "and trying an older one", path, why)
      return
    dest = os.path.join(str(manager.directory) + ".quarantine", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:  # one mover; the others wait for it
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(path, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"lm_jax quarantine {step}")
    manager.reload()
    logging.warning("checkpoint %s is unreadable (%s, twice); moved it to %s and trying an "
                    "older one", path, why, dest)

  def mismatch(path, what, problems):
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    return CheckpointMismatchError(
        f"checkpoint {path} was written by a run with a different {what}; nothing was "
        "written or moved (every checkpoint is where it was). Rerun with the original flags "
        "to resume, or pass another --workdir to start fresh:\n  " + "\n  ".join(shown))

  retry = dict(attempts=attempts, backoff_s=backoff_s)
  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    header, why = _read(lambda: (  # pylint: disable=cell-var-from-loop
        manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"],
        manager.item_metadata(step)["state"]), path, **retry)
    if why is not None:
      quarantine(step, path, why)
      continue
    meta, saved_tree = header
    problems = config_differences(meta.get("config", {}), config)
    if problems:
      raise mismatch(path, "configuration", problems)
    problems = [] if saved_tree is None else state_differences(saved_tree, abstract_state)
    if problems:
      raise mismatch(path, "state tree", problems)
    restored, why = _read(lambda: manager.restore(  # pylint: disable=cell-var-from-loop
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))), path, **retry)
    if why is not None:
      quarantine(step, path, why)
      continue
    return step, restored["state"], meta
  raise RuntimeError("no readable checkpoint in " + str(manager.directory)
                     + (" (read-only: nothing was moved)" if read_only else "") + ":\n  "
                     + "\n  ".join(failures))
