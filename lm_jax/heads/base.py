r"""Output heads: the layer from hidden states to a distribution over the vocabulary.

An :class:`OutputHead` is five pure functions over its own params pytree, so a
language model can swap the full softmax for a cheaper training loss (class-based,
hierarchical, NCE) without changing anything else. The contract every head keeps:

* ``loss`` is the per-token *training* objective in nats, 0 where ``where`` is
  False. It may be a sampled estimate when given a ``key``; with ``key=None`` it
  must be deterministic.
* ``log_prob`` and ``log_probs`` are the exact normalised model log-probabilities,
  used for evaluation and perplexity.
* ``sample`` draws from ``exp(log_probs / temperature)`` renormalised; ``temperature=0``
  is greedy argmax. A row whose hidden state is not finite raises ``ValueError`` eagerly and
  gives :data:`INVALID_SAMPLE` (``-1``) under ``jit``, never a valid-looking id.
* **Targets** (:func:`check_targets`, one helper for every head): a token where ``where``
  is False is ignored whatever its id (``-1`` padding works, eager and under ``jit``: loss
  0, zero gradient) and whatever its hidden state (NaN or Inf there gives loss 0 and exactly
  zero, finite gradients: :func:`guard_hidden` masks the input); a counted target outside
  ``[0, V)`` raises ``ValueError`` naming the id, its index and ``V`` when the targets can
  be read without a device-to-host transfer (:mod:`lm_jax.ops.labels`: NumPy data or
  arrays on a CPU device; :func:`~lm_jax.ops.labels.validate_labels` asks on any device),
  and under ``jit`` (or on a GPU/TPU) gives NaN in ``loss``, ``log_prob`` and the ``sparse`` loss
  and non-finite gradients for the parameters its row touches, so that NaN guards see it.
* **Hidden states** are ``[N, H]`` floating point; a width other than the params' ``H``
  raises ``ValueError`` naming both widths (:func:`params_hidden_size`).
* **Dtypes**: bfloat16 params and hidden states are accepted; softmaxes and log-sigmoids
  run in float32 and losses and log-probabilities come back in float32.
* **Tables**: what the head needs besides its trainable ``params`` (tree paths, class maps,
  alias tables) is ``head.tables``, taken by every function as ``tables=`` so that it can
  reach a compiled program as an argument rather than as embedded constants.

References:
  Chen, Grangier and Auli, "Strategies for training large vocabulary neural
  language models", ACL 2016, Section 3 (the lecture's reference [3]).
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.ops import fused
from lm_jax.ops import labels as labels_lib
from lm_jax.ops import losses
from lm_jax.ops import platform
from lm_jax.ops import precision

# Up to this many logits (64 MiB in float32) the full-softmax head materialises them.
_UNFUSED_MAX_LOGITS = 2**24

Params = Any


class RowSparse(NamedTuple):
  """How a head's training loss reads only a few rows of its big output matrices.

  ``gather(params, targets_N, key) -> (rows, index, aux)``: ``rows`` has the structure of
  ``params`` with each big leaf replaced by the rows the loss needs (``[K, ...]``, repeats
  allowed); ``index`` has the same structure, holding for each gathered leaf the ``[K]``
  int row ids and ``None`` for a leaf the loss uses whole; ``aux`` is whatever else the
  loss needs (local target positions, path signs, sampled ids, ...).
  ``loss(rows, hidden_NxH, aux, *, where=None) -> loss_N``. ``gather`` also takes
  ``tables=`` (the head's tables; ``None``: the head's own). The gather of a head made by
  :func:`with_target_contract` (every lm_jax head) also takes ``where=`` (ignored tokens may
  carry any id, ``-1`` padding included), which :func:`sparse_sgd_step` passes; a custom
  ``RowSparse`` used with it must accept that keyword.

  A head with this field computes ``head.loss`` as ``sparse.loss(*gather(...))``, so the
  dense and the sparse update differentiate the same function.
  """
  gather: Callable[..., tuple]
  loss: Callable[..., jax.Array]


class OutputHead(NamedTuple):
  """``init(key, hidden_size) -> params``; ``loss(params, hidden_NxH, targets_N, *, key=None,
  where=None, tables=None) -> loss_N``; ``log_prob(params, hidden_NxH, targets_N, *,
  tables=None) -> logp_N``; ``log_probs(params, hidden_NxH, *, tables=None) -> logp_NxV``;
  ``sample(params, hidden_NxH, key, *, temperature=1.0, tables=None) -> tokens_N``;
  ``sparse``: a :class:`RowSparse` for heads whose loss touches few output rows (``None``:
  the loss needs every row, e.g. the full softmax); ``tables``: the head's non-trainable
  arrays (tree paths, class maps, alias tables), a dict built once on the host.

  ``params`` are what an optimizer updates; ``tables`` are never differentiated. Pass
  ``tables=head.tables`` through your jitted function's arguments (``jax.jit(f)(params,
  head.tables, ...)``) so that they reach the compiled program as arguments: left at
  ``None`` they are read from the head and, under ``jit``, embedded in the program as
  constants (megabytes of StableHLO at ``V = 1M``, and a recompile per head).

  ``mixed_precision``: True when the head computes in its params' dtype, so bfloat16
  matrices and a bfloat16 hidden state give bfloat16 matmuls (float32 accumulation and
  losses): a mixed-precision model (``make_language_model(dtype=jnp.bfloat16)``) then casts
  the head's matrices. False: the head computes in float32 from any input, and such a model
  leaves its params float32 (casting would only round them and, for the sampled heads, cost
  a ``[V, H]`` cast a step)."""
  init: Callable[..., Params]
  loss: Callable[..., jax.Array]
  log_prob: Callable[..., jax.Array]
  log_probs: Callable[..., jax.Array]
  sample: Callable[..., jax.Array]
  sparse: Optional[RowSparse] = None
  tables: Optional[dict] = None
  mixed_precision: bool = False

  # Hashed and compared by the identity of each field, as the functions always were, so a
  # head (or a model holding one) stays usable as a static argument of jax.jit despite the
  # tables dict.
  def __hash__(self):
    return hash(tuple(map(id, self)))

  def __eq__(self, other):
    return (isinstance(other, OutputHead) and len(self) == len(other)
            and all(a is b for a, b in zip(self, other)))

  def __ne__(self, other):
    return not self == other


def loss_from_sparse(sparse: RowSparse) -> Callable[..., jax.Array]:
  """The head's dense ``loss(params, hidden_NxH, targets_N, *, key=None, where=None)`` as
  ``sparse.loss(*sparse.gather(...))``: one function for the dense and the sparse update."""

  def loss(params, hidden_NxH, targets_N, *, key=None, where=None, tables=None):
    hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
    rows, _, aux = sparse.gather(params, targets_N, key, tables=tables)
    return sparse.loss(rows, hidden_NxH, aux, where=where)

  return loss


def log_prob_from_loss(loss: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``log_prob(params, hidden_NxH, targets_N, *, tables)`` as ``-loss(...)``: for a head
  whose deterministic loss is exactly the negative log-likelihood."""
  return functools.partial(_negated_loss, loss)


