r"""Flax NNX layers over lm_jax's pure functions: an output head and a recurrent layer.

Both layers hold arrays only; every computation is the functional head or cell
(:mod:`lm_jax.heads`, :mod:`lm_jax.models.rnn`) called with those arrays, so values and
gradients are the functional ones with the same parameters.

* :class:`OutputLayer` wraps any :class:`~lm_jax.heads.OutputHead`: each trainable leaf
  of the head's params is one ``nnx.Param`` (named after the leaf, e.g. ``weight_VxH``,
  with its shape letters as ``axes`` metadata), and the head's tables (tree paths, class
  maps, alias tables) are :class:`HeadTable` variables, so ``nnx.state(layer, nnx.Param)``
  and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` see only what an optimizer updates,
  while the tables still reach compiled programs as arguments (never as constants).
* :class:`RNNLayer` runs an Elman / GRU / LSTM cell over ``[B, T, E]`` inputs with
  :func:`lm_jax.models.rnn.scan_layer` (input projection hoisted, one ``lax.scan``).

``dtype`` is the computation dtype (params and inputs are cast to it, as Flax's
``nnx.Linear`` does); ``param_dtype`` is the storage dtype. Heads compute their softmaxes
in float32 and return float32 losses whatever ``dtype`` is.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from lm_jax import heads
>>> from lm_jax import nnx as lm_nnx
>>> layer = lm_nnx.OutputLayer(heads.full_softmax(5), 3, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 3)), jnp.array([0, 4])).shape
(2,)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from lm_jax import heads as heads_lib
from lm_jax._layer_util import cast_floating
from lm_jax._layer_util import flatten_hidden
from lm_jax._layer_util import initialize_leaves
from lm_jax._layer_util import leaf_name
from lm_jax._layer_util import resolve_param_init
from lm_jax._layer_util import shape_axes
from lm_jax.models import rnn

Initializer = Callable[..., jax.Array]


class HeadTable(nnx.Variable):
  """A head's non-trainable array (tree paths, class maps, alias tables): not an ``nnx.Param``."""


def param_variables(params: Any, param_dtype) -> dict:
  """``{leaf_name: nnx.Param}`` for every leaf of ``params``, stored in ``param_dtype``."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  variables = {}
  for path, leaf in leaves:
    name = leaf_name(path)
    meta = {}
    axes = shape_axes(name, jnp.ndim(leaf))
    if axes is not None:
      meta["axes"] = axes
    dtype = param_dtype if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else None
    variables[name] = nnx.Param(jnp.asarray(leaf, dtype), **meta)
  return variables


def _key(rngs):
  """A PRNG key from an ``nnx.Rngs``, one of its streams, a key, or None."""
  return rngs() if callable(rngs) else rngs


def _values(variables: dict) -> dict:
  return {name: v[...] for name, v in variables.items()}


class OutputLayer(nnx.Module):
  r"""Any :class:`~lm_jax.heads.OutputHead` as an NNX module: hidden states to token losses.

  ``__call__(hidden_NxH, targets_N, *, where=None, rngs=None) -> loss_N`` is
  ``head.loss`` (the training objective in nats, unreduced; ``where`` False: loss 0 and
  no gradient, whatever the id); ``rngs`` (an ``nnx.Rngs``, one of its streams, or a key)
  feeds the sampled
  heads (NCE, negative sampling, sampled softmax); without it their loss is
  deterministic. ``log_prob``, ``log_probs`` and ``sample`` are the head's exact
  functions. Hidden states may have leading dims ``[..., H]`` (flattened for the head).

  Args:
    head: an :class:`~lm_jax.heads.OutputHead`, e.g. ``heads.make_head("class", ...)``.
    in_features: ``H``.
    dtype: computation dtype (None: the params' and inputs' own).
    param_dtype: storage dtype of the trainable params.
    kernel_init: optional initializer ``kernel_init(key, shape, dtype)`` (e.g.
      ``jax.nn.initializers.lecun_normal()``) for every weight matrix of the head, called
      with the matrix's true fan-in as Flax's ``Dense`` does: ``weight_VxH`` is drawn as an
      ``[H, V]`` kernel (fan-in ``H``) and stored transposed; see
      :func:`lm_jax._layer_util.fan_in_axis`. None: the head's own ``init``.
    bias_init: optional initializer for every vector leaf (``bias_V``, ``class_bias_C``,
      ...). None: the head's own ``init`` (the sampled heads' includes an offset that
      starts them at the uniform distribution; a ``bias_init`` replaces it). Scalars
      (NCE's ``log_z``) always keep the head's init.
    param_init: deprecated; stands for both ``kernel_init`` and ``bias_init``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, head: heads_lib.OutputHead, in_features: int, *, dtype=None,
               param_dtype=jnp.float32, kernel_init: Optional[Initializer] = None,
               bias_init: Optional[Initializer] = None,
               param_init: Optional[Initializer] = None, rngs: nnx.Rngs):
    kernel_init, bias_init = resolve_param_init(param_init, kernel_init, bias_init)
    key = rngs.params()
    params = initialize_leaves(head.init(key, in_features), key, kernel_init, bias_init,
                               param_dtype)
    self.in_features = in_features
    self.dtype = dtype
    self.head = nnx.static(head._replace(tables=None))
    self.treedef = nnx.static(jax.tree.structure(params))
    self.leaf_names = nnx.static(tuple(
        leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]))
    self.params = nnx.data(param_variables(params, param_dtype))
    self.tables = nnx.data(jax.tree.map(HeadTable, dict(head.tables or {})))

  def head_params(self) -> Any:
    """The params pytree the functional head takes (cast to ``dtype``)."""
    leaves = [self.params[name][...] for name in self.leaf_names]
    return cast_floating(jax.tree.unflatten(self.treedef, leaves), self.dtype)

  def head_tables(self) -> dict:
    return jax.tree.map(lambda v: v[...], self.tables,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))

  def _flat(self, hidden_xH):
    return flatten_hidden(hidden_xH, self.in_features, self.dtype)

  def __call__(self, hidden_xH, targets_x, *, where=None, rngs=None) -> jax.Array:
    hidden_NxH, lead = self._flat(hidden_xH)
    targets_N = jnp.asarray(targets_x).reshape(-1)
    where_N = None if where is None else jnp.asarray(where, bool).reshape(-1)
    key = _key(rngs)
    loss_N = self.head.loss(self.head_params(), hidden_NxH, targets_N, key=key, where=where_N,
                            tables=self.head_tables())
    return loss_N.reshape(lead)

  def log_prob(self, hidden_xH, targets_x) -> jax.Array:
    hidden_NxH, lead = self._flat(hidden_xH)
    return self.head.log_prob(self.head_params(), hidden_NxH, jnp.asarray(targets_x).reshape(-1),
                              tables=self.head_tables()).reshape(lead)

  def log_probs(self, hidden_xH) -> jax.Array:
    hidden_NxH, lead = self._flat(hidden_xH)
    logp_NxV = self.head.log_probs(self.head_params(), hidden_NxH, tables=self.head_tables())
    return logp_NxV.reshape(*lead, logp_NxV.shape[-1])

  def sample(self, hidden_xH, rngs, *, temperature=1.0) -> jax.Array:
    hidden_NxH, lead = self._flat(hidden_xH)
    key = _key(rngs)
    return self.head.sample(self.head_params(), hidden_NxH, key, temperature=temperature,
                            tables=self.head_tables()).reshape(lead)


