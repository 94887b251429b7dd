r"""Recurrent cells (Elman, GRU, LSTM) as pure functions, and a layer that scans one over time.

A :class:`Cell` is four pure functions over a params dict. The input projection
:math:`x_t W_{xh} + b` of every time step is one matmul done before the scan
(``input_projection``); only the recurrent matmul :math:`h_{t-1} W_{hh}` stays
inside it (``step``). Gate pre-activations have width ``G``: ``H`` (Elman),
``3H`` (GRU, gates ``r, z, n``) or ``4H`` (LSTM, gates ``i, f, g, o``).
Nonlinearities and the carry update run in float32 (or wider) whatever the
input dtype; the carry keeps the dtype given to ``initial_carry``.

Parameters are initialised uniform(-init_scale, init_scale), biases included,
as in Zaremba et al. (2014).

References:
  Elman, "Finding structure in time", Cognitive Science 14, 1990.
  Cho et al., "Learning phrase representations using RNN encoder-decoder", 2014
  (GRU; the candidate here resets ``h W_hn + b_hn`` as PyTorch/cuDNN do).
  Hochreiter and Schmidhuber, "Long short-term memory", 1997; gates as in
  Zaremba, Sutskever and Vinyals, "Recurrent neural network regularization", 2014, eq. (2).
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lm_jax.ops import precision

Params = dict
Carry = Any


class Cell(NamedTuple):
  """A recurrent cell: ``init``, ``input_projection``, ``step``, ``initial_carry``.

  ``init(key, input_size, hidden_size, *, init_scale=0.1, dtype=float32) -> params``;
  ``input_projection(params, x_...xE) -> proj_...xG`` (bias included, any leading dims);
  ``step(params, carry, proj_BxG) -> (new_carry, h_BxH)``;
  ``initial_carry(batch_size, hidden_size, dtype=float32) -> carry`` (zeros).
  """
  init: Callable[..., Params]
  input_projection: Callable[[Params, jax.typing.ArrayLike], jax.Array]
  step: Callable[[Params, Carry, jax.typing.ArrayLike], tuple]
  initial_carry: Callable[..., Carry]


def _uniform_params(key, input_size, hidden_size, gates, init_scale, dtype):
  if input_size <= 0 or hidden_size <= 0:
    raise ValueError(
        f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}")
  k_x, k_h, k_b = jax.random.split(key, 3)
  g = gates * hidden_size
  uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -init_scale, init_scale)
  return {"W_xh_ExG": uniform(k_x, (input_size, g)),
          "W_hh_HxG": uniform(k_h, (hidden_size, g)),
          "b_G": uniform(k_b, (g,))}


def _narrow(dtype) -> bool:
  """Whether ``dtype`` is bfloat16 (mixed precision: sums are kept in float32)."""
  return jnp.dtype(dtype) == jnp.bfloat16


def _add_bias(y_xG, b_G, out_dtype):
  """``y + b`` added in float32 (or wider) and rounded once to ``out_dtype``, so that under
  mixed precision ``b``'s gradient, a sum over every row, is summed in float32."""
  wide = jnp.result_type(jnp.float32, y_xG, b_G)
  return (y_xG.astype(wide) + b_G.astype(wide)).astype(out_dtype)


def _input_projection(params, x_xE):
  w_ExG = params["W_xh_ExG"]
  x_xE = jnp.asarray(x_xE)
  if not _narrow(jnp.promote_types(x_xE.dtype, w_ExG.dtype)):
    return jnp.matmul(x_xE, w_ExG) + params["b_G"]
  # bfloat16 inputs and weights: one [rows, E] x [E, G] matmul, bfloat16 both ways with
  # float32 accumulation; the bias added in float32; the projection stored in bfloat16.
  y_NxG = precision.matmul(x_xE.reshape(-1, x_xE.shape[-1]), w_ExG)
  return _add_bias(y_NxG.reshape(*x_xE.shape[:-1], w_ExG.shape[1]), params["b_G"],
                   jnp.bfloat16)