def _negated_loss(loss, params, hidden_NxH, targets_N, *, tables=None):
  return -loss(params, hidden_NxH, targets_N, tables=tables)


def sparse_sgd_step(head: OutputHead, params: Params, hidden_NxH: jax.typing.ArrayLike,
                    targets_N: jax.typing.ArrayLike, learning_rate: jax.typing.ArrayLike, *,
                    key: Optional[jax.Array] = None, where: Optional[jax.typing.ArrayLike] = None,
                    tables: Optional[dict] = None) -> tuple[Params, jax.Array, jax.Array]:
  r"""One SGD step on the head's params that touches only the rows its loss reads.

  With :math:`L = \frac{1}{|\mathcal{N}|}\sum_{n} \ell_n` (mean over the tokens where
  ``where`` holds), each gathered row :math:`r` is updated
  :math:`W_r \leftarrow W_r - \eta\, \partial L / \partial W_r` by a scatter-add (repeated
  rows add their gradients, which is the exact gradient), and small leaves used whole get the
  dense update. This is word2vec's update; its cost is O(rows x H), not O(V H), when the
  caller donates ``params`` so that XLA scatters in place (``jax.jit(...,
  donate_argnums=...)``).

  Args:
    head: an :class:`OutputHead` whose ``sparse`` is not None.
    params: the head's params.
    hidden_NxH: hidden states ``[N, H]``.
    targets_N: target ids ``[N]``.
    learning_rate: :math:`\eta`.
    key: PRNG key for sampled heads.
    where: optional ``[N]`` bool mask of the tokens that count.
    tables: the head's tables (default ``head.tables``; pass them as an argument under jit).

  Returns:
    ``(new_params, loss_N, grad_hidden_NxH)``: the gradient of :math:`L` w.r.t. the hidden
    states, to backpropagate into the network below the head.
  """
  if head.sparse is None:
    raise ValueError("this head has no sparse row form (OutputHead.sparse is None); "
                     "use a dense optimizer update")
  rows, index, aux = head.sparse.gather(params, targets_N, key, tables=tables, where=where)
  hidden_NxH = jnp.asarray(hidden_NxH)
  weight_N = (jnp.ones(hidden_NxH.shape[:1], jnp.float32) if where is None
              else jnp.asarray(where, jnp.float32))
  denominator = jnp.maximum(weight_N.sum(), 1.0)

  def objective(rows, hidden_NxH):
    loss_N = head.sparse.loss(rows, hidden_NxH, aux, where=where)
    return jnp.sum(loss_N * weight_N) / denominator, loss_N

  (_, loss_N), (grad_rows, grad_hidden_NxH) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(rows, hidden_NxH)

  def update(idx, param, grad):
    grad = (learning_rate * grad).astype(param.dtype)
    return param - grad if idx is None else param.at[idx].add(-grad)

  new_params = jax.tree.map(update, index, params, grad_rows, is_leaf=lambda x: x is None)
  return new_params, loss_N, grad_hidden_NxH


