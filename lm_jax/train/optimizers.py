r"""Optimizers for the trainer: SGD, Adam, AdamW (decoupled weight decay) and lazy Adam,
behind global-norm clipping, with the learning rate injectable from the host."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw", "lazy_adam")


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