def _add_input(params, x_xE):
  """Elman without ``W_xh``: the input plus the bias (in float32 for a bfloat16 input)."""
  x_xE = jnp.asarray(x_xE)
  if not _narrow(x_xE.dtype):
    return x_xE + params["b_G"]
  return _add_bias(x_xE, params["b_G"], jnp.bfloat16)


def _recurrent(params, h_BxH, proj_BxG):
  """Returns ``proj + h W_hh`` in the compute dtype (float32, or float64 under x64)."""
  dtype = jnp.result_type(jnp.float32, h_BxH, proj_BxG, params["W_hh_HxG"])
  rec_BxG = _recurrent_matmul(params, h_BxH, proj_BxG, dtype)
  return jnp.asarray(proj_BxG, dtype) + rec_BxG


def _recurrent_matmul(params, h_BxH, proj_BxG, dtype):
  """``h W_hh`` in ``dtype`` (float32 or wider). Mixed precision (a bfloat16 ``W_hh`` and a
  bfloat16 input projection, as ``scan_layer(dtype=jnp.bfloat16)`` makes them): the float32
  carry is rounded to bfloat16 for the matmul, bfloat16 forward and backward with float32
  accumulation (``precision.matmul``). Otherwise the operands promote as usual (a float32
  carry or input with bfloat16 params: a float32 matmul)."""
  w_HxG = params["W_hh_HxG"]
  if _narrow(w_HxG.dtype) and _narrow(jnp.result_type(proj_BxG)):
    h_BxH = h_BxH.astype(jnp.bfloat16)
    return precision.matmul(h_BxH, w_HxG).astype(dtype)
  return jnp.matmul(h_BxH, w_HxG, preferred_element_type=dtype)


def _zeros(batch_size, hidden_size, dtype=jnp.float32):
  return jnp.zeros((batch_size, hidden_size), dtype)


def elman_cell(activation: str = "tanh", *, input_matrix: bool = True) -> Cell:
  r"""Elman RNN cell, the notes' :math:`h_t = \phi(x_t W_{xh} + h_{t-1} W_{hh} + b_h)`.

  Params ``{"W_xh_ExG", "W_hh_HxG", "b_G"}`` with ``G = H``; the carry is ``h_BxH``.

  With ``input_matrix=False`` there is no ``W_xh``: :math:`h_t = \phi(x_t + h_{t-1} W_{hh}
  + b_h)`, which needs ``E = H``. After an embedding lookup this is Mikolov's RNNLM (and
  faster-rnnlm's), whose one-hot input times its input matrix is a row of that matrix: the
  product of an embedding and ``W_xh`` is one ``[V, H]`` matrix anyway, so dropping
  ``W_xh`` loses no expressiveness without dropout between them, and saves a third of the
  layer's FLOPs (the hoisted ``[B T, E] x [E, H]`` product and its two gradients).

  Args:
    activation: ``"tanh"`` or ``"relu"``, the :math:`\phi` above.
    input_matrix: keep ``W_xh`` (default) or add the input directly.

  Returns:
    A :class:`Cell`.
  """
  activations = {"tanh": jnp.tanh, "relu": jax.nn.relu}
  if activation not in activations:
    raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
  phi = activations[activation]

  def init(key, input_size, hidden_size, *, init_scale=0.1, dtype=jnp.float32):
    # W_xh is drawn even when dropped, so W_hh and b equal elman's for the same key.
    params = _uniform_params(key, input_size, hidden_size, 1, init_scale, dtype)
    if input_matrix:
      return params
    if input_size != hidden_size:
      raise ValueError(f"an Elman cell without W_xh adds its input to the hidden state, so "
                       f"input_size must equal hidden_size, got {input_size} and {hidden_size}")
    return {k: v for k, v in params.items() if k != "W_xh_ExG"}

  def step(params, h_BxH, proj_BxG):
    new_h = phi(_recurrent(params, h_BxH, proj_BxG)).astype(h_BxH.dtype)
    return new_h, new_h


  return Cell(init, _input_projection if input_matrix else _add_input, step, _zeros)