# The dtype a head computes and returns its losses in: float32, or float64 for float64.
_loss_dtype = fused._compute_dtype


def check_targets(targets_N: jax.typing.ArrayLike, vocab_size: int,
                  where: Optional[jax.typing.ArrayLike] = None) -> tuple[jax.Array, jax.Array]:
  r"""The target contract every head keeps, in one place: ``(safe_targets_N, bad_N)``.

  A token where ``where`` is False is ignored whatever its id (``-1`` padding included). A
  counted target outside ``[0, V)`` raises ``ValueError`` naming the id, its index and
  ``V`` when the targets (and ``where``) are readable on the host
  (:func:`lm_jax.ops.labels.check_in_range`); under ``jit`` it is flagged in
  ``bad_N`` so that the caller returns NaN there (:func:`poison`), never a finite number.
  ``safe_targets_N`` is int32 with every out-of-range id replaced by 0, so the head's
  gathers stay in bounds and ignored tokens get finite values and zero gradients.

  >>> safe, bad = check_targets(jnp.array([2, -1, 0]), 3, where=jnp.array([True, False, True]))
  >>> safe.tolist(), bad.tolist()
  ([2, 0, 0], [False, False, False])
  """
  labels_lib.check_in_range(targets_N, vocab_size, where, what="target",
                            hint="; mark padding with where=False")
  targets_N = jnp.asarray(targets_N)
  in_range_N = labels_lib.in_range_int32(targets_N, vocab_size) >= 0  # never wraps, any dtype
  bad_N = ~in_range_N if where is None else ~in_range_N & jnp.asarray(where, bool)
  return jnp.where(in_range_N, targets_N, 0).astype(jnp.int32), bad_N


