r"""Log-linear (maximum-entropy) models :math:`p(y \mid x; w) \propto \exp(w^\top \phi(x, y))`.

The feature function :math:`\phi` is data, in one of three containers, all
handled by the same pure functions (``scores``, ``log_probs``, ``nll``,
``empirical_features``, ``expected_features``, ``fit``):

* ``DenseFeatures(features_NxYxF)``: :math:`\phi(x_n, y)` for every candidate
  ``y``; weights ``w_F``.
* ``SparseFeatures(indices_NxYxK, num_features, values_NxYxK=None)``: ids of
  the active features of :math:`\phi(x_n, y)` (binary, or with values);
  weights ``w_F``.
* ``ContextFeatures(context_NxK, num_features, num_labels, values_NxK=None)``:
  the conjunctive features of MaxEnt language models,
  :math:`\phi(x, y) = \sum_k e_{(c_k, y)}` for context predicates
  :math:`c_k`; weights ``W_FxY`` and ``scores_NxY = sum_k W[c_k]``, a gather.

Ids ``< 0`` are padding and contribute nothing. ``where`` everywhere is an
optional ``[N]`` boolean mask or non-negative per-example weights (a weight is
a multiplicity: duplicate examples can be merged into one with their count).
"""
import functools
from typing import Callable, NamedTuple, Optional, Union

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_jax.ops import losses


@struct.dataclass
class DenseFeatures:
  """``features_NxYxF``: :math:`\\phi(x_n, y)` densely; weights have shape ``[F]``."""
  features_NxYxF: jax.Array


@struct.dataclass
class SparseFeatures:
  """Active feature ids (``< 0``: padding) per (n, y); weights ``[num_features]``."""
  indices_NxYxK: jax.Array
  num_features: int = struct.field(pytree_node=False)
  values_NxYxK: Optional[jax.Array] = None


@struct.dataclass
class ContextFeatures:
  """Context predicate ids (``< 0``: padding) crossed with the label; weights ``[F, Y]``."""
  context_NxK: jax.Array
  num_features: int = struct.field(pytree_node=False)
  num_labels: int = struct.field(pytree_node=False)
  values_NxK: Optional[jax.Array] = None


Features = Union[DenseFeatures, SparseFeatures, ContextFeatures]


class FitInfo(NamedTuple):
  """What ``fit`` reports besides the weights (scalars)."""
  num_steps: jax.Array  # optimizer steps taken
  objective: jax.Array  # final (sum nll + l2/2 |w|^2) / sum(where)
  grad_norm: jax.Array  # L2 norm of the objective's gradient at the result
  converged: jax.Array  # grad_norm < tol


def _check_dtype(name, x, kind):
  ok = jnp.issubdtype(x.dtype, jnp.integer if kind == "int" else jnp.floating)
  if not ok:
    raise ValueError(f"{name} must be {'integer' if kind == 'int' else 'floating'}, "
                     f"got dtype {x.dtype} (shape {x.shape}).")


def _parts(feats: Features):
  """Validated arrays of ``feats``: (ids or features, values or None, N, Y)."""
  if isinstance(feats, DenseFeatures):
    x = jnp.asarray(feats.features_NxYxF)
    if x.ndim != 3:
      raise ValueError(f"features_NxYxF must have rank 3, got shape {x.shape}.")
    _check_dtype("features_NxYxF", x, "float")
    return x, None, x.shape[0], x.shape[1]
  if isinstance(feats, SparseFeatures):
    ids, vals, rank, name = feats.indices_NxYxK, feats.values_NxYxK, 3, "indices_NxYxK"
  elif isinstance(feats, ContextFeatures):
    ids, vals, rank, name = feats.context_NxK, feats.values_NxK, 2, "context_NxK"
    if feats.num_labels < 1:
      raise ValueError(f"num_labels must be >= 1, got {feats.num_labels}.")
  else:
    raise ValueError(f"unknown feature container {type(feats).__name__}.")
  ids = jnp.asarray(ids)
  if ids.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {ids.shape}.")
  _check_dtype(name, ids, "int")
  if feats.num_features < 1:
    raise ValueError(f"num_features must be >= 1, got {feats.num_features}.")
  if not isinstance(ids, jax.core.Tracer) and ids.size:  # concrete: check on the host
    if (top := int(np.max(np.asarray(ids)))) >= feats.num_features:
      raise ValueError(f"{name} has id {top} >= num_features={feats.num_features}.")
  if vals is not None:
    vals = jnp.asarray(vals)
    if vals.shape != ids.shape:
      raise ValueError(f"values shape {vals.shape} must equal {name} shape {ids.shape}.")
    _check_dtype("values", vals, "float")
  num_labels = ids.shape[1] if rank == 3 else feats.num_labels
  return ids, vals, ids.shape[0], num_labels


