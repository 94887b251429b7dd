"""Tests for lm_jax.linen: the Linen modules against float64 NumPy references, and equal to
the functional heads and cells they wrap."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_layer_cases import (B, E, H, HEAD_NAMES, HEADS, T, V, WHERE_N, assert_initialized,
                              assert_matches_reference, data, fan_in_filler, reference_log_probs,
                              reference_rnn)
from lm_jax import heads
from lm_jax import linen as lm_linen
from lm_jax._layer_util import leaf_name
from lm_jax.models import rnn


def _as_head_params(head, flat_params):
  """The functional head's params pytree from the module's one-entry-per-leaf params."""
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  return jax.tree.unflatten(treedef, [flat_params[leaf_name(p)] for p, _ in paths])


# The float64 references above cover every head's values; these check the plumbing.
@pytest.mark.parametrize("name", ["full", "class", "hsm", "dsoftmax", "neg"])
def test_output_layer_equals_the_functional_head_in_value_and_gradient(name):
  head = HEADS[name]()
  layer = lm_linen.OutputLayer(head, H)
  hidden_NxH, targets_N = data()
  variables = layer.init(jax.random.PRNGKey(0), hidden_NxH, targets_N)
  assert set(variables) == ({"params", "tables"} if head.tables else {"params"})
  params = _as_head_params(head, variables["params"])
  where_N = jnp.array([True, False, True, True, True, False])
  np.testing.assert_allclose(layer.apply(variables, hidden_NxH, targets_N, where=where_N),
                             head.loss(params, hidden_NxH, targets_N, where=where_N), rtol=1e-6)
  np.testing.assert_allclose(
      layer.apply(variables, hidden_NxH, targets_N, method=lm_linen.OutputLayer.log_prob),
      head.log_prob(params, hidden_NxH, targets_N), rtol=1e-6)
  np.testing.assert_allclose(
      layer.apply(variables, hidden_NxH, method=lm_linen.OutputLayer.log_probs),
      head.log_probs(params, hidden_NxH), rtol=1e-6)
  key = jax.random.PRNGKey(4)
  np.testing.assert_array_equal(
      layer.apply(variables, hidden_NxH, key, method=lm_linen.OutputLayer.sample),
      head.sample(params, hidden_NxH, key))
  np.testing.assert_allclose(layer.apply(variables, hidden_NxH, targets_N, key=key),
                             head.loss(params, hidden_NxH, targets_N, key=key), rtol=1e-6)

  def module_loss(p):
    return jnp.sum(layer.apply({**variables, "params": p}, hidden_NxH, targets_N, where=where_N))

  grads = jax.jit(jax.grad(module_loss))(variables["params"])
  expected = jax.grad(lambda p: jnp.sum(head.loss(p, hidden_NxH, targets_N, where=where_N)))(
      params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               _as_head_params(head, grads), expected)


def test_tables_are_a_separate_collection_and_optax_sees_only_params():
  head = HEADS["class"]()
  layer = lm_linen.OutputLayer(head, H)
  hidden_NxH, targets_N = data(1)
  variables = layer.init(jax.random.PRNGKey(1), hidden_NxH, targets_N)
  assert sorted(variables["params"]) == sorted(head.init(jax.random.PRNGKey(0), H))
  jax.tree.map(np.testing.assert_array_equal, dict(variables["tables"]), dict(head.tables))
  tx = optax.adam(0.05)
  params, opt_state = variables["params"], tx.init(variables["params"])

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(layer.apply(
        {"params": p, "tables": variables["tables"]}, hidden_NxH, targets_N)))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, first = step(params, opt_state)
  for _ in range(5):
    params, opt_state, last = step(params, opt_state)
  assert float(last) < float(first)


def test_dtype_and_leading_dims():
  layer = lm_linen.OutputLayer(HEADS["full"](), H, dtype=jnp.bfloat16)
  hidden_BxTxH = jnp.ones((2, 3, H))
  targets_BxT = jnp.zeros((2, 3), jnp.int32)
  variables = layer.init(jax.random.PRNGKey(0), hidden_BxTxH, targets_BxT)
  assert variables["params"]["weight_VxH"].dtype == jnp.float32
  loss = layer.apply(variables, hidden_BxTxH, targets_BxT)
  assert loss.shape == (2, 3) and loss.dtype == jnp.float32
  with pytest.raises(ValueError, match="in_features=4"):
    layer.apply(variables, jnp.ones((2, H + 1)), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_layer_matches_a_float64_numpy_reference(name):
  head = HEADS[name]()
  layer = lm_linen.OutputLayer(head, H)
  hidden_NxH, targets_N = data()
  variables = layer.init(jax.random.PRNGKey(0), hidden_NxH, targets_N)
  expected_NxV = reference_log_probs(name, _as_head_params(head, variables["params"]),
                                     hidden_NxH, head.tables)
  with jax.default_matmul_precision("highest"):
    assert_matches_reference(
        name, expected_NxV,
        layer.apply(variables, hidden_NxH, method=lm_linen.OutputLayer.log_probs),
        layer.apply(variables, hidden_NxH, targets_N, method=lm_linen.OutputLayer.log_prob),
        layer.apply(variables, hidden_NxH, targets_N, where=WHERE_N), targets_N)


def test_lecun_normal_kernel_init_has_std_one_over_sqrt_fan_in():
  vocab, hidden = 2048, 16  # 32768 draws: the sample std is within 0.4% of the true one (1 sd)
  layer = lm_linen.OutputLayer(heads.full_softmax(vocab), hidden,
                               kernel_init=jax.nn.initializers.lecun_normal())
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, hidden)), jnp.zeros(1, jnp.int32))
  std = float(np.std(variables["params"]["weight_VxH"]))
  assert abs(std - hidden ** -0.5) < 0.05 * hidden ** -0.5, std  # fan-in V: 0.022, not 0.25


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_kernel_and_bias_init_reach_every_leaf_with_its_fan_in(name):
  head = HEADS[name]()
  hidden_NxH, targets_N = data()

  def init(**initializers):
    layer = lm_linen.OutputLayer(head, H, **initializers)
    return layer, layer.init(jax.random.PRNGKey(0), hidden_NxH, targets_N)

  layer, variables = init(kernel_init=fan_in_filler, bias_init=jax.nn.initializers.constant(0.3))
  _, default = init()
  assert_initialized(variables["params"], default["params"])
  log_probs = layer.apply(variables, hidden_NxH, method=lm_linen.OutputLayer.log_probs)
  assert np.all(np.isfinite(log_probs))
  _, kernels_only = init(kernel_init=fan_in_filler)
  for leaf, value in kernels_only["params"].items():
    if value.ndim != 2:
      np.testing.assert_array_equal(value, default["params"][leaf], err_msg=leaf)


def test_param_init_is_deprecated_and_still_initialises_every_leaf():
  layer = lm_linen.OutputLayer(HEADS["full"](), H, param_init=jax.nn.initializers.zeros)
  with pytest.warns(DeprecationWarning, match="kernel_init"):
    variables = layer.init(jax.random.PRNGKey(0), *data())
  assert all(float(jnp.abs(v).sum()) == 0.0 for v in variables["params"].values())


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_rnn_layer_matches_a_float64_numpy_loop(cell):
  layer = lm_linen.RNNLayer(cell, E, H, init_scale=0.5)
  inputs_BxTxE = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, E)), jnp.float32)
  mask_BxT = jnp.arange(T)[None, :] < jnp.array([[T], [3]])
  variables = layer.init(jax.random.PRNGKey(0), inputs_BxTxE)
  with jax.default_matmul_precision("highest"):
    out, carry = layer.apply(variables, inputs_BxTxE, mask_BxT=mask_BxT)
  ref_out, ref_carry = reference_rnn(cell, variables["params"], inputs_BxTxE, mask_BxT)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), carry,
               ref_carry)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_layer_kernel_and_bias_init(cell):
  layer = lm_linen.RNNLayer(cell, E, H, kernel_init=fan_in_filler,
                            bias_init=jax.nn.initializers.constant(0.3))
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((B, T, E)))
  assert_initialized(variables["params"], {k: None for k in variables["params"]})


@pytest.mark.parametrize("cell", ["elman", "lstm"])
def test_rnn_layer_equals_scan_layer_in_value_and_gradient(cell):
  layer = lm_linen.RNNLayer(cell, E, H)
  inputs_BxTxE = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, E)), jnp.float32)
  variables = layer.init(jax.random.PRNGKey(0), inputs_BxTxE)
  params = dict(variables["params"])
  assert sorted(params) == ["W_hh_HxG", "W_xh_ExG", "b_G"]
  fn = rnn.get_cell(cell)
  carry0 = fn.initial_carry(B, H)
  out, carry = layer.apply(variables, inputs_BxTxE)
  ref_out, ref_carry = rnn.scan_layer(fn, params, inputs_BxTxE, carry0)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), carry, ref_carry)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, inputs_BxTxE)[0] ** 2))(params)
  expected = jax.grad(lambda p: jnp.sum(
      rnn.scan_layer(fn, p, inputs_BxTxE, carry0)[0] ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               expected)


def test_layers_compose_inside_a_user_module():
  class TinyLM(nn.Module):
    head: heads.OutputHead

    @nn.compact
    def __call__(self, tokens_BxT, targets_BxT):
      emb = nn.Embed(V, E)(tokens_BxT)
      hidden, _ = lm_linen.RNNLayer("gru", E, H)(emb)
      return lm_linen.OutputLayer(self.head, H)(hidden, targets_BxT)

  model = TinyLM(HEADS["hsm"]())
  tokens = jnp.zeros((B, T), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens, tokens)
  loss = model.apply(variables, tokens, tokens)
  assert loss.shape == (B, T) and np.all(np.isfinite(loss))
  assert "tables" in variables and "params" in variables