def poison(values_N: jax.Array, bad_N: jax.Array) -> jax.Array:
  """``values_N`` with NaN where ``bad_N`` (a counted out-of-range target)."""
  return jnp.where(bad_N, jnp.nan, values_N)


def guard_hidden(hidden_NxH: jax.Array, where: Optional[jax.typing.ArrayLike],
                 bad_N: jax.Array) -> jax.Array:
  r"""The hidden states a head computes with: rows where ``where`` is False set to 0, rows of
  counted out-of-range targets (``bad_N``) set to NaN.

  Masking the *input*, not only the output, is what keeps padding from poisoning: a NaN or
  Inf in an ignored row (a fully masked attention row, say) would otherwise reach every
  parameter's gradient through :math:`0 \cdot \infty`, even though its loss is masked to 0.
  ``jnp.where`` passes a zero cotangent to the unselected input, so the ignored rows' gradient
  is exactly 0. The NaN rows do the opposite on purpose: the loss *and* the gradients of the
  parameters the row touches are NaN, so that a guard such as ``optax.apply_if_finite`` sees
  a bad target under ``jit`` (eagerly :func:`check_targets` raises first).
  """
  if where is not None:
    hidden_NxH = jnp.where(jnp.asarray(where, bool)[:, None], hidden_NxH, 0)
  return jnp.where(bad_N[:, None], jnp.asarray(jnp.nan, hidden_NxH.dtype), hidden_NxH)


# What ``sample`` returns, under ``jit``, for a row whose hidden state is not finite.
INVALID_SAMPLE = -1


def check_sampled_rows(tokens_N: jax.Array, hidden_NxH: jax.Array) -> jax.Array:
  """``tokens_N`` with :data:`INVALID_SAMPLE` (-1) where the row's hidden state has a NaN or
  Inf; eagerly, when the hidden states are readable on the host (not traced, on a CPU
  device), such a row raises ``ValueError`` naming it instead."""
  finite_N = jnp.all(jnp.isfinite(hidden_NxH), axis=-1)
  if labels_lib.readable_on_host(finite_N) and not bool(jnp.all(finite_N)):
    i = int(jnp.argmin(finite_N))
    raise ValueError(f"hidden_NxH row {i} is not finite (NaN or Inf): no token can be sampled "
                     f"from it (under jit such rows give {INVALID_SAMPLE})")
  return jnp.where(finite_N, tokens_N, INVALID_SAMPLE).astype(jnp.int32)