def gru_cell() -> Cell:
  r"""GRU cell with PyTorch/cuDNN gate equations (the reset gate acts after ``W_hn``).

  .. math::
    r &= \sigma(x W_{xr} + b_r + h W_{hr}), \quad z = \sigma(x W_{xz} + b_z + h W_{hz}) \\
    n &= \tanh(x W_{xn} + b_n + r \odot (h W_{hn} + b_{hn})), \quad
    h' = (1 - z) \odot n + z \odot h

  Params ``{"W_xh_ExG", "W_hh_HxG", "b_G", "b_hn_H"}`` with ``G = 3H`` in the order
  ``r, z, n``; the carry is ``h_BxH``. This is also ``flax.linen.GRUCell``.

  Returns:
    A :class:`Cell`.
  """
  def init(key, input_size, hidden_size, *, init_scale=0.1, dtype=jnp.float32):
    key, k_hn = jax.random.split(key)
    params = _uniform_params(key, input_size, hidden_size, 3, init_scale, dtype)
    params["b_hn_H"] = jax.random.uniform(k_hn, (hidden_size,), dtype, -init_scale, init_scale)
    return params

  def step(params, h_BxH, proj_BxG):
    dtype = jnp.result_type(jnp.float32, h_BxH, proj_BxG, params["W_hh_HxG"])
    rec_BxG = _recurrent_matmul(params, h_BxH, proj_BxG, dtype)
    x_r, x_z, x_n = jnp.split(jnp.asarray(proj_BxG, dtype), 3, axis=-1)
    h_r, h_z, h_n = jnp.split(rec_BxG, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * (h_n + params["b_hn_H"].astype(dtype)))
    new_h = ((1.0 - z) * n + z * h_BxH.astype(dtype)).astype(h_BxH.dtype)
    return new_h, new_h

  return Cell(init, _input_projection, step, _zeros)


def lstm_cell(*, forget_bias: float = 0.0) -> Cell:
  r"""LSTM cell without peepholes; the carry is ``(c_BxH, h_BxH)``.

  .. math::
    i, f, g, o &= \sigma(\cdot), \sigma(\cdot), \tanh(\cdot), \sigma(\cdot)
      \text{ of } x W_{xh} + h W_{hh} + b \\
    c' &= f \odot c + i \odot g, \quad h' = o \odot \tanh(c')

  Params ``{"W_xh_ExG", "W_hh_HxG", "b_G"}`` with ``G = 4H`` in the order
  ``i, f, g, o`` (PyTorch's and ``flax.linen.OptimizedLSTMCell``'s).

  Args:
    forget_bias: added to the forget-gate slice of ``b_G`` at init (Jozefowicz
      et al. 2015 use 1.0; 0.0, the default, is Zaremba's plain uniform init).

  Returns:
    A :class:`Cell`.
  """
  def init(key, input_size, hidden_size, *, init_scale=0.1, dtype=jnp.float32):
    params = _uniform_params(key, input_size, hidden_size, 4, init_scale, dtype)
    params["b_G"] = params["b_G"].at[hidden_size:2 * hidden_size].add(forget_bias)
    return params

  def step(params, carry, proj_BxG):
    c_BxH, h_BxH = carry
    i, f, g, o = jnp.split(_recurrent(params, h_BxH, proj_BxG), 4, axis=-1)
    new_c = jax.nn.sigmoid(f) * c_BxH.astype(f.dtype) + jax.nn.sigmoid(i) * jnp.tanh(g)
    new_h = (jax.nn.sigmoid(o) * jnp.tanh(new_c)).astype(h_BxH.dtype)
    return (new_c.astype(c_BxH.dtype), new_h), new_h

  def initial_carry(batch_size, hidden_size, dtype=jnp.float32):
    return (_zeros(batch_size, hidden_size, dtype), _zeros(batch_size, hidden_size, dtype))

  return Cell(init, _input_projection, step, initial_carry)


