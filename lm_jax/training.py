r"""Train state, optimizers, and per-device train and evaluation steps for recurrent LMs.

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

import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from lm_jax import language_model as lm_lib

PyTree = Any

GRAD_REDUCTIONS = ("token_mean", "sum_over_time")
OPTIMIZERS = ("sgd", "adam", "adamw", "lazy_adam")


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


class LazyAdamState(NamedTuple):
  count: jax.Array
  mu: PyTree
  nu: PyTree


def _touched(g):
  """Where a gradient leaf is 'present': whole rows of a matrix (any non-zero entry in
  the row), single entries of a vector or scalar."""
  if g.ndim < 2:
    return g != 0
  return jnp.any(g != 0, axis=tuple(range(1, g.ndim)), keepdims=True)


def scale_by_lazy_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                       ) -> optax.GradientTransformation:
  r"""Adam that moves only the rows a gradient touches (TensorFlow's ``LazyAdam``).

  For each row :math:`r` of a ``[V, ...]`` leaf whose gradient row :math:`g_r` is not all
  zero, with the step count :math:`t` shared by all rows:

  .. math::
    m_r \leftarrow \beta_1 m_r + (1 - \beta_1) g_r, \quad
    v_r \leftarrow \beta_2 v_r + (1 - \beta_2) g_r^2, \quad
    u_r = \frac{m_r / (1 - \beta_1^t)}{\sqrt{v_r / (1 - \beta_2^t)} + \epsilon};

  untouched rows keep :math:`m_r, v_r` and get :math:`u_r = 0`. On a dense gradient this is
  ``optax.scale_by_adam``. It is the Adam counterpart of sparse row updates for output
  layers and embeddings whose rows get a gradient only when their word is drawn or seen:
  plain Adam keeps moving such a row by its momentum for ~:math:`1/(1-\beta_1)` steps
  after each occurrence. (On PTB's NCE head the two reach about the same exact perplexity;
  see WORKSPACE_NOTES.md.)
  """
  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return LazyAdamState(count=jnp.zeros((), jnp.int32), mu=zeros,
                         nu=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    touched = jax.tree.map(_touched, updates)
    mu = jax.tree.map(lambda t, g, m: jnp.where(t, b1 * m + (1 - b1) * g, m),
                      touched, updates, state.mu)
    nu = jax.tree.map(lambda t, g, v: jnp.where(t, b2 * v + (1 - b2) * g * g, v),
                      touched, updates, state.nu)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    new_updates = jax.tree.map(
        lambda t, m, v: jnp.where(t, (m / c1) / (jnp.sqrt(v / c2) + eps), 0).astype(m.dtype),
        touched, mu, nu)
    return new_updates, LazyAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for the leaves AdamW decays: every matrix (rank >= 2) except the input embedding
  ``embed_VxE`` (tied or not); biases, vectors and scalars are never decayed."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = lambda path: {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.ndim(leaf) >= 2 and "embed_VxE" not in names(path) for path, leaf in flat])


def make_optimizer(name: str, learning_rate: float, *, clip: float | None = None,
                   momentum: float = 0.0, weight_decay: float = 0.0
                   ) -> optax.GradientTransformation:
  """Global-norm clipping followed by SGD, Adam, AdamW or lazy Adam, learning rate injectable.

  ``adamw`` is optax's decoupled weight decay (Loshchilov and Hutter 2019): each step also
  subtracts ``learning_rate * weight_decay * param`` from the leaves
  :func:`weight_decay_mask` selects (matrices other than the input embedding).
  The learning rate is a hyperparameter in the optimizer state
  (``opt_state.hyperparams["learning_rate"]``) so epoch-level schedules that depend
  on validation results (Mikolov's halving) can be applied from the host.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")

  def factory(learning_rate):
    if name == "sgd":
      opt = optax.sgd(learning_rate, momentum=momentum or None)
    elif name == "adam":
      opt = optax.adam(learning_rate)
    elif name == "lazy_adam":
      opt = optax.chain(scale_by_lazy_adam(), optax.scale_by_learning_rate(learning_rate))
    else:
      opt = optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask)
    if clip:
      opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt

  return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


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


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
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
                                         row_ids_B=row_ids_B)
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


def eval_step(params: PyTree, rnn_state: PyTree, batch: dict[str, jax.Array], *,
              model: lm_lib.LanguageModel, axis_name: str | None = None
              ) -> tuple[PyTree, dict[str, jax.Array]]:
  """Exact NLL sums (``model.nll``) of one evaluation batch, state carried (reset if asked)."""
  rnn_state = _reset_where(batch["reset"], rnn_state)
  loss_BxT, new_rnn_state = model.nll(params, batch["inputs_BxT"], batch["targets_BxT"],
                                       rnn_state, mask_BxT=batch["mask_BxT"])
  metrics = {"loss_sum": _psum(jnp.sum(loss_BxT), axis_name),
             "token_count": _psum(batch["mask_BxT"].sum().astype(jnp.float32), axis_name)}
  return new_rnn_state, metrics


def batch_to_arrays(batch) -> dict[str, Any]:
  """A host ``lm_jax.batching.Batch`` as the dict the steps take."""
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
    eval_fn: a jitted ``eval_step`` with ``model`` bound; built here if None.

  Returns:
    ``loss_nats`` (mean per token), ``perplexity`` = e^loss, ``bits_per_token`` =
    loss / ln 2, and ``tokens``.
  """
  if eval_fn is None:
    eval_fn = jax.jit(lambda p, s, b: eval_step(p, s, b, model=model))
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


def summarize_loss(loss_sum: float, token_count: float) -> dict[str, float]:
  """Mean nats per token, perplexity (e^nats) and bits per token from sums."""
  if token_count <= 0:
    raise ValueError("cannot summarise a loss over zero tokens")
  loss = loss_sum / token_count
  return {"loss_nats": loss, "perplexity": math.exp(loss),
          "bits_per_token": loss / math.log(2.0), "tokens": int(token_count)}