def with_target_contract(head: OutputHead, vocab_size: int) -> OutputHead:
  r"""``head`` as users call it: :func:`check_targets` applied to ``loss``, ``log_prob`` and
  ``sparse``, losses and log-probabilities in float32 (float64 for float64 inputs), and
  ``tables=None`` replaced by ``head.tables``. Nothing process-wide is changed (see
  :mod:`lm_jax.ops.allocator` for the malloc setting an application may choose).

  ``loss(..., where=w)`` is 0 with a zero gradient where ``w`` is False, whatever the id;
  a counted out-of-range id gives ``ValueError`` eagerly and NaN under ``jit`` in ``loss``,
  ``log_prob`` and the ``sparse`` loss alike. Every factory in :mod:`lm_jax.heads` returns
  its head through this function; the inner functions always receive the tables.
  """
  own_tables = {} if head.tables is None else head.tables

  def resolve(tables):
    return own_tables if tables is None else tables

  def loss(params, hidden_NxH, targets_N, *, key=None, where=None, tables=None):
    hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N, params)
    if hidden_NxH.shape[0] == 0:  # an empty batch: nothing to score (and no items to scan)
      return jnp.zeros((0,), _loss_dtype(hidden_NxH))
    safe_N, bad_N = check_targets(targets_N, vocab_size, where)
    hidden_NxH = guard_hidden(hidden_NxH, where, bad_N)
    loss_N = head.loss(params, hidden_NxH, safe_N, key=key, where=where, tables=resolve(tables))
    return poison(loss_N.astype(_loss_dtype(loss_N)), bad_N)

  def log_prob(params, hidden_NxH, targets_N, *, tables=None):
    hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N, params)
    if hidden_NxH.shape[0] == 0:
      return jnp.zeros((0,), _loss_dtype(hidden_NxH))
    safe_N, bad_N = check_targets(targets_N, vocab_size)
    logp_N = head.log_prob(params, hidden_NxH, safe_N, tables=resolve(tables))
    return poison(logp_N.astype(_loss_dtype(logp_N)), bad_N)

  def log_probs(params, hidden_NxH, *, tables=None):
    hidden_NxH, _ = _check_hidden(hidden_NxH, None, params)
    return head.log_probs(params, hidden_NxH, tables=resolve(tables))

  def sample(params, hidden_NxH, key, *, temperature=1.0, tables=None):
    hidden_NxH, _ = _check_hidden(hidden_NxH, None, params)
    tokens_N = head.sample(params, hidden_NxH, key, temperature=temperature,
                           tables=resolve(tables))
    return check_sampled_rows(tokens_N, hidden_NxH)

  sparse = head.sparse
  if sparse is not None:
    inner = sparse

    def gather(params, targets_N, key=None, *, tables=None, where=None):
      safe_N, bad_N = check_targets(targets_N, vocab_size, where)
      rows, index, aux = inner.gather(params, safe_N, key, tables=resolve(tables))
      return rows, index, (aux, bad_N)

    def sparse_loss(rows, hidden_NxH, aux_and_bad, *, where=None):
      aux, bad_N = aux_and_bad
      counted_bad_N = bad_N if where is None else bad_N & jnp.asarray(where, bool)
      hidden_NxH = guard_hidden(jnp.asarray(hidden_NxH), where, counted_bad_N)
      loss_N = inner.loss(rows, hidden_NxH, aux, where=where)
      return poison(loss_N.astype(_loss_dtype(loss_N)), counted_bad_N)

    sparse = RowSparse(gather, sparse_loss)
  return OutputHead(head.init, loss, log_prob, log_probs, sample, sparse, own_tables,
                    head.mixed_precision)


def frequency_rank_tables(counts_V) -> dict[str, jax.Array]:
  """``{"rank_of_id_V", "id_of_rank_V"}``: each id's rank in decreasing training count (ties
  by id) and its inverse, int32, for heads laid out in frequency order.

  >>> {k: v.tolist() for k, v in frequency_rank_tables([1, 5, 5, 0]).items()}
  {'rank_of_id_V': [2, 0, 1, 3], 'id_of_rank_V': [1, 2, 0, 3]}
  """
  counts_V = np.asarray(counts_V)
  id_of_rank = np.argsort(-counts_V, kind="stable").astype(np.int32)
  rank_of_id = np.empty(counts_V.shape[0], np.int32)
  rank_of_id[id_of_rank] = np.arange(counts_V.shape[0], dtype=np.int32)
  return {"rank_of_id_V": jnp.asarray(rank_of_id), "id_of_rank_V": jnp.asarray(id_of_rank)}


def params_hidden_size(params: Params) -> Optional[int]:
  """The hidden width ``H`` a head's params were made for, read from the shape letters of
  their leaf names (the last axis of every ``*xH`` leaf; the sum of the differentiated
  softmax's ``band_weights`` widths), or None when no leaf says."""
  if not isinstance(params, dict):
    return None
  if "band_weights" in params:
    return sum(int(w.shape[-1]) for w in params["band_weights"])
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    name = getattr(path[-1], "key", None) if path else None
    if isinstance(name, str) and name.endswith("xH") and hasattr(leaf, "shape"):
      return int(leaf.shape[-1])
  return None


