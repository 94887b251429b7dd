r"""Flax Linen layers over lm_jax's pure functions: an output head and a recurrent layer.

The Linen twins of :mod:`lm_jax.nnx` (same arguments, same maths; nothing computed twice):

* :class:`OutputLayer` declares each trainable leaf of the head's params as its own
  ``"params"`` entry (named after the leaf, ``weight_VxH``; nested leaves
  ``band_weights/0``) and the head's tables in a separate ``"tables"`` collection, so an
  optax optimizer over ``variables["params"]`` never sees them. Pass both collections to
  ``apply`` (``model.apply(variables, ...)`` with ``variables = model.init(...)``).
* :class:`RNNLayer` runs a cell over ``[B, T, E]`` with :func:`lm_jax.models.rnn.scan_layer`.

Methods other than ``__call__`` are reached with ``method=``:
``model.apply(variables, hidden, method=OutputLayer.log_probs)``.

>>> import jax, jax.numpy as jnp
>>> from lm_jax import heads
>>> from lm_jax import linen as lm_linen
>>> layer = lm_linen.OutputLayer(heads.full_softmax(5), 3)
>>> h, y = jnp.ones((2, 3)), jnp.array([0, 4])
>>> variables = layer.init(jax.random.PRNGKey(0), h, y)
>>> sorted(variables["params"]), layer.apply(variables, h, y).shape
(['bias_V', 'weight_VxH'], (2,))
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax import heads as heads_lib
from lm_jax._layer_util import cast_floating
from lm_jax._layer_util import flatten_hidden
from lm_jax._layer_util import init_leaf
from lm_jax._layer_util import leaf_initializer
from lm_jax._layer_util import leaf_name
from lm_jax._layer_util import resolve_param_init
from lm_jax.models import rnn

Initializer = Callable[..., jax.Array]


def _declare(module: nn.Module, init_fn: Callable[[jax.Array], Any], param_dtype,
             kernel_init=None, bias_init=None):
  """Declares one ``"params"`` entry per leaf of ``init_fn(key)``'s pytree; returns the pytree.

  Each leaf is initialised from its own key (the ``"params"`` stream folded with the leaf's
  name): ``init_fn`` is traced abstractly for the structure and evaluated per leaf, unless
  ``kernel_init`` / ``bias_init`` draws it (:func:`lm_jax._layer_util.init_leaf`).
  """
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values = []
  for index, (path, spec) in enumerate(paths):
    name = leaf_name(path)
    dtype = param_dtype if jnp.issubdtype(spec.dtype, jnp.floating) else spec.dtype
    initializer = leaf_initializer(len(spec.shape), kernel_init, bias_init)

    def leaf_init(key, index=index, spec=spec, dtype=dtype, name=name, initializer=initializer):
      if initializer is not None:
        return init_leaf(initializer, key, name, spec.shape, dtype)
      return jnp.asarray(jax.tree.leaves(init_fn(key))[index], dtype)

    values.append(module.param(name, leaf_init))
  return jax.tree.unflatten(treedef, values)


class OutputLayer(nn.Module):
  r"""Any :class:`~lm_jax.heads.OutputHead` as a Linen module: hidden states to token losses.

  ``__call__(hidden_xH, targets_x, *, where=None, key=None) -> loss_x`` (the head's
  training loss in nats, unreduced; ``key`` for the sampled heads); ``log_prob``,
  ``log_probs``, ``sample`` as in :class:`lm_jax.nnx.OutputLayer`.

  Attributes:
    head: an :class:`~lm_jax.heads.OutputHead`.
    in_features: ``H``.
    dtype: computation dtype (None: the params' and inputs' own).
    param_dtype: storage dtype of the trainable params.
    kernel_init: optional initializer for every weight matrix, drawn with its true fan-in
      (``weight_VxH`` as an ``[H, V]`` kernel); None: the head's own ``init``.
    bias_init: optional initializer for every vector leaf; None: the head's own ``init``.
      As in :class:`lm_jax.nnx.OutputLayer` (scalars keep the head's init).
    param_init: deprecated; stands for both ``kernel_init`` and ``bias_init``.
  """
  head: heads_lib.OutputHead
  in_features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Initializer] = None
  bias_init: Optional[Initializer] = None
  param_init: Optional[Initializer] = None

  def setup(self):
    head = self.head
    kernel_init, bias_init = resolve_param_init(self.param_init, self.kernel_init,
                                                self.bias_init)
    self.params_tree = _declare(self, lambda k: head.init(k, self.in_features),
                                self.param_dtype, kernel_init, bias_init)
    tables = dict(head.tables or {})
    flat, treedef = jax.tree_util.tree_flatten_with_path(tables)
    self.tables_tree = jax.tree.unflatten(treedef, [
        self.variable("tables", leaf_name(p), lambda v=v: jnp.asarray(v)) for p, v in flat])

  def _head_params(self):
    return cast_floating(self.params_tree, self.dtype)

  def _tables(self):
    return jax.tree.map(lambda v: v.value, self.tables_tree,
                        is_leaf=lambda v: isinstance(v, nn.Variable) or hasattr(v, "value"))

  def _flat(self, hidden_xH):
    return flatten_hidden(hidden_xH, self.in_features, self.dtype)

  def __call__(self, hidden_xH, targets_x, *, where=None, key=None):
    hidden_NxH, lead = self._flat(hidden_xH)
    where_N = None if where is None else jnp.asarray(where, bool).reshape(-1)
    loss_N = self.head.loss(self._head_params(), hidden_NxH, jnp.asarray(targets_x).reshape(-1),
                            key=key, where=where_N, tables=self._tables())
    return loss_N.reshape(lead)

  def log_prob(self, hidden_xH, targets_x):
    hidden_NxH, lead = self._flat(hidden_xH)
    return self.head.log_prob(self._head_params(), hidden_NxH, jnp.asarray(targets_x).reshape(-1),
                              tables=self._tables()).reshape(lead)

  def log_probs(self, hidden_xH):
    hidden_NxH, lead = self._flat(hidden_xH)
    logp_NxV = self.head.log_probs(self._head_params(), hidden_NxH, tables=self._tables())
    return logp_NxV.reshape(*lead, logp_NxV.shape[-1])

  def sample(self, hidden_xH, key, *, temperature=1.0):
    hidden_NxH, lead = self._flat(hidden_xH)
    return self.head.sample(self._head_params(), hidden_NxH, key, temperature=temperature,
                            tables=self._tables()).reshape(lead)


class RNNLayer(nn.Module):
  r"""One recurrent layer over a sequence: ``(inputs_BxTxE, carry=None, *, mask_BxT=None) ->
  (outputs_BxTxH, carry)``; params ``W_xh_ExG``, ``W_hh_HxG``, ``b_G`` (one entry each).

  Attributes: ``cell_name``, ``in_features`` (E), ``hidden_features`` (H), ``unroll``,
  ``dtype``, ``param_dtype``, ``init_scale``, ``kernel_init``, ``bias_init`` as in
  :class:`lm_jax.nnx.RNNLayer`.
  """
  cell_name: str
  in_features: int
  hidden_features: int
  unroll: int = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32
  init_scale: float = 0.1
  kernel_init: Optional[Initializer] = None
  bias_init: Optional[Initializer] = None

  def setup(self):
    cell = rnn.get_cell(self.cell_name)
    self.params_tree = _declare(
        self, lambda k: cell.init(k, self.in_features, self.hidden_features,
                                  init_scale=self.init_scale, dtype=self.param_dtype),
        self.param_dtype, self.kernel_init, self.bias_init)

  def initial_carry(self, batch_size: int):
    return rnn.get_cell(self.cell_name).initial_carry(batch_size, self.hidden_features,
                                                      self.dtype or jnp.float32)

  def __call__(self, inputs_BxTxE, carry=None, *, mask_BxT=None):
    inputs_BxTxE = cast_floating(jnp.asarray(inputs_BxTxE), self.dtype)
    if carry is None:
      carry = self.initial_carry(inputs_BxTxE.shape[0])
    return rnn.scan_layer(rnn.get_cell(self.cell_name), self.params_tree, inputs_BxTxE, carry,
                          mask_BxT, unroll=self.unroll, dtype=self.dtype)
