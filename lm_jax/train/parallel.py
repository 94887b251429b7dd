r"""Data parallelism over devices and processes for the per-device train and eval steps.

The steps of :mod:`lm_jax.train.training` are written per device with a named axis; this
module runs them three ways behind one interface, :class:`DataParallel`:

* ``"none"``: ``jit`` on one device, the whole batch.
* ``"shard_map"``: ``jax.shard_map`` over a 1-D :class:`jax.sharding.Mesh` with axis
  ``"data"`` over all devices of all processes. The train state is a pytree of *global*
  arrays: everything replicated except the carried hidden state, whose rows are split
  over the devices like the batch's rows, so row ``b`` of the state stays on the device
  that trains row ``b`` of every batch. Each process builds only the batch rows of its
  own devices and the global batch is assembled with
  ``jax.make_array_from_process_local_data``.
* ``"pmap"``: ``jax.pmap`` over the local devices (one process), the hidden state and the
  batch reshaped to ``[P, B / P, ...]`` while training, back to ``[B, ...]`` for checkpoints.

Because checkpoints always hold the state in the global ``[B, ...]`` layout, a run can
resume under another mode or on another number of devices. Gradients are averaged and
metric sums reduced with ``lax.psum`` inside the step, so P devices compute what one
device computes on the whole batch, up to float summation order (about 1e-7 relative).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm_jax.data import batching
from lm_jax.train import training

AXIS = "data"
MODES = ("none", "shard_map", "pmap")
_BATCH_KEYS = ("inputs_BxT", "targets_BxT", "mask_BxT")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
  """Calls ``jax.distributed.initialize`` when asked to; returns whether it did.

  Asked to means a ``coordinator_address`` (with ``num_processes`` and ``process_id``),
  or the environment variables ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself) with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here; where they are absent JAX's
  cluster detection, e.g. SLURM or a TPU pod, fills them in). Must run before anything
  touches a device. On CPU, cross-process collectives use gloo.
  """
  if not coordinator_address and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return False
  if jax.distributed.is_initialized():
    return True
  env_processes, env_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  num = num_processes or (int(env_processes) if env_processes else None)
  pid = process_id if process_id >= 0 else (int(env_id) if env_id else None)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address or None, num_processes=num, process_id=pid)
  return True


def resolve_mode(parallel: str, num_devices: int) -> str:
  """``auto`` is ``shard_map`` over more than one device, else ``none``."""
  if parallel == "auto":
    return "shard_map" if num_devices > 1 else "none"
  if parallel not in MODES:
    raise ValueError(f"parallel={parallel!r} is not one of {('auto',) + MODES}")
  return parallel


class DataParallel(NamedTuple):
  """A train and an eval step run data-parallel, and how to lay out their inputs.

  Attributes:
    mode: ``"none"``, ``"shard_map"`` or ``"pmap"``.
    num_devices: ``P``, devices the batch rows are split over (all processes).
    row_range: ``B -> (start, stop)``, the rows of a global batch this process builds.
    put_state: a ``TrainState`` in the global layout -> the layout the step takes.
    get_state: the inverse, for checkpoints (global arrays, ``[B, ...]`` hidden state).
    put_rows: a pytree with a leading global row axis (an eval hidden state) -> step layout.
    put_batch: ``(this process's rows as a Batch, B) ->`` the step's batch input.
    train_step: ``(state, batch) -> (state, metrics)``, metrics replicated.
    eval_step: ``(params, rnn_state, batch) -> (rnn_state, metrics)``.
  """
  mode: str
  num_devices: int
  row_range: Callable[[int], tuple[int, int]]
  put_state: Callable[[Any], Any]
  get_state: Callable[[Any], Any]
  put_rows: Callable[[Any], Any]
  put_batch: Callable[[batching.Batch, int], dict[str, Any]]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]


def _state_specs(rows) -> training.TrainState:
  return training.TrainState(step=P(), params=P(), opt_state=P(), rng=P(), rnn_state=rows)


_BATCH_SPECS = {"inputs_BxT": P(AXIS), "targets_BxT": P(AXIS), "mask_BxT": P(AXIS),
                "reset": P()}


def _place(x, sharding):
  """``x`` as a global array with ``sharding``, from a host value every process holds."""
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if not x.is_fully_addressable or jax.process_count() == 1:
      return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_data_parallel(mode: str, train_step: Callable, eval_step: Callable, *,
                       devices: list | None = None, tables: Any = None) -> DataParallel:
  """Wraps per-device steps (``axis_name`` keyword) to run as ``mode`` says.

  Args:
    mode: ``"none"``, ``"shard_map"`` or ``"pmap"`` (see :func:`resolve_mode`).
    train_step: ``(state, batch, tables, *, axis_name) -> (state, metrics)``, e.g.
      ``functools.partial(training.train_step, model=..., optimizer=...)``.
    eval_step: ``(params, rnn_state, batch, tables, *, axis_name) -> (rnn_state, metrics)``.
    devices: the devices; default all devices (``shard_map``) or all local devices
      (``pmap``), one device for ``none``.
    tables: the head's tables (``model.head.tables``), placed on the devices once and
      passed to every step as an argument (replicated), so that the compiled steps hold
      no ``[V]``-sized constants; None: the steps get None.

  Returns:
    A :class:`DataParallel`, whose steps take ``(state, batch)`` and
    ``(params, rnn_state, batch)``: the tables are bound.
  """
  if mode == "none":
    train, evaluate, tables = (jax.jit(train_step, donate_argnums=0), jax.jit(eval_step),
                               jax.device_put(tables))
    return DataParallel(
        mode="none", num_devices=1, row_range=lambda b: (0, b), put_state=lambda s: s,
        get_state=lambda s: s, put_rows=lambda r: r,
        put_batch=lambda batch, b: training.batch_to_arrays(batch),
        train_step=lambda state, batch: train(state, batch, tables),
        eval_step=lambda params, rnn_state, batch: evaluate(params, rnn_state, batch, tables))
  if mode == "shard_map":
    return _shard_map(train_step, eval_step, devices or jax.devices(), tables)
  if mode == "pmap":
    return _pmap(train_step, eval_step, devices or jax.local_devices(), tables)
  raise ValueError(f"mode={mode!r} is not one of {MODES}")


def _shard_map(train_step, eval_step, devices, tables) -> DataParallel:
  mesh = Mesh(np.array(devices), (AXIS,))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  num = len(devices)

  def row_range(batch_size):
    if batch_size % num:
      raise ValueError(f"batch of {batch_size} rows is not divisible by {num} devices")
    index_map = rows.devices_indices_map((batch_size,))
    mine = sorted(index_map[d][0].indices(batch_size)[:2] for d in mesh.local_devices)
    start, stop = mine[0][0], mine[-1][1]
    if any(a[1] != b[0] for a, b in zip(mine, mine[1:])):
      raise ValueError("this process's devices do not hold contiguous batch rows")
    return start, stop

  def put_state(state):
    return _state_specs(None).replace(
        step=_place(state.step, replicated), rng=_place(state.rng, replicated),
        params=jax.tree.map(lambda x: _place(x, replicated), state.params),
        opt_state=jax.tree.map(lambda x: _place(x, replicated), state.opt_state),
        rnn_state=jax.tree.map(lambda x: _place(x, rows), state.rnn_state))

  def put_batch(batch, batch_size):
    local = training.batch_to_arrays(batch)
    out = {k: jax.make_array_from_process_local_data(rows, local[k],
                                                     (batch_size, *local[k].shape[1:]))
           for k in _BATCH_KEYS}
    out["reset"] = _place(local["reset"], replicated)
    return out

  # check_vma=False: with it on, autodiff would already psum the gradient of the
  # replicated params (the transpose of their implicit pvary) and train_step psums again.
  state_specs = _state_specs(P(AXIS))
  train = jax.jit(jax.shard_map(functools.partial(train_step, axis_name=AXIS), mesh=mesh,
                                in_specs=(state_specs, _BATCH_SPECS, P()),
                                out_specs=(state_specs, P()), check_vma=False),
                  donate_argnums=0)
  evaluate = jax.jit(jax.shard_map(functools.partial(eval_step, axis_name=AXIS), mesh=mesh,
                                   in_specs=(P(), P(AXIS), _BATCH_SPECS, P()),
                                   out_specs=(P(AXIS), P()), check_vma=False))
  tables = jax.tree.map(lambda x: _place(x, replicated), tables)
  return DataParallel(mode="shard_map", num_devices=num, row_range=row_range,
                      put_state=put_state, get_state=lambda s: s,
                      put_rows=lambda tree: jax.tree.map(lambda x: _place(x, rows), tree),
                      put_batch=put_batch,
                      train_step=lambda state, batch: train(state, batch, tables),
                      eval_step=lambda params, rnn_state, batch: evaluate(params, rnn_state,
                                                                          batch, tables))


def _pmap(train_step, eval_step, devices, tables) -> DataParallel:
  if jax.process_count() > 1:
    raise ValueError("pmap here runs in one process only; use shard_map across processes")
  num = len(devices)

  def split(x):
    x = jnp.asarray(x)
    if x.shape[0] % num:
      raise ValueError(f"leading axis {x.shape[0]} is not divisible by {num} devices")
    return x.reshape(num, x.shape[0] // num, *x.shape[1:])

  def merge(x):
    return jnp.asarray(x).reshape(-1, *x.shape[2:])

  def put_batch(batch, batch_size):
    local = training.batch_to_arrays(batch)
    return {**{k: split(local[k]) for k in _BATCH_KEYS}, "reset": jnp.asarray(local["reset"])}

  state_axes = training.TrainState(step=None, params=None, opt_state=None, rng=None, rnn_state=0)
  batch_axes = {"inputs_BxT": 0, "targets_BxT": 0, "mask_BxT": 0, "reset": None}
  train = jax.pmap(functools.partial(train_step, axis_name=AXIS), axis_name=AXIS,
                   in_axes=(state_axes, batch_axes, None), out_axes=(state_axes, None),
                   devices=devices)
  evaluate = jax.pmap(functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS,
                      in_axes=(None, 0, batch_axes, None), out_axes=(0, None), devices=devices)
  tables = jax.tree.map(jnp.asarray, tables)
  return DataParallel(
      mode="pmap", num_devices=num, row_range=lambda b: (0, b),
      put_state=lambda s: s.replace(rnn_state=jax.tree.map(split, s.rnn_state)),
      get_state=lambda s: s.replace(rnn_state=jax.tree.map(merge, s.rnn_state)),
      put_rows=lambda tree: jax.tree.map(split, tree), put_batch=put_batch,
      train_step=lambda state, batch: train(state, batch, tables),
      eval_step=lambda params, rnn_state, batch: evaluate(params, rnn_state, batch, tables))


def pad_rows(batch: batching.Batch, multiple: int, pad_id: int = 1) -> batching.Batch:
  """``batch`` with masked rows of ``pad_id`` appended up to a multiple of ``multiple`` rows."""
  extra = -batch.inputs_BxT.shape[0] % multiple
  if not extra:
    return batch
  T = batch.inputs_BxT.shape[1]
  pad = np.full((extra, T), pad_id, np.int32)
  return batching.Batch(inputs_BxT=np.concatenate([batch.inputs_BxT, pad]),
                        targets_BxT=np.concatenate([batch.targets_BxT, pad]),
                        mask_BxT=np.concatenate([batch.mask_BxT, np.zeros((extra, T), bool)]),
                        reset=batch.reset)


def evaluate(dp: DataParallel, params: Any, tokens: np.ndarray, *, initial_state: Callable,
             batch_size: int, bptt: int) -> dict[str, float]:
  """Exact loss over a whole split with carried state, rows split over ``dp``'s devices.

  ``batching.eval_batches`` rows are padded with fully masked rows up to a multiple of
  the device count, which adds nothing to the sums; each process feeds its own rows.

  Args:
    dp: from :func:`make_data_parallel`.
    params: model parameters (replicated).
    tokens: the split, int ``[N]``.
    initial_state: ``rows -> rnn_state`` (``model.initial_state``).
    batch_size: rows before padding.
    bptt: steps per batch.

  Returns:
    As :func:`lm_jax.train.training.evaluate`.
  """
  padded = batch_size + (-batch_size % dp.num_devices)
  start, stop = dp.row_range(padded)

  def step(params, rnn_state, batch):
    batch = pad_rows(batch, dp.num_devices)
    local = batching.Batch(batch.inputs_BxT[start:stop], batch.targets_BxT[start:stop],
                           batch.mask_BxT[start:stop], batch.reset)
    return dp.eval_step(params, rnn_state, dp.put_batch(local, padded))

  return training.evaluate_batches(
      step, params, dp.put_rows(initial_state(padded)),
      batching.eval_batches(tokens, batch_size=batch_size, bptt=bptt))