def _check_hidden(hidden_NxH, targets_N=None, params=None):
  hidden_NxH = jnp.asarray(hidden_NxH)
  if hidden_NxH.ndim != 2:
    raise ValueError(f"hidden_NxH must have rank 2 [N, H], got shape {hidden_NxH.shape}")
  if not jnp.issubdtype(hidden_NxH.dtype, jnp.floating):
    raise ValueError(f"hidden_NxH must be floating point, got dtype {hidden_NxH.dtype} "
                     "(cast integer inputs explicitly)")
  width = None if params is None else params_hidden_size(params)
  if width is not None and hidden_NxH.shape[1] != width:
    raise ValueError(f"hidden_NxH has width H={hidden_NxH.shape[1]}, but the head's params were "
                     f"made for H={width} (shape {hidden_NxH.shape})")
  if targets_N is not None:
    targets_N = jnp.asarray(targets_N)
    if targets_N.shape != hidden_NxH.shape[:1]:
      raise ValueError(
          f"targets_N has shape {targets_N.shape}, expected [N] = {hidden_NxH.shape[:1]}")
    if not jnp.issubdtype(targets_N.dtype, jnp.integer):
      raise ValueError(f"targets_N must be integer token ids, got dtype {targets_N.dtype}")
  return hidden_NxH, targets_N


