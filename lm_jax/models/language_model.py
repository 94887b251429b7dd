r"""A recurrent language model (embedding, stacked RNN layers, output head) as pure functions.

.. math::
  e_t = E[w_t], \quad h^{(l)}_t = \mathrm{cell}_l(h^{(l)}_{t-1}, h^{(l-1)}_t), \quad
  \ell_t = -\log p(w_{t+1} \mid h^{(L)}_t)

Dropout follows Zaremba et al. (2014), Section 3: only on the non-recurrent
connections (the embedding output, between layers, and before the head), never on
the carry, with an independent mask per site and per token (inverted dropout).

References:
  Zaremba, Sutskever and Vinyals, "Recurrent neural network regularization", 2014.
  Mikolov et al., "Recurrent neural network based language model", Interspeech 2010.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from lm_jax import heads as heads_lib
from lm_jax.models import rnn
from lm_jax.ops import precision

Params = Any
State = tuple


class LanguageModel(NamedTuple):
  """``init(key) -> params``; ``initial_state(batch_size) -> state``;
  ``hidden(params, inputs_BxT, state, *, mask_BxT=None, dropout_key=None)
  -> (hidden_BxTxH, state)``; ``loss(params, inputs_BxT, targets_BxT, state, *,
  mask_BxT=None, dropout_key=None, row_ids_B=None) -> (loss_BxT, state)`` (``row_ids_B``: the
  rows' global batch indices, so dropout masks do not depend on the device split);
  ``nll(params, inputs_BxT, targets_BxT, state, *, mask_BxT=None) -> (nll_BxT, state)``, the
  exact ``-log p(target)`` from ``head.log_prob`` (evaluation: for a sampled head ``loss`` is
  only a training objective); ``log_probs(params, hidden_...xH) -> [..., V]``; ``head``, the :class:`~lm_jax.heads.OutputHead`;
  ``hidden_from_embeddings(params, emb_BxTxE, state, *, mask_BxT=None, dropout_key=None)``, like
  ``hidden`` after the embedding lookup (for gradients w.r.t. the embedded inputs);
  ``head_params(params)``, the params to give ``head``'s functions (with tied weights, the
  embedding as ``weight_VxH``). ``loss``, ``nll`` and ``log_probs`` also take ``tables=``,
  passed to the head (default ``head.tables``; give them as an argument of your jitted
  function so they are not compiled in as constants)."""
  init: Callable[..., Params]
  initial_state: Callable[[int], State]
  hidden: Callable[..., tuple]
  loss: Callable[..., tuple]
  nll: Callable[..., tuple]
  log_probs: Callable[..., jax.Array]
  head: heads_lib.OutputHead
  hidden_from_embeddings: Callable[..., tuple]
  head_params: Callable[[Params], Params]


def inverted_dropout(x: jax.typing.ArrayLike, rate: float, key: Optional[jax.Array], *,
                     row_ids: Optional[jax.typing.ArrayLike] = None,
                     broadcast_dims: Sequence[int] = ()) -> jax.Array:
  r"""Inverted dropout: zero each entry with probability ``rate``, scale the rest by ``1/(1-rate)``.

  The identity when ``key`` is None or ``rate == 0``. With ``row_ids`` (``[B]`` ints, the
  rows' global indices in the batch) row ``b``'s mask is drawn from
  ``fold_in(key, row_ids[b])``, so it does not depend on how the batch's rows are split over
  devices: P devices draw exactly the masks one device draws for the whole batch.
  ``broadcast_dims`` (as ``flax.linen.Dropout``'s): axes along which one mask entry is shared,
  e.g. ``(1,)`` on ``[B, T, F]`` for one mask per sequence reused at every time step (Gal and
  Ghahramani 2016's variational dropout, Merity et al. 2018's locked dropout); it also draws
  ``T`` times fewer random numbers.

  >>> inverted_dropout(jnp.ones(4), 0.5, None).tolist()
  [1.0, 1.0, 1.0, 1.0]
  >>> y = inverted_dropout(jnp.ones((2, 3, 4)), 0.5, jax.random.PRNGKey(0), broadcast_dims=(1,))
  >>> bool(jnp.all(y == y[:, :1]))  # the same mask at every time step
  True
  """
  x = jnp.asarray(x)
  if key is None or rate == 0.0:
    return x
  broadcast_dims = tuple(d % x.ndim for d in broadcast_dims)
  mask_shape = tuple(1 if d in broadcast_dims else n for d, n in enumerate(x.shape))
  if row_ids is None:
    keep = jax.random.bernoulli(key, 1.0 - rate, mask_shape)
  else:
    if 0 in broadcast_dims:
      raise ValueError("with row_ids each row draws its own mask, so broadcast_dims cannot "
                       f"contain the row axis 0, got {broadcast_dims}")
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(row_ids))
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, mask_shape[1:]))(row_keys)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def make_language_model(*, vocab_size: int, embed_size: int, hidden_size: int,
                        num_layers: int = 1, cell: Union[str, rnn.Cell] = "lstm",
                        dropout: float = 0.0, init_scale: float = 0.1,
                        head: Optional[heads_lib.OutputHead] = None,
                        tie_weights: bool = False,
                        variational_dropout: bool = False,
                        dtype: Any = None) -> LanguageModel:
  r"""Builds an embedding + ``num_layers`` x ``cell`` + ``head`` language model.

  Params are ``{"embed_VxE", "layers": [cell params, ...], "head": head params}``, all
  initialised uniform(-init_scale, init_scale) (Zaremba et al. use 0.1 for the small
  model, 0.05 medium, 0.04 large). The state is a tuple of per-layer carries.

  ``dropout_key`` given to ``hidden``/``loss`` is split into ``num_layers + 2`` keys:
  one per dropout site (embedding output, each layer's output, the last feeding the
  head) and one passed to ``head.loss`` as ``key`` (sampled heads need it). Without
  ``dropout_key`` there is no dropout and the head's loss gets ``key=None``.

  Args:
    vocab_size: ``V``.
    embed_size: ``E``.
    hidden_size: ``H``, the same for every layer.
    num_layers: depth of the stack of :func:`lm_jax.models.rnn.scan_layer`.
    cell: a name for :func:`lm_jax.models.rnn.get_cell`, or a :class:`lm_jax.models.rnn.Cell`.
    dropout: rate in ``[0, 1)`` at each non-recurrent connection.
    init_scale: half-width of the uniform initialisation.
    head: an :class:`~lm_jax.heads.OutputHead`; defaults to
      ``heads.full_softmax(vocab_size, init_scale=init_scale)``.
    tie_weights: use the embedding matrix as the head's ``weight_VxH`` (Press and Wolf
      2017; Inan et al. 2017): needs ``embed_size == hidden_size`` and a head with a
      ``weight_VxH`` param (full softmax, NCE, negative sampling, sampled softmax). The
      head's own copy is not stored; its gradient flows into ``embed_VxE``.
    variational_dropout: draw each dropout mask once per sequence and reuse it at every
      time step (:func:`inverted_dropout` with ``broadcast_dims=(1,)``; Gal and Ghahramani
      2016, Merity et al. 2018) instead of afresh per token. It draws ``T`` times fewer
      random numbers, which on CPU is most of dropout's cost.
    dtype: the compute dtype; None (default) computes in the params' dtype. ``bfloat16``
      is mixed precision: the params stay float32 and are cast where they are used (their
      gradients come back float32; the recurrent weights' are summed over time in float32,
      :func:`lm_jax.models.rnn.scan_layer`), so the embedding output, the layers' inputs
      and outputs and their matmuls run in bfloat16 with float32 accumulation, while the
      optimizer state, the recurrent carry, the nonlinearities and the losses stay
      float32. The head's matrices are cast when it computes in its params' dtype
      (``head.mixed_precision``: the full softmax and the D-softmax); the other heads take
      the bfloat16 hidden state and compute in float32 from float32 params.

  Returns:
    A :class:`LanguageModel`.

  >>> model = make_language_model(vocab_size=5, embed_size=3, hidden_size=4, cell="gru")
  >>> params = model.init(jax.random.PRNGKey(0))
  >>> tokens_BxT = jnp.array([[1, 2, 3], [4, 0, 1]])
  >>> loss_BxT, state = model.loss(params, tokens_BxT, tokens_BxT, model.initial_state(2))
  >>> loss_BxT.shape, [s.shape for s in state]
  ((2, 3), [(2, 4)])
  """
  for name, value in (("vocab_size", vocab_size), ("embed_size", embed_size),
                      ("hidden_size", hidden_size), ("num_layers", num_layers)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  if dtype is not None and jnp.dtype(dtype) == jnp.float16:
    raise ValueError("dtype=float16 needs loss scaling, which lm_jax does not do: use "
                     "bfloat16 (float32's exponent range) for mixed precision")
  cell = rnn.get_cell(cell) if isinstance(cell, str) else cell
  head = heads_lib.full_softmax(vocab_size, init_scale=init_scale) if head is None else head
  rate = dropout
  dropout_dims = (1,) if variational_dropout else ()  # [B, T, F]: share along T.
  if tie_weights and embed_size != hidden_size:
    raise ValueError(f"tie_weights needs embed_size == hidden_size, got {embed_size} and "
                     f"{hidden_size}")

  def _compute(tree):
    """``tree``'s floating leaves in the compute dtype (a no-op without ``dtype``)."""
    return precision.cast_floating(tree, dtype)

  def _head_compute(head_params):
    """The head's matrices in the compute dtype if it computes in its params' dtype
    (``head.mixed_precision``); its vectors and scalars (biases, ``log_z``) stay as they are."""
    if not head.mixed_precision:
      return head_params
    return precision.cast_floating(head_params, dtype, matrices_only=True)

  def _head_params(params):
    """What the head's functions take: its params (with tied weights, the embedding as
    ``weight_VxH``), matrices in the compute dtype for a mixed-precision head."""
    return _head_compute(_head_tree(params))

  def init(key):
    k_embed, k_head, *k_layers = jax.random.split(key, num_layers + 2)
    head_params = head.init(k_head, hidden_size)
    if tie_weights:
      if not isinstance(head_params, dict) or "weight_VxH" not in head_params:
        raise ValueError("tie_weights needs a head with a weight_VxH param (full, nce, neg, "
                         f"sampled); this head's params are {jax.tree.structure(head_params)}")
      head_params = {k: v for k, v in head_params.items() if k != "weight_VxH"}
    return {"embed_VxE": jax.random.uniform(k_embed, (vocab_size, embed_size), jnp.float32,
                                            -init_scale, init_scale),
            "layers": [cell.init(k, embed_size if i == 0 else hidden_size, hidden_size,
                                 init_scale=init_scale) for i, k in enumerate(k_layers)],
            "head": head_params}

  def _head_tree(params):
    if not tie_weights:
      return params["head"]
    return {**params["head"], "weight_VxH": params["embed_VxE"]}

  def _tables(tables):
    """``tables=`` for the head when given (a head built by hand may not take the keyword)."""
    return {} if tables is None else {"tables": tables}

  def initial_state(batch_size):
    return tuple(cell.initial_carry(batch_size, hidden_size) for _ in range(num_layers))

  def _keys(dropout_key):
    if dropout_key is None:
      return [None] * (num_layers + 2)
    return list(jax.random.split(dropout_key, num_layers + 2))

  def _stack(params, emb_BxTxE, state, mask_BxT, keys, row_ids_B=None):
    if len(state) != num_layers:
      raise ValueError(f"state has {len(state)} layer carries, expected num_layers={num_layers}")
    x_BxTxF = inverted_dropout(_compute(emb_BxTxE), rate, keys[0], row_ids=row_ids_B,
                               broadcast_dims=dropout_dims)
    new_state = []
    for layer_params, carry, key in zip(params["layers"], state, keys[1:num_layers + 1]):
      x_BxTxF, carry = rnn.scan_layer(cell, layer_params, x_BxTxF, carry, mask_BxT,
                                      dtype=dtype)
      x_BxTxF = inverted_dropout(_compute(x_BxTxF), rate, key, row_ids=row_ids_B,
                                 broadcast_dims=dropout_dims)
      new_state.append(carry)
    return x_BxTxF, tuple(new_state)

  def hidden_from_embeddings(params, emb_BxTxE, state, *, mask_BxT=None, dropout_key=None,
                             row_ids_B=None):
    return _stack(params, emb_BxTxE, state, mask_BxT, _keys(dropout_key), row_ids_B)

  def _embed(params, inputs_BxT):
    inputs_BxT = jnp.asarray(inputs_BxT)
    if inputs_BxT.ndim != 2 or not jnp.issubdtype(inputs_BxT.dtype, jnp.integer):
      raise ValueError(f"inputs_BxT must be integer token ids of rank 2 [B, T], got shape "
                       f"{inputs_BxT.shape} dtype {inputs_BxT.dtype}")
    return jnp.take(params["embed_VxE"], inputs_BxT, axis=0)

  def hidden(params, inputs_BxT, state, *, mask_BxT=None, dropout_key=None, row_ids_B=None):
    return hidden_from_embeddings(params, _embed(params, inputs_BxT), state,
                                  mask_BxT=mask_BxT, dropout_key=dropout_key, row_ids_B=row_ids_B)

  def loss(params, inputs_BxT, targets_BxT, state, *, mask_BxT=None, dropout_key=None,
           row_ids_B=None, tables=None):
    targets_BxT = jnp.asarray(targets_BxT)
    if targets_BxT.shape != jnp.shape(inputs_BxT):
      raise ValueError(f"targets_BxT has shape {targets_BxT.shape}, expected the inputs' "
                       f"{jnp.shape(inputs_BxT)}")
    keys = _keys(dropout_key)
    hidden_BxTxH, new_state = _stack(params, _embed(params, inputs_BxT), state, mask_BxT, keys,
                                     row_ids_B)
    batch, steps, width = hidden_BxTxH.shape
    where_N = None if mask_BxT is None else jnp.asarray(mask_BxT, bool).reshape(batch * steps)
    loss_N = head.loss(_head_params(params), hidden_BxTxH.reshape(batch * steps, width),
                       targets_BxT.reshape(batch * steps), key=keys[-1], where=where_N,
                       **_tables(tables))
    return loss_N.reshape(batch, steps), new_state

  def nll(params, inputs_BxT, targets_BxT, state, *, mask_BxT=None, tables=None):
    targets_BxT = jnp.asarray(targets_BxT)
    hidden_BxTxH, new_state = hidden(params, inputs_BxT, state, mask_BxT=mask_BxT)
    batch, steps, width = hidden_BxTxH.shape
    logp_N = head.log_prob(_head_params(params), hidden_BxTxH.reshape(batch * steps, width),
                           targets_BxT.reshape(batch * steps), **_tables(tables))
    nll_BxT = -logp_N.reshape(batch, steps)
    if mask_BxT is not None:
      nll_BxT = jnp.where(jnp.asarray(mask_BxT, bool), nll_BxT, 0.0)
    return nll_BxT, new_state

  def log_probs(params, hidden_xH, *, tables=None):
    hidden_xH = _compute(jnp.asarray(hidden_xH))
    logp_NxV = head.log_probs(_head_params(params), hidden_xH.reshape(-1, hidden_xH.shape[-1]),
                              **_tables(tables))
    return logp_NxV.reshape(*hidden_xH.shape[:-1], logp_NxV.shape[-1])

  return LanguageModel(init, initial_state, hidden, loss, nll, log_probs, head,
                       hidden_from_embeddings, _head_params)
