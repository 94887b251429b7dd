r"""Train state and per-device train and evaluation steps for recurrent LMs.

Optimizers are in :mod:`lm_jax.train.optimizers`.

Truncated backpropagation through time (notes, section 13.7): each step unrolls the
model over ``T`` tokens of every batch row, backpropagates through those ``T`` steps
only, and hands the final hidden state (with ``stop_gradient``) to the next batch when
batches are sequential (``Batch.reset`` is False), so row ``b`` of batch ``i + 1``
continues from where row ``b`` of batch ``i`` stopped.

The steps are written per device: with ``axis_name=None`` they run under plain
``jit``; with an axis name the gradient and metric sums are reduced over that axis with
``lax.psum``, so the same function runs under ``jax.shard_map`` or ``jax.pmap`` and
computes exactly what one device computes on the concatenated batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from lm_jax.models import language_model as lm_lib

PyTree = Any

GRAD_REDUCTIONS = ("token_mean", "sum_over_time")


@flax.struct.dataclass
class TrainState:
  """Arrays only: everything a step reads and writes, and everything a resume needs.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: model parameters.
    opt_state: optimizer state; the learning rate lives here (``inject_hyperparams``)
      so host-side schedules can change it and checkpoints keep it.
    rng: raw ``uint32[2]`` PRNG key; per-step keys are ``fold_in(rng, step)``.
    rnn_state: the hidden state carried between sequential batches, per layer.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  rnn_state: PyTree