def sample_from_log_probs(log_probs_NxV: jax.typing.ArrayLike, key: jax.Array, *,
                          temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
  r"""Draws a token per row with :math:`p_i \propto \exp(\log p_i / \tau)`; ``tau = 0``: argmax.

  ``temperature`` may be a traced scalar (both branches are computed and selected).

  Args:
    log_probs_NxV: log-probabilities (or any logits) ``[N, V]``.
    key: a PRNG key.
    temperature: :math:`\tau \ge 0`.

  Returns:
    ``[N]`` int32 token ids.

  >>> logp_NxV = jnp.log(jnp.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]))
  >>> sample_from_log_probs(logp_NxV, jax.random.PRNGKey(0), temperature=0.0).tolist()
  [1, 0]
  """
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  logits_NxV = jnp.asarray(log_probs_NxV, jnp.result_type(jnp.float32, log_probs_NxV))
  greedy = jnp.asarray(temperature) <= 0
  safe_temperature = jnp.where(greedy, 1.0, temperature)
  drawn_N = jax.random.categorical(key, logits_NxV / safe_temperature, axis=-1)
  return jnp.where(greedy, jnp.argmax(logits_NxV, axis=-1), drawn_N).astype(jnp.int32)


def sample_by_walk(walk: Callable[..., jax.Array], log_probs: Callable[..., jax.Array]
                   ) -> Callable[..., jax.Array]:
  r"""A head's ``sample`` that uses its cheap factorised ``walk(params, hidden_NxH, key, tables)``
  at temperature 1 and :func:`sample_from_log_probs` otherwise.

  Tempering does not factor over a class-then-word draw or a tree's binary decisions
  (:math:`\prod_d \sigma(s_d)^{1/\tau}` is not renormalised level by level), so any
  temperature other than the Python number 1.0 (a traced one too) samples exactly from
  ``exp(log_probs / temperature)``; ``walk`` gets the checked hidden states.
  """

  def sample(params, hidden_NxH, key, *, temperature=1.0, tables=None):
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
      return sample_from_log_probs(log_probs(params, hidden_NxH, tables=tables), key,
                                   temperature=temperature)
    hidden_NxH, _ = _check_hidden(hidden_NxH)
    return walk(params, hidden_NxH, key, tables)

  return sample


def full_softmax(vocab_size: int, *, init_scale: float = 0.1, dtype=jnp.float32,
                 implementation: str = "auto") -> OutputHead:
  r"""The exact softmax over all ``V`` words.

  .. math::
    \log p(w \mid h) = h \cdot W_w + b_w - \log \sum_{v=1}^{V} \exp(h \cdot W_v + b_v)

  ``loss`` and ``log_prob`` use :func:`lm_jax.ops.fused.linear_softmax_cross_entropy`,
  which never builds the ``[N, V]`` logits; ``log_probs`` and ``sample`` do.
  Params ``{"weight_VxH", "bias_V"}``, both uniform(-init_scale, init_scale) as in
  Zaremba et al. (2014). ``loss`` ignores ``key``.

  Args:
    vocab_size: ``V``.
    init_scale: half-width of the uniform initialisation.
    dtype: parameter dtype.
    implementation: the fused loss's form (``"auto"``: per platform; ``"cpu"``,
      ``"accelerator"``; see :func:`~lm_jax.ops.fused.linear_softmax_cross_entropy`).

  Returns:
    An :class:`OutputHead`.

  >>> head = full_softmax(3)
  >>> params = {"weight_VxH": jnp.array([[1.0], [0.0], [-1.0]]), "bias_V": jnp.zeros(3)}
  >>> h_NxH = jnp.array([[0.0], [1.0]])
  >>> print(jnp.round(jnp.exp(head.log_probs(params, h_NxH)), 4))
  [[0.3333 0.3333 0.3333]
   [0.6652 0.2447 0.09  ]]
  >>> print(jnp.round(head.loss(params, h_NxH, jnp.array([0, 0])), 4))  # log 3, -log .6652
  [1.0986 0.4076]
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  platform.check_implementation(implementation)

  def init(key, hidden_size):
    k_w, k_b = jax.random.split(key)
    return {"weight_VxH": jax.random.uniform(k_w, (vocab_size, hidden_size), dtype,
                                             -init_scale, init_scale),
            "bias_V": jax.random.uniform(k_b, (vocab_size,), dtype, -init_scale, init_scale)}

  def loss(params, hidden_NxH, targets_N, *, key=None, where=None, tables=None):
    del key, tables  # The full softmax is exact and has no tables.
    hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
    if hidden_NxH.shape[0] * vocab_size <= _UNFUSED_MAX_LOGITS:
      # Small [N, V] (e.g. PTB: 400 x 10002): one matmul and the closed-form CE kernel are
      # faster than chunk streaming (a PTB train step 94 vs 70 ms, bench_train_step.py).
      dtype = _loss_dtype(hidden_NxH, params["weight_VxH"])  # bf16 in, float32 logits
      logits_NxV = (precision.matmul(hidden_NxH, params["weight_VxH"].T)
                    + params["bias_V"].astype(dtype))
      return losses.softmax_cross_entropy_with_integer_labels(logits_NxV, targets_N, where=where)
    return fused.linear_softmax_cross_entropy(hidden_NxH, params["weight_VxH"], targets_N,
                                              bias_V=params["bias_V"], where=where,
                                              implementation=implementation)

  log_prob = log_prob_from_loss(loss)

  def log_probs(params, hidden_NxH, *, tables=None):
    del tables
    hidden_NxH, _ = _check_hidden(hidden_NxH)
    dtype = jnp.result_type(jnp.float32, hidden_NxH, params["weight_VxH"])
    logits_NxV = precision.matmul(hidden_NxH, params["weight_VxH"].T)
    return jax.nn.log_softmax(logits_NxV + params["bias_V"].astype(dtype), axis=-1)

  def sample(params, hidden_NxH, key, *, temperature=1.0, tables=None):
    return sample_from_log_probs(log_probs(params, hidden_NxH, tables=tables), key,
                                 temperature=temperature)

  return with_target_contract(
      OutputHead(init, loss, log_prob, log_probs, sample, mixed_precision=True), vocab_size)