CELL_NAMES = ("elman", "rnn_tanh", "rnn_relu", "elman_direct", "gru", "lstm")


def get_cell(name: str) -> Cell:
  """The cell called ``name``: ``elman`` (= ``rnn_tanh``), ``rnn_relu``, ``elman_direct``
  (tanh, no ``W_xh``: Mikolov's RNNLM), ``gru`` or ``lstm``."""
  factories = {"elman": lambda: elman_cell("tanh"), "rnn_tanh": lambda: elman_cell("tanh"),
               "elman_direct": lambda: elman_cell("tanh", input_matrix=False),
               "rnn_relu": lambda: elman_cell("relu"), "gru": gru_cell, "lstm": lstm_cell}
  if name not in factories:
    raise ValueError(f"unknown cell {name!r}; expected one of {CELL_NAMES}")
  return factories[name]()


def _check(params, inputs_BxTxE, carry, mask_BxT):
  inputs_BxTxE = jnp.asarray(inputs_BxTxE)
  if inputs_BxTxE.ndim != 3:
    raise ValueError(f"inputs_BxTxE must have rank 3 [B, T, E], got shape {inputs_BxTxE.shape}")
  batch, steps, embed = inputs_BxTxE.shape
  if "W_xh_ExG" in params:
    if embed != params["W_xh_ExG"].shape[0]:
      raise ValueError(
          f"inputs_BxTxE has E={embed} but W_xh_ExG has shape {params['W_xh_ExG'].shape}")
  elif embed != params["b_G"].shape[0]:
    raise ValueError(f"inputs_BxTxE has E={embed} but a cell without W_xh adds its input to "
                     f"the hidden state, of size {params['b_G'].shape[0]}")
  for leaf in jax.tree_util.tree_leaves(carry):
    if leaf.shape != (batch, params["W_hh_HxG"].shape[0]):
      raise ValueError(f"carry leaf has shape {leaf.shape}, expected [B, H] = "
                       f"{(batch, params['W_hh_HxG'].shape[0])}")
  if mask_BxT is not None:
    mask_BxT = jnp.asarray(mask_BxT)
    if mask_BxT.shape != (batch, steps):
      raise ValueError(f"mask_BxT has shape {mask_BxT.shape}, expected [B, T] = {(batch, steps)}")
    mask_BxT = mask_BxT.astype(bool)
  return inputs_BxTxE, mask_BxT


def _scan(cell, params, xs_TxBxF, carry, mask_BxT, project, unroll, dtype=None):
  """One ``lax.scan`` over time-major ``xs``; ``project`` maps an ``xs`` slice to ``proj_BxG``.

  The params enter the scan as they are and their matrices are cast to ``dtype`` inside the
  step: a constant of a scan has its gradient summed over ``T`` in its own dtype, so float32
  params keep a float32 sum under a bfloat16 ``dtype``. (Under ``grad`` JAX's partial
  evaluation of the scan moves the cast out of the loop; a forward pass leaves it to XLA's
  loop-invariant code motion.)"""
  keep_TxB = None if mask_BxT is None else jnp.swapaxes(mask_BxT, 0, 1)

  def body(carry, xs):
    x_BxF, keep_B = xs
    new_carry, h_BxH = cell.step(precision.cast_floating(params, dtype, matrices_only=True),
                                 carry, project(x_BxF))
    if keep_B is not None:
      new_carry = jax.tree_util.tree_map(
          lambda new, old: jnp.where(keep_B[:, None], new, old), new_carry, carry)
      h_BxH = jnp.where(keep_B[:, None], h_BxH, jnp.zeros_like(h_BxH))
    return new_carry, h_BxH

  final_carry, outputs_TxBxH = lax.scan(body, carry, (xs_TxBxF, keep_TxB), unroll=unroll)
  return jnp.swapaxes(outputs_TxBxH, 0, 1), final_carry