class RNNLayer(nnx.Module):
  r"""One recurrent layer (:func:`lm_jax.models.rnn.get_cell`) over a sequence, as NNX.

  ``__call__(inputs_BxTxE, carry=None, *, mask_BxT=None) -> (outputs_BxTxH, carry)``;
  ``carry=None`` starts from :meth:`initial_carry` (zeros). Params are the cell's
  (``W_xh_ExG``, ``W_hh_HxG``, ``b_G``; ``G`` = ``H``, ``3H``, ``4H``), one ``nnx.Param`` each.

  Args:
    cell_name: ``elman`` (= ``rnn_tanh``), ``rnn_relu``, ``elman_direct``, ``gru``, ``lstm``.
    in_features: ``E``.
    hidden_features: ``H``.
    unroll: ``lax.scan``'s unroll.
    dtype: computation dtype (None: the params' and inputs' own).
    param_dtype: storage dtype.
    init_scale: params start uniform(-init_scale, init_scale) (Zaremba et al. 2014).
    kernel_init: optional initializer for ``W_xh_ExG`` (fan-in ``E``) and ``W_hh_HxG``
      (fan-in ``H``), each drawn whole as an ``[in, G]`` kernel; None: uniform as above.
    bias_init: optional initializer for ``b_G`` (and GRU's ``b_hn_H``; it replaces LSTM's
      ``forget_bias``); None: uniform as above.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, cell_name: str, in_features: int, hidden_features: int, *,
               unroll: int = 1, dtype=None, param_dtype=jnp.float32, init_scale: float = 0.1,
               kernel_init: Optional[Initializer] = None,
               bias_init: Optional[Initializer] = None, rngs: nnx.Rngs):
    cell = rnn.get_cell(cell_name)
    key = rngs.params()
    params = initialize_leaves(
        cell.init(key, in_features, hidden_features, init_scale=init_scale, dtype=param_dtype),
        key, kernel_init, bias_init, param_dtype)
    self.cell = nnx.static(cell)
    self.cell_name = cell_name
    self.in_features, self.hidden_features = in_features, hidden_features
    self.unroll, self.dtype = unroll, dtype
    self.params = nnx.data(param_variables(params, param_dtype))

  def initial_carry(self, batch_size: int):
    """Zeros: an ``[B, H]`` array (a ``(c, h)`` pair for LSTM)."""
    return self.cell.initial_carry(batch_size, self.hidden_features,
                                   self.dtype or jnp.float32)

  def __call__(self, inputs_BxTxE, carry=None, *, mask_BxT=None):
    inputs_BxTxE = cast_floating(jnp.asarray(inputs_BxTxE), self.dtype)
    if carry is None:
      carry = self.initial_carry(inputs_BxTxE.shape[0])
    return rnn.scan_layer(self.cell, _values(self.params), inputs_BxTxE, carry, mask_BxT,
                          unroll=self.unroll, dtype=self.dtype)