def get_learning_rate(state: TrainState) -> jax.Array:
  return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
  """Returns ``state`` with the optimizer's learning rate replaced (host side)."""
  hyper = dict(state.opt_state.hyperparams)
  old = hyper["learning_rate"]
  hyper["learning_rate"] = jnp.asarray(learning_rate, dtype=old.dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def create_train_state(model: lm_lib.LanguageModel, optimizer: optax.GradientTransformation,
                       *, seed: int, batch_size: int) -> TrainState:
  """Initial state: params from ``seed``, zero hidden state for ``batch_size`` rows."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng,
                    rnn_state=model.initial_state(batch_size))


def _reset_where(reset: jax.Array, rnn_state: PyTree) -> PyTree:
  return jax.tree.map(lambda s: jnp.where(reset, jnp.zeros_like(s), s), rnn_state)


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def train_step(state: TrainState, batch: dict[str, jax.Array], tables: PyTree = None, *,
               model: lm_lib.LanguageModel, optimizer: optax.GradientTransformation,
               grad_reduction: str = "token_mean", axis_name: str | None = None,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  r"""One truncated-BPTT update on this device's rows of the batch.

  The objective over the global batch is

  .. math::
    L(\theta) = \frac{1}{Z} \sum_{b, t} m_{bt} \, \ell_{bt}(\theta),

  with :math:`Z` the number of unmasked tokens (``token_mean``) or the number of
  batch rows (``sum_over_time``: the loss summed over time and averaged over rows, as
  Zaremba et al. 2014 and TensorFlow's PTB tutorial train with SGD lr 1). Each device
  differentiates its share :math:`\frac{1}{Z}\sum_{b \in \text{dev}}` and the shares
  are summed with ``psum``, so gradients are exact for any split.

  Args:
    state: this device's train state (``rnn_state`` holds its rows).
    batch: ``inputs_BxT``, ``targets_BxT`` (int32), ``mask_BxT`` (bool) and ``reset``
      (bool scalar: zero the carried state first, for random batches and new epochs).
    tables: the head's tables (``model.head.tables``), passed to every head call. Give
      them as an argument of the jitted step, so the ``[V]``-sized arrays reach the
      compiled program as arguments; None (the head's own, closed over) embeds them as
      constants, whose size grows with ``V``.
    model: the language model.
    optimizer: an optax transformation made by :func:`make_optimizer`.
    grad_reduction: ``"token_mean"`` or ``"sum_over_time"``.
    axis_name: the device axis to reduce over, or None on one device.
    skip_nonfinite: if the loss or the gradient is NaN or infinite, return the state
      unchanged except ``step + 1`` (no update, hidden state as before), decided on the
      reduced values so every device agrees.

  Returns:
    The new state and metric sums ``loss_sum`` (nats), ``token_count``, ``grad_norm``
    (of the averaged gradient, before clipping), ``learning_rate``, and ``nonfinite``
    (1.0 where the loss or gradient was not finite, else 0.0).
  """
  if grad_reduction not in GRAD_REDUCTIONS:
    raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
  mask_BxT = batch["mask_BxT"]
  token_count = _psum(mask_BxT.sum().astype(jnp.float32), axis_name)
  if grad_reduction == "token_mean":
    denominator = token_count
  else:
    denominator = _psum(jnp.float32(mask_BxT.shape[0]), axis_name)
  rnn_state = lax.stop_gradient(_reset_where(batch["reset"], state.rnn_state))
  # One key for all devices; each row's dropout mask is drawn from fold_in(key, global row),
  # and a sampled head's shared draws from the same key, so P devices compute what one
  # device computes on the whole batch.
  dropout_key = jax.random.fold_in(state.rng, state.step)
  local_rows = mask_BxT.shape[0]
  first_row = 0 if axis_name is None else lax.axis_index(axis_name) * local_rows
  row_ids_B = first_row + jnp.arange(local_rows)

  def loss_fn(params):
    loss_BxT, new_rnn_state = model.loss(params, batch["inputs_BxT"], batch["targets_BxT"],
                                         rnn_state, mask_BxT=mask_BxT, dropout_key=dropout_key,
                                         row_ids_B=row_ids_B, tables=tables)
    loss_sum = jnp.sum(loss_BxT)
    return loss_sum / denominator, (loss_sum, new_rnn_state)

  grads, (loss_sum, new_rnn_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = _psum(grads, axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, rnn_state=lax.stop_gradient(new_rnn_state))
  loss_sum = _psum(loss_sum, axis_name)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = state.replace(step=new_state.step)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, keep)
  metrics = {"loss_sum": loss_sum, "token_count": token_count, "grad_norm": grad_norm,
             "learning_rate": get_learning_rate(state).astype(jnp.float32),
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return new_state, metrics


def eval_step(params: PyTree, rnn_state: PyTree, batch: dict[str, jax.Array],
              tables: PyTree = None, *, model: lm_lib.LanguageModel,
              axis_name: str | None = None) -> tuple[PyTree, dict[str, jax.Array]]:
  """Exact NLL sums (``model.nll``) of one evaluation batch, state carried (reset if asked);
  ``tables``: the head's, as in :func:`train_step`."""
  rnn_state = _reset_where(batch["reset"], rnn_state)
  loss_BxT, new_rnn_state = model.nll(params, batch["inputs_BxT"], batch["targets_BxT"],
                                       rnn_state, mask_BxT=batch["mask_BxT"], tables=tables)
  metrics = {"loss_sum": _psum(jnp.sum(loss_BxT), axis_name),
             "token_count": _psum(batch["mask_BxT"].sum().astype(jnp.float32), axis_name)}
  return new_rnn_state, metrics


def batch_to_arrays(batch) -> dict[str, Any]:
  """A host ``lm_jax.data.batching.Batch`` as the dict the steps take."""
  return {"inputs_BxT": batch.inputs_BxT, "targets_BxT": batch.targets_BxT,
          "mask_BxT": batch.mask_BxT, "reset": jnp.asarray(batch.reset)}


def evaluate(params: PyTree, batches, *, model: lm_lib.LanguageModel, batch_size: int,
             eval_fn: Callable | None = None) -> dict[str, float]:
  """Exact loss over a whole split: every target token counted once, state carried.

  Args:
    params: model parameters.
    batches: iterable of ``Batch`` covering the split (``batching.eval_batches``).
    model: the language model.
    batch_size: rows per batch (for the initial state).
    eval_fn: ``(params, rnn_state, batch) -> (rnn_state, metrics)``, a jitted ``eval_step``
      with ``model`` and the head's tables bound; built here if None.

  Returns:
    ``loss_nats`` (mean per token), ``perplexity`` = e^loss, ``bits_per_token`` =
    loss / ln 2, and ``tokens``.
  """
  if eval_fn is None:
    eval_fn = functools.partial(jax.jit(functools.partial(eval_step, model=model)),
                                tables=jax.device_put(model.head.tables))
  return evaluate_batches(lambda p, s, b: eval_fn(p, s, batch_to_arrays(b)), params,
                          model.initial_state(batch_size), batches)


def evaluate_batches(step_fn: Callable, params: PyTree, rnn_state: PyTree,
                     batches) -> dict[str, float]:
  """Runs ``step_fn(params, rnn_state, batch) -> (rnn_state, metrics)`` over host
  ``Batch``es, carrying the state, and summarises the summed ``loss_sum`` / ``token_count``.

  Every step is dispatched before any metric is fetched, so the device never waits on
  the host.
  """
  pending = []
  for batch in batches:
    rnn_state, metrics = step_fn(params, rnn_state, batch)
    pending.append(metrics)
  return summarize_loss(sum(float(m["loss_sum"]) for m in pending),
                        sum(float(m["token_count"]) for m in pending))


def _perplexity(loss_nats: float) -> float:
  """``e^loss_nats``; ``inf`` past the float range (a diverging run's loss above ~709.78
  nats) instead of ``OverflowError``, and NaN for a NaN loss."""
  try:
    return math.exp(loss_nats)
  except OverflowError:
    return math.inf


def summarize_loss(loss_sum: float, token_count: float) -> dict[str, float]:
  """Mean nats per token, perplexity (e^nats, :func:`_perplexity`) and bits per token from
  sums; a huge or non-finite loss gives an infinite or NaN perplexity, never an error."""
  if token_count <= 0:
    raise ValueError("cannot summarise a loss over zero tokens")
  loss = float(loss_sum) / float(token_count)
  return {"loss_nats": loss, "perplexity": _perplexity(loss),
          "bits_per_token": loss / math.log(2.0), "tokens": int(token_count)}
