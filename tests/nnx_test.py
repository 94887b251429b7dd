"""Tests for lm_jax.nnx: the NNX layers against float64 NumPy references, and equal to the
functional heads and cells they wrap."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_layer_cases import (B, E, H, HEAD_NAMES, HEADS, T, V, WHERE_N, assert_initialized,
                              assert_matches_reference, data, fan_in_filler, reference_log_probs,
                              reference_rnn)
from lm_jax import heads
from lm_jax import nnx as lm_nnx
from lm_jax._layer_util import leaf_name
from lm_jax.models import rnn


def _functional_params(layer):
  return layer.head_params()


# The float64 references above cover every head's values; these check the plumbing.
@pytest.mark.parametrize("name", ["full", "class", "hsm", "dsoftmax", "nce", "sampled"])
def test_output_layer_equals_the_functional_head_in_value_and_gradient(name):
  head = HEADS[name]()
  layer = lm_nnx.OutputLayer(head, H, rngs=nnx.Rngs(0))
  hidden_NxH, targets_N = data()
  params = _functional_params(layer)
  where_N = jnp.array([True, True, False, True, True, False])
  np.testing.assert_allclose(layer(hidden_NxH, targets_N, where=where_N),
                             head.loss(params, hidden_NxH, targets_N, where=where_N), rtol=1e-6)
  np.testing.assert_allclose(layer.log_prob(hidden_NxH, targets_N),
                             head.log_prob(params, hidden_NxH, targets_N), rtol=1e-6)
  np.testing.assert_allclose(layer.log_probs(hidden_NxH), head.log_probs(params, hidden_NxH),
                             rtol=1e-6)
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(layer.sample(hidden_NxH, key),
                                head.sample(params, hidden_NxH, key))
  # Sampled heads draw their noise from the key given as `rngs`.
  np.testing.assert_allclose(layer(hidden_NxH, targets_N, rngs=key),
                             head.loss(params, hidden_NxH, targets_N, key=key), rtol=1e-6)

  # Gradients: nnx.grad w.r.t. the Params equals jax.grad of the functional loss, leaf by leaf.
  grads = nnx.grad(lambda m: jnp.sum(m(hidden_NxH, targets_N, where=where_N)))(layer)
  expected = jax.grad(lambda p: jnp.sum(head.loss(p, hidden_NxH, targets_N, where=where_N)))(
      params)
  flat = {leaf_name(p): g for p, g in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {name: v[...] for name, v in grads["params"].items()}
  assert sorted(got) == sorted(flat)
  for leaf in flat:
    np.testing.assert_allclose(got[leaf], flat[leaf], rtol=1e-5, atol=1e-7, err_msg=leaf)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_tables_are_variables_but_not_params(name):
  head = HEADS[name]()
  layer = lm_nnx.OutputLayer(head, H, rngs=nnx.Rngs(0))
  param_state = nnx.state(layer, nnx.Param)
  table_state = nnx.state(layer, lm_nnx.HeadTable)
  n_params = len(jax.tree.leaves(head.init(jax.random.PRNGKey(0), H)))
  n_tables = len(jax.tree.leaves(head.tables))
  assert len(jax.tree.leaves(param_state)) == n_params
  assert len(jax.tree.leaves(table_state)) == n_tables
  jax.tree.map(np.testing.assert_array_equal, layer.head_tables(), dict(head.tables))
  # The tables reach the compiled program as arguments (not constants): new tables, new values.
  hidden_NxH, targets_N = data()
  graphdef, params, tables = nnx.split(layer, nnx.Param, lm_nnx.HeadTable)

  @jax.jit
  def loss(params, tables):
    return jnp.sum(nnx.merge(graphdef, params, tables)(hidden_NxH, targets_N))

  np.testing.assert_allclose(loss(params, tables), jnp.sum(layer(hidden_NxH, targets_N)),
                             rtol=1e-6)
  if n_tables:
    scrambled = jax.tree.map(lambda t: t[...][::-1] if t.ndim else t[...], tables)
    assert not np.isclose(loss(params, scrambled), loss(params, tables))


def test_axes_metadata_names_the_shape_letters():
  layer = lm_nnx.OutputLayer(HEADS["class"](), H, rngs=nnx.Rngs(0))
  assert layer.params["word_weight_VxH"].axes == ("V", "H")
  assert layer.params["class_bias_C"].axes == ("C",)
  assert lm_nnx.shape_axes("log_z", 0) is None


def test_jit_value_and_grad_and_optimizer_update_only_params():
  layer = lm_nnx.OutputLayer(HEADS["class"](), H, rngs=nnx.Rngs(1))
  tables_before = jax.tree.map(np.asarray, nnx.state(layer, lm_nnx.HeadTable))
  params_before = jax.tree.map(np.asarray, nnx.state(layer, nnx.Param))
  optimizer = nnx.Optimizer(layer, optax.sgd(0.5), wrt=nnx.Param)
  hidden_NxH, targets_N = data(1)

  @nnx.jit
  def step(layer, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(hidden_NxH, targets_N)))(layer)
    optimizer.update(layer, grads)
    return loss

  first = step(layer, optimizer)
  for _ in range(5):
    last = step(layer, optimizer)
  assert float(last) < float(first)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(layer, lm_nnx.HeadTable), tables_before)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), nnx.state(layer, nnx.Param),
                       params_before)
  assert all(jax.tree.leaves(moved))


def test_split_merge_and_plain_jax_grad_equal_nnx_grad():
  layer = lm_nnx.OutputLayer(HEADS["hsm"](), H, rngs=nnx.Rngs(2))
  hidden_NxH, targets_N = data(2)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(hidden_NxH, targets_N))

  plain = jax.grad(loss)(params)
  via_nnx = nnx.grad(lambda m: jnp.sum(m(hidden_NxH, targets_N)))(layer)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain, via_nnx)


def test_dtype_and_param_dtype():
  layer = lm_nnx.OutputLayer(HEADS["full"](), H, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  assert layer.params["weight_VxH"].dtype == jnp.float32
  hidden_NxH, targets_N = data()
  loss_N = layer(hidden_NxH, targets_N)
  assert loss_N.dtype == jnp.float32  # softmax in float32 whatever the compute dtype
  head = HEADS["full"]()
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), layer.head_params())
  np.testing.assert_allclose(loss_N, head.loss(bf16, hidden_NxH.astype(jnp.bfloat16), targets_N),
                             rtol=1e-6)
  stored_bf16 = lm_nnx.OutputLayer(HEADS["full"](), H, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert stored_bf16.params["bias_V"].dtype == jnp.bfloat16


def test_leading_dims_bad_ids_and_bad_shapes():
  layer = lm_nnx.OutputLayer(HEADS["class"](), H, rngs=nnx.Rngs(0))
  hidden_BxTxH = jnp.ones((2, 3, H))
  targets_BxT = jnp.zeros((2, 3), jnp.int32)
  assert layer(hidden_BxTxH, targets_BxT).shape == (2, 3)
  assert layer.log_probs(hidden_BxTxH).shape == (2, 3, V)
  padded = targets_BxT.at[0, 0].set(-1)
  where = padded >= 0
  loss = layer(hidden_BxTxH, padded, where=where)
  assert loss[0, 0] == 0.0 and np.all(np.isfinite(loss))
  with pytest.raises(ValueError, match="target -1 at index 0 is out of range"):
    layer(hidden_BxTxH, padded)
  with pytest.raises(ValueError, match="in_features=4"):
    layer(jnp.ones((2, H + 1)), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_layer_matches_a_float64_numpy_reference(name):
  head = HEADS[name]()
  layer = lm_nnx.OutputLayer(head, H, rngs=nnx.Rngs(0))
  hidden_NxH, targets_N = data()
  expected_NxV = reference_log_probs(name, layer.head_params(), hidden_NxH, head.tables)
  with jax.default_matmul_precision("highest"):
    assert_matches_reference(name, expected_NxV, layer.log_probs(hidden_NxH),
                             layer.log_prob(hidden_NxH, targets_N),
                             layer(hidden_NxH, targets_N, where=WHERE_N), targets_N)


def test_lecun_normal_kernel_init_has_std_one_over_sqrt_fan_in():
  vocab, hidden = 2048, 16  # 32768 draws: the sample std is within 0.4% of the true one (1 sd)
  layer = lm_nnx.OutputLayer(heads.full_softmax(vocab), hidden, rngs=nnx.Rngs(0),
                             kernel_init=jax.nn.initializers.lecun_normal())
  std = float(np.std(layer.params["weight_VxH"][...]))
  assert abs(std - hidden ** -0.5) < 0.05 * hidden ** -0.5, std  # fan-in V: 0.022, not 0.25


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_kernel_and_bias_init_reach_every_leaf_with_its_fan_in(name):
  head = HEADS[name]()
  layer = lm_nnx.OutputLayer(head, H, kernel_init=fan_in_filler, rngs=nnx.Rngs(0),
                             bias_init=jax.nn.initializers.constant(0.3))
  default = lm_nnx.OutputLayer(head, H, rngs=nnx.Rngs(0))
  assert_initialized({k: v[...] for k, v in layer.params.items()},
                     {k: v[...] for k, v in default.params.items()})
  assert np.all(np.isfinite(layer.log_probs(data()[0])))
  # Either initializer alone leaves the other leaves to the head's own init.
  kernels_only = lm_nnx.OutputLayer(head, H, kernel_init=fan_in_filler, rngs=nnx.Rngs(0))
  for leaf, value in kernels_only.params.items():
    if value.ndim != 2:
      np.testing.assert_array_equal(value[...], default.params[leaf][...], err_msg=leaf)


def test_param_init_is_deprecated_and_still_initialises_every_leaf():
  with pytest.warns(DeprecationWarning, match="kernel_init"):
    layer = lm_nnx.OutputLayer(HEADS["full"](), H, param_init=jax.nn.initializers.zeros,
                               rngs=nnx.Rngs(0))
  assert all(float(jnp.abs(v[...]).sum()) == 0.0 for v in layer.params.values())


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_rnn_layer_matches_a_float64_numpy_loop(cell):
  layer = lm_nnx.RNNLayer(cell, E, H, init_scale=0.5, rngs=nnx.Rngs(0))
  inputs_BxTxE = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, E)), jnp.float32)
  mask_BxT = jnp.arange(T)[None, :] < jnp.array([[T], [3]])
  with jax.default_matmul_precision("highest"):
    out, carry = layer(inputs_BxTxE, mask_BxT=mask_BxT)
  ref_out, ref_carry = reference_rnn(cell, {k: v[...] for k, v in layer.params.items()},
                                     inputs_BxTxE, mask_BxT)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), carry,
               ref_carry)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_layer_kernel_and_bias_init(cell):
  layer = lm_nnx.RNNLayer(cell, E, H, kernel_init=fan_in_filler, rngs=nnx.Rngs(0),
                          bias_init=jax.nn.initializers.constant(0.3))
  assert_initialized({k: v[...] for k, v in layer.params.items()},
                     {k: None for k in layer.params})


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_rnn_layer_equals_scan_layer_in_value_and_gradient(cell):
  layer = lm_nnx.RNNLayer(cell, E, H, rngs=nnx.Rngs(0))
  inputs_BxTxE = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, E)), jnp.float32)
  mask_BxT = jnp.arange(T)[None, :] < jnp.array([[T], [3]])
  params = {name: v[...] for name, v in layer.params.items()}
  fn = rnn.get_cell(cell)
  carry0 = layer.initial_carry(B)
  out, carry = layer(inputs_BxTxE, mask_BxT=mask_BxT)
  ref_out, ref_carry = rnn.scan_layer(fn, params, inputs_BxTxE, carry0, mask_BxT)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), carry, ref_carry)

  grads = nnx.grad(lambda m: jnp.sum(m(inputs_BxTxE, mask_BxT=mask_BxT)[0] ** 2))(layer)
  expected = jax.grad(lambda p: jnp.sum(
      rnn.scan_layer(fn, p, inputs_BxTxE, carry0, mask_BxT)[0] ** 2))(params)
  for name in expected:
    np.testing.assert_allclose(grads["params"][name][...], expected[name], rtol=1e-5, atol=1e-7)


def test_rnn_layer_carries_state_under_nnx_jit():
  layer = lm_nnx.RNNLayer("lstm", E, H, rngs=nnx.Rngs(0))
  x = jnp.ones((B, 2 * T, E))
  whole, _ = layer(x)
  run = nnx.jit(lambda m, x, c: m(x, c))
  first, carry = run(layer, x[:, :T], layer.initial_carry(B))
  second, _ = run(layer, x[:, T:], carry)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, rtol=1e-6)
  assert isinstance(carry, tuple) and carry[0].shape == (B, H)
  half = lm_nnx.RNNLayer("elman", E, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert half(x)[0].dtype == jnp.bfloat16 and half.params["W_hh_HxG"].dtype == jnp.float32
