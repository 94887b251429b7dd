"""Orbax checkpoints of a run: the train state plus the host state needed to resume exactly.

Each checkpoint holds two items: ``state`` (the ``TrainState`` pytree: params, optimizer
state with its learning rate, RNG key, step and the carried hidden state) and ``meta``
(JSON: data position, schedule state, and a ``config`` fingerprint of what determines
the shapes: vocabulary size, model flags). Restoring compares the fingerprint with the
current run's and fails with a message naming every differing field, rather than
somewhere deep inside orbax with a shape error.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from lm_jax.train.config import FINGERPRINT_DEFAULTS


class CheckpointMismatchError(ValueError):
  """A readable checkpoint was written by a run whose flags or state tree differ."""


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
  cannot be checked against such a checkpoint, which is said in a warning.
  """
  saved = {**{k: v for k, v in FINGERPRINT_DEFAULTS.items() if k in current}, **saved}
  unknown = sorted(k for k in current if k not in saved)
  if unknown:
    logging.warning("the checkpoint predates fingerprint fields %s; their values cannot be "
                    "checked against this run's", unknown)
  keys = sorted((set(saved) | set(current)) - set(unknown))
  return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: dict[str, Any]) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable checkpoint, or returns None if there is none.

  Only a checkpoint that cannot be read or decoded (truncated file, missing directory,
  unreadable metadata) is moved aside to ``<directory>.quarantine/`` with a warning naming
  it, and the previous one is tried; if checkpoints exist but none can be read, raises
  ``RuntimeError`` listing why each failed. A checkpoint that reads fine but does not match
  this run (its config fingerprint, or its state tree's leaves, shapes and dtypes) is never
  moved: the run stops with :class:`CheckpointMismatchError` before anything is written.

  Raises:
    CheckpointMismatchError: the newest readable checkpoint differs from this run, naming
      each differing flag or state leaf with both values.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target = jax.tree.map(_restore_target, abstract_state)
  failures = []

  def quarantine(step, path, error):
    failures.append(f"{path}: {type(error).__name__}: {error}")
    dest = os.path.join(str(manager.directory) + ".quarantine", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:  # one mover; the others wait for it
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(path, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"lm_jax quarantine {step}")
    manager.reload()
    logging.warning("checkpoint %s is unreadable (%s: %s); moved it to %s and trying an older "
                    "one", path, type(error).__name__, error, dest)

  def mismatch(path, what, problems):
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    return CheckpointMismatchError(
        f"checkpoint {path} was written by a run with a different {what}; nothing was "
        "written or moved (every checkpoint is where it was). Rerun with the original flags "
        "to resume, or pass another --workdir to start fresh:\n  " + "\n  ".join(shown))

  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved_tree = manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      quarantine(step, path, e)
      continue
    problems = config_differences(meta.get("config", {}), config)
    if problems:
      raise mismatch(path, "configuration", problems)
    problems = [] if saved_tree is None else state_differences(saved_tree, abstract_state)
    if problems:
      raise mismatch(path, "state tree", problems)
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-except
      quarantine(step, path, e)
      continue
    return step, restored["state"], meta
  raise RuntimeError("no readable checkpoint in " + str(manager.directory) + ":\n  "
                     + "\n  ".join(failures))
