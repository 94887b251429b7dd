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

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by a run whose vocabulary or model shape differs."""


def make_manager(directory: str, *, max_to_keep: int = 3, async_save: bool = True
                 ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


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


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """``current``'s fields that ``saved`` disagrees on (keys that older checkpoints lack are
  compared with ``config.FINGERPRINT_DEFAULTS``)."""
  from lm_jax.config import FINGERPRINT_DEFAULTS  # pylint: disable=g-import-not-at-top
  saved = {**{k: v for k, v in FINGERPRINT_DEFAULTS.items() if k in current}, **saved}
  keys = sorted(set(saved) | set(current))
  return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: dict[str, Any]) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable checkpoint, or returns None if there is none.

  A checkpoint that cannot be read (truncated file, missing directory) is moved aside to
  ``<directory>.quarantine/`` with a warning naming it, and the previous one is tried;
  if checkpoints exist but none can be read, raises ``RuntimeError`` listing why each
  failed.

  Raises:
    CheckpointMismatchError: the newest checkpoint's config differs from ``config``.
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

  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      quarantine(step, path, e)
      continue
    problems = config_differences(meta.get("config", {}), config)
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint {path} was written by a run with a different configuration; use a new "
          "--workdir or the original flags:\n  " + "\n  ".join(problems))
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-except
      quarantine(step, path, e)
      continue
    return step, restored["state"], meta
  raise RuntimeError("no readable checkpoint in " + str(manager.directory) + ":\n  "
                     + "\n  ".join(failures))
