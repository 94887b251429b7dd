"""Tests for lm_jax.linen: the Linen modules equal the functional heads and cells they wrap."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_layer_cases import B, E, H, HEADS, T, V, data, head_names
from lm_jax import heads
from lm_jax import linen as lm_linen
from lm_jax._layer_util import leaf_name
from lm_jax.models import rnn

HEAD_NAMES = head_names(['full', 'class', 'hsm', 'dsoftmax', 'neg'])


def _as_head_params(head, flat_params):
  """The functional head's params pytree from the module's one-entry-per-leaf params."""
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  return jax.tree.unflatten(treedef, [flat_params[leaf_name(p)] for p, _ in paths])


@pytest.mark.parametrize("name", HEAD_NAMES)
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