def weights_shape(feats: Features) -> tuple[int, ...]:
  """Shape of the weights: ``(F,)`` for dense and sparse, ``(F, Y)`` for context features."""
  x, _, _, num_labels = _parts(feats)
  if isinstance(feats, DenseFeatures):
    return (x.shape[-1],)
  if isinstance(feats, SparseFeatures):
    return (feats.num_features,)
  return (feats.num_features, num_labels)


def init_weights(feats: Features, dtype=jnp.float32) -> jax.Array:
  """All-zero weights (the uniform model, the maximum-entropy start)."""
  return jnp.zeros(weights_shape(feats), dtype)


def _check_w(w, feats):
  w = jnp.asarray(w)
  _check_dtype("w", w, "float")
  if w.shape != weights_shape(feats):
    raise ValueError(f"w has shape {w.shape}; these {type(feats).__name__} need "
                     f"{weights_shape(feats)}.")
  return w


def _mask_ids(ids, vals, dtype, num_features):
  """(safe ids for gathers, out-of-bounds ids for dropping scatters, values)."""
  present = ids >= 0
  v = jnp.ones(ids.shape, dtype) if vals is None else vals.astype(dtype)
  return jnp.where(present, ids, 0), jnp.where(present, ids, num_features), v * present


def _example_weights(where, n: int, dtype) -> jax.Array:
  if where is None:
    return jnp.ones((n,), dtype)
  where = jnp.asarray(where)
  if where.shape != (n,):
    raise ValueError(f"where must have shape ({n},) (one entry per example), got {where.shape}.")
  return where.astype(dtype)


def _labels(labels, n: int, num_labels: int, weights) -> jax.Array:
  """Checks labels; out-of-range labels are an error where the weight is not 0."""
  labels = jnp.asarray(labels)
  _check_dtype("labels_N", labels, "int")
  if labels.shape != (n,):
    raise ValueError(f"labels_N must have shape ({n},), got {labels.shape}.")
  if not any(isinstance(a, jax.core.Tracer) for a in (labels, weights)):  # on the host
    y, wt = np.asarray(labels), np.asarray(weights)
    bad = ((y < 0) | (y >= num_labels)) & (wt != 0)
    if bad.any():
      raise ValueError(f"labels must lie in [0, {num_labels}); got {int(y[bad][0])}.")
  return labels


def scores(w: jax.typing.ArrayLike, feats: Features) -> jax.Array:
  r"""Unnormalised log-probabilities :math:`s_{ny} = w^\top \phi(x_n, y)`.

  Args:
    w: weights, shape ``weights_shape(feats)``.
    feats: ``DenseFeatures``, ``SparseFeatures`` or ``ContextFeatures``.

  Returns:
    ``scores_NxY``, in the promoted dtype of ``w`` and the feature values.
  """
  w = _check_w(w, feats)
  x, vals, _, _ = _parts(feats)
  if isinstance(feats, DenseFeatures):
    return jnp.einsum("nyf,f->ny", x, w)
  dtype = w.dtype if vals is None else jnp.result_type(w, vals)
  safe, _, v = _mask_ids(x, vals, dtype, feats.num_features)
  if isinstance(feats, SparseFeatures):
    return jnp.sum(w[safe] * v, axis=-1)
  return jnp.einsum("nky,nk->ny", w[safe], v)  # gathers K rows of W_FxY per example


def log_probs(w: jax.typing.ArrayLike, feats: Features) -> jax.Array:
  r"""``log_probs_NxY`` :math:`= s_{ny} - \log \sum_{y'} \exp s_{ny'}`, float32 or wider."""
  s = scores(w, feats)
  return jax.nn.log_softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=-1)