def scan_layer(cell: Cell, params: Params, inputs_BxTxE: jax.typing.ArrayLike, carry: Carry,
               mask_BxT: Optional[jax.typing.ArrayLike] = None, *, unroll: int = 1,
               dtype: Any = None):
  r"""Runs ``cell`` over ``T`` steps: the input projection hoisted, then one ``lax.scan``.

  .. math::
    P = X W_{xh} + b \text{ (one matmul for all } B T \text{ rows)}, \qquad
    (s_t, h_t) = \mathrm{step}(s_{t-1}, P_t), \quad t = 1..T

  Where ``mask_BxT`` is False (padding) the carry passes through unchanged and the
  output is zero, so a padded tail leaves the final carry equal to the carry after
  the last real token.

  Args:
    cell: a :class:`Cell`.
    params: ``cell.init(...)`` output.
    inputs_BxTxE: inputs ``[B, T, E]``.
    carry: initial carry, e.g. ``cell.initial_carry(B, H)``; leaves are ``[B, H]``.
    mask_BxT: optional ``[B, T]``, True on real tokens.
    unroll: passed to ``lax.scan``.
    dtype: the compute dtype of the matmuls (None: the params'); e.g. ``jnp.bfloat16`` with
      float32 params (mixed precision). The inputs and the weight matrices are cast to it
      (the matrices inside the scan's step, so the recurrent weights' gradients are summed
      over ``T`` in their own dtype; biases stay as they are, added in float32); the carry
      keeps its dtype.

  Returns:
    ``(outputs_BxTxH, final_carry)``.

  >>> cell = elman_cell("tanh")
  >>> params = {"W_xh_ExG": jnp.ones((1, 1)), "W_hh_HxG": jnp.full((1, 1), 0.5),
  ...           "b_G": jnp.zeros(1)}
  >>> x_BxTxE = jnp.array([[[1.0], [0.0], [0.0]]])
  >>> out_BxTxH, h_BxH = scan_layer(cell, params, x_BxTxE, cell.initial_carry(1, 1))
  >>> [round(float(v), 4) for v in out_BxTxH.ravel()]  # tanh(1), tanh(.5 tanh(1)), ...
  [0.7616, 0.3634, 0.1797]
  """
  inputs_BxTxE, mask_BxT = _check(params, inputs_BxTxE, carry, mask_BxT)
  # Transpose the narrower inputs (E wide), not the projections (G wide), to time-major.
  inputs_BxTxE = precision.cast_floating(inputs_BxTxE, dtype)
  proj_TxBxG = cell.input_projection(precision.cast_floating(params, dtype, matrices_only=True),
                                     jnp.swapaxes(inputs_BxTxE, 0, 1))
  return _scan(cell, params, proj_TxBxG, carry, mask_BxT, lambda p: p, unroll, dtype)


def scan_layer_unhoisted(cell: Cell, params: Params, inputs_BxTxE: jax.typing.ArrayLike,
                         carry: Carry, mask_BxT: Optional[jax.typing.ArrayLike] = None, *,
                         unroll: int = 1, dtype: Any = None):
  """Same maths as :func:`scan_layer` with the input projection inside the scan (naive baseline)."""
  inputs_BxTxE, mask_BxT = _check(params, inputs_BxTxE, carry, mask_BxT)
  x_TxBxE = jnp.swapaxes(precision.cast_floating(inputs_BxTxE, dtype), 0, 1)
  matrices = lambda: precision.cast_floating(params, dtype, matrices_only=True)
  return _scan(cell, params, x_TxBxE, carry, mask_BxT,
               lambda x_BxE: cell.input_projection(matrices(), x_BxE), unroll, dtype)