def nll(w: jax.typing.ArrayLike, feats: Features, labels_N: jax.typing.ArrayLike,
        where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""Per-example negative log-likelihood, weighted by ``where``.

  .. math::
    \ell_n(w) = \log \sum_{y} \exp w^\top \phi(x_n, y) - w^\top \phi(x_n, y_n),
    \qquad
    \nabla_w \sum_n \ell_n = \sum_n \mathbb{E}_{p(y \mid x_n; w)}[\phi(x_n, y)]
      - \sum_n \phi(x_n, y_n),

  expected minus empirical feature counts (see ``expected_features`` and
  ``empirical_features``): at a maximum-likelihood optimum the model matches the
  data's feature counts, the MaxEnt constraints. Differentiable in reverse mode
  only (``losses``' custom VJP); ``log_probs`` also has forward mode.

  Args:
    w: weights, shape ``weights_shape(feats)``.
    feats: the feature container (``N`` examples, ``Y`` candidates).
    labels_N: integer labels in ``[0, Y)``; checked when concrete.
    where: optional ``[N]`` boolean mask or non-negative weights.

  Returns:
    ``nll_N`` in nats, ``where_n * l_n`` (exactly 0 where ``where_n == 0``).

  References:
    Lecture 8, equations 8.6-8.9 and the MaxEnt slides; Berger, Della Pietra and
    Della Pietra (1996), "A maximum entropy approach to natural language
    processing", Computational Linguistics 22(1), section 3.

  >>> feats = DenseFeatures(jnp.array([[[1., 0.], [0., 1.], [1., 1.]]]))
  >>> print(nll(jnp.array([0.5, -0.5]), feats, jnp.array([0])).round(4))
  [0.6803]
  """
  s = scores(w, feats)
  _, _, n, num_labels = _parts(feats)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  weights = _example_weights(where, n, s.dtype)
  labels = _labels(labels_N, n, num_labels, weights)
  loss = losses.softmax_cross_entropy_with_integer_labels(s, labels, where=weights != 0)
  return jnp.where(weights != 0, weights * loss, 0.0)


def empirical_features(feats: Features, labels_N: jax.typing.ArrayLike,
                       where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""Observed feature counts :math:`\sum_n \mathrm{where}_n \, \phi(x_n, y_n)`, shaped like ``w``.

  Args:
    feats: the feature container.
    labels_N: integer labels in ``[0, Y)``.
    where: optional ``[N]`` mask or weights.

  Returns:
    Counts of shape ``weights_shape(feats)`` (float32, or the values' dtype if wider).
  """
  x, vals, n, num_labels = _parts(feats)
  given = x if isinstance(feats, DenseFeatures) else vals
  dtype = jnp.promote_types(jnp.float32 if given is None else given.dtype, jnp.float32)
  weights = _example_weights(where, n, dtype)
  labels = jnp.where(weights != 0, _labels(labels_N, n, num_labels, weights), 0)
  if isinstance(feats, DenseFeatures):
    phi_NxF = jnp.take_along_axis(x, labels[:, None, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(weights[:, None] != 0, weights[:, None] * phi_NxF, 0), 0)
  _, drop, v = _mask_ids(x, vals, dtype, feats.num_features)
  if isinstance(feats, SparseFeatures):
    drop = jnp.take_along_axis(drop, labels[:, None, None], axis=1)[:, 0]  # [N, K]
    v = jnp.take_along_axis(v, labels[:, None, None], axis=1)[:, 0]
    return jnp.zeros(feats.num_features, dtype).at[drop].add(
        weights[:, None] * v, mode="drop")
  return jnp.zeros((feats.num_features, num_labels), dtype).at[drop, labels[:, None]].add(
      weights[:, None] * v, mode="drop")


def expected_features(w: jax.typing.ArrayLike, feats: Features,
                      where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""Model feature counts :math:`\sum_n \mathrm{where}_n \sum_y p(y \mid x_n; w)\, \phi(x_n, y)`.

  This is :math:`\nabla_w \sum_n \mathrm{where}_n \log Z(x_n; w)`, computed
  directly (a weighted scatter of the probabilities), not by autodiff.

  Args:
    w: weights, shape ``weights_shape(feats)``.
    feats: the feature container.
    where: optional ``[N]`` mask or weights.

  Returns:
    Expected counts of shape ``weights_shape(feats)``, float32 or wider.
  """
  lp = log_probs(w, feats)
  x, vals, n, num_labels = _parts(feats)
  weights = _example_weights(where, n, lp.dtype)
  q_NxY = jnp.where(weights[:, None] != 0, weights[:, None] * jnp.exp(lp), 0)
  if isinstance(feats, DenseFeatures):
    return jnp.einsum("ny,nyf->f", q_NxY, x.astype(lp.dtype))
  _, drop, v = _mask_ids(x, vals, lp.dtype, feats.num_features)
  if isinstance(feats, SparseFeatures):
    return jnp.zeros(feats.num_features, lp.dtype).at[drop].add(
        q_NxY[..., None] * v, mode="drop")
  return jnp.zeros((feats.num_features, num_labels), lp.dtype).at[drop].add(
      v[..., None] * q_NxY[:, None, :], mode="drop")


def constraint_residual(w: jax.typing.ArrayLike, feats: Features, labels_N: jax.typing.ArrayLike,
                        *, l2: float = 0.0,
                        where: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  r"""MaxEnt constraint residual :math:`\tilde{E}[\phi] - E_w[\phi] - \lambda w` (0 at ``fit``'s optimum)."""
  return (empirical_features(feats, labels_N, where) - expected_features(w, feats, where)
          - l2 * jnp.asarray(w))


def diagonal_preconditioner(feats: Features, where: Optional[jax.typing.ArrayLike] = None,
                            *, l2: float = 0.0) -> jax.Array:
  r"""Scales :math:`(\lambda + \sum_n \mathrm{where}_n \, E_{\mathrm{uniform}}[\phi_f(x_n, y)^2])^{-1/2}`.

  The inverse square root of a bound on the objective's Hessian diagonal at
  the uniform start :math:`w = 0` (it counts how often each feature fires).
  Passed to ``fit``, it equalises the curvature of frequent features (the bias
  fires on every example) and rare ones (a 5-gram seen once), which L-BFGS's
  scalar initial Hessian cannot. Entries with nothing to count get 1.

  Args:
    feats: the feature container.
    where: optional ``[N]`` mask or multiplicities, as given to ``fit``.
    l2: the L2 penalty given to ``fit``.

  Returns:
    ``scale`` of shape ``weights_shape(feats)``.
  """
  if isinstance(feats, DenseFeatures):
    squared = feats.replace(features_NxYxF=jnp.square(jnp.asarray(feats.features_NxYxF)))
  elif isinstance(feats, SparseFeatures):
    values = feats.values_NxYxK
    squared = feats if values is None else feats.replace(values_NxYxK=jnp.square(values))
  else:
    values = feats.values_NxK if isinstance(feats, ContextFeatures) else None
    squared = feats if values is None else feats.replace(values_NxK=jnp.square(values))
  diag = expected_features(init_weights(feats), squared, where) + l2
  return jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)


def fit(feats: Features, labels_N: jax.typing.ArrayLike, *, l2: float = 0.0,
        optimizer: Optional[optax.GradientTransformation] = None, num_steps: int = 200,
        tol: float = 1e-6, where: Optional[jax.typing.ArrayLike] = None,
        w0: Optional[jax.typing.ArrayLike] = None,
        preconditioner: Optional[jax.typing.ArrayLike] = None,
        callback: Optional[Callable[[jax.Array, jax.Array, jax.Array], None]] = None,
        callback_every: int = 10) -> tuple[jax.Array, FitInfo]:
  r"""Maximum (penalised) likelihood weights of a log-linear model.

  Minimises the summed objective, divided by the total weight
  :math:`M = \sum_n \mathrm{where}_n` only to keep its scale near one nat:

  .. math::
    J(w) = \frac{1}{M} \Big[ \sum_n \mathrm{where}_n \, \ell_n(w)
           + \frac{\lambda}{2} \lVert w \rVert_2^2 \Big],
    \qquad
    M \nabla J = E_w[\phi] - \tilde{E}[\phi] + \lambda w = 0
    \;\Longleftrightarrow\; \tilde{E}[\phi] - E_w[\phi] = \lambda w,

  so ``l2`` (:math:`\lambda`) is a Gaussian prior precision in *count* units
  and the MaxEnt constraints hold exactly without it (``constraint_residual``).
  Runs ``optimizer`` (default ``optax.lbfgs()`` with its zoom line search) in
  a ``lax.while_loop`` until :math:`\lVert \nabla J \rVert_2 <` ``tol`` or
  ``num_steps`` steps; any optax optimizer works (plain ones get
  ``value``/``grad`` extra arguments via ``optax.with_extra_args_support``).
  With a ``preconditioner`` :math:`s` the optimiser runs on :math:`u = w / s`
  (same minimiser; ``tol`` and ``FitInfo.grad_norm`` then refer to
  :math:`\nabla_u J = s \odot \nabla_w J`).

  Args:
    feats: the feature container.
    labels_N: integer labels.
    l2: L2 penalty :math:`\lambda \ge 0`.
    optimizer: an optax transformation; default L-BFGS.
    num_steps: maximum number of optimizer steps.
    tol: tolerance on the gradient norm of the normalised objective ``J``.
    where: optional ``[N]`` mask or multiplicities.
    w0: initial weights (default zeros, float32).
    preconditioner: optional positive scales broadcastable to ``w``'s shape,
      e.g. ``diagonal_preconditioner(feats, where, l2=l2)``.
    callback: optional ``callback(step, objective, grad_norm)`` run on the host
      every ``callback_every`` steps (progress printing).
    callback_every: period of ``callback``.

  Returns:
    ``(w, info)``: weights of shape ``weights_shape(feats)`` and a ``FitInfo``.

  References:
    Lecture 8 (equation 8.8 and the MaxEnt slides); Nocedal and Wright,
    Numerical Optimization (2006), algorithm 7.5 (L-BFGS).

  >>> feats = DenseFeatures(jnp.eye(2)[None].repeat(4, 0))  # phi(x, y) = e_y
  >>> w, info = fit(feats, jnp.array([0, 0, 0, 1]), tol=1e-5)
  >>> p = jnp.exp(log_probs(w, feats)[0])  # the empirical frequencies 3/4, 1/4
  >>> print(f"{p[0]:.4f} {p[1]:.4f} converged={bool(info.converged)}")
  0.7500 0.2500 converged=True
  """
  if not isinstance(l2, jax.core.Tracer) and l2 < 0:
    raise ValueError(f"l2 must be >= 0, got {l2}.")
  if num_steps < 0 or callback_every < 1:
    raise ValueError(f"need num_steps >= 0 and callback_every >= 1, got {num_steps}, "
                     f"{callback_every}.")
  w0 = init_weights(feats) if w0 is None else _check_w(w0, feats)
  _, _, n, num_labels = _parts(feats)
  weights = _example_weights(where, n, jnp.promote_types(w0.dtype, jnp.float32))
  labels = _labels(labels_N, n, num_labels, weights)
  scale = None if preconditioner is None else jnp.asarray(preconditioner, w0.dtype)
  if scale is not None and (scale.ndim > w0.ndim or any(
      a not in (1, b) for a, b in zip(scale.shape[::-1], w0.shape[::-1]))):
    raise ValueError(f"preconditioner shape {scale.shape} does not broadcast to w's {w0.shape}.")
  return _fit_loop(w0, feats, labels, weights, jnp.asarray(l2, weights.dtype), num_steps, tol,
                   scale, optimizer=optimizer, callback=callback, callback_every=callback_every)


@functools.partial(jax.jit, static_argnames=("optimizer", "callback", "callback_every"))
def _fit_loop(w0, feats, labels, weights, l2, num_steps, tol, scale, *, optimizer, callback,
              callback_every):
  """``fit``'s compiled loop; cached per optimizer (``None``: a fresh L-BFGS)."""
  opt = optax.with_extra_args_support(optax.lbfgs() if optimizer is None else optimizer)
  total = jnp.maximum(jnp.sum(weights), 1.0)

  to_w = (lambda u: u) if scale is None else (lambda u: u * scale)

  def objective(u):
    w = to_w(u)
    return (jnp.sum(nll(w, feats, labels, weights)) + 0.5 * l2 * jnp.sum(w * w)) / total

  def value_and_grad(u, state):
    if optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None:
      return optax.value_and_grad_from_state(objective)(u, state=state)  # the line search's
    return jax.value_and_grad(objective)(u)

  def cond(carry):
    step, _, _, value, grad = carry
    return (step < num_steps) & (optax.tree.norm(grad) >= tol) & jnp.isfinite(value)

  def body(carry):
    step, u, state, value, grad = carry
    updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=objective)
    u = optax.apply_updates(u, updates)
    value, grad = value_and_grad(u, state)
    if callback is not None:
      jax.lax.cond((step + 1) % callback_every == 0,
                   lambda: jax.debug.callback(callback, step + 1, value, optax.tree.norm(grad)),
                   lambda: None)
    return step + 1, u, state, value, grad

  u0 = w0 if scale is None else w0 / scale
  state = opt.init(u0)
  init = (jnp.zeros((), jnp.int32), u0, state, *value_and_grad(u0, state))
  step, u, _, value, grad = jax.lax.while_loop(cond, body, init)
  norm = optax.tree.norm(grad)
  return to_w(u), FitInfo(step, value, norm, norm < tol)
