"""Tests for lm_jax.models.rnn: cells against independent references, the scan against a loop."""
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax.test_util import check_grads

from lm_jax.models import rnn

B, T, E, H = 3, 5, 4, 6
CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
# One Cell object per name, so the jitted functions below hit their caches.
CELL = {name: rnn.get_cell(name) for name in CELLS}
scan_jit = jax.jit(rnn.scan_layer, static_argnums=0, static_argnames="unroll")
unhoisted_jit = jax.jit(rnn.scan_layer_unhoisted, static_argnums=0)
step_jit = jax.jit(lambda cell, *args: cell.step(*args), static_argnums=0)


def _setup(name, seed=0, dtype=jnp.float32, init_scale=0.5):
  """Params shaped like ``cell.init``'s, inputs and a nonzero carry, all drawn with NumPy
  (compiling threefry for each test's init would dominate run time; init is tested below)."""
  cell = CELL[name]
  rng = np.random.default_rng(seed)
  draw = lambda shape, scale: jnp.asarray(rng.uniform(-scale, scale, shape), dtype)
  shapes = jax.eval_shape(lambda k: cell.init(k, E, H), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda s: draw(s.shape, init_scale), shapes)
  x_BxTxE = draw((B, T, E), 2.0)
  carry = jax.tree_util.tree_map(lambda z: draw(z.shape, 1.0), cell.initial_carry(B, H, dtype))
  return cell, params, x_BxTxE, carry


def _loop(cell, params, x_BxTxE, carry, mask_BxT=None):
  """Python loop over time calling ``step`` with an explicit per-step projection."""
  outputs = []
  for t in range(x_BxTxE.shape[1]):
    new_carry, h_BxH = cell.step(params, carry, cell.input_projection(params, x_BxTxE[:, t]))
    if mask_BxT is not None:
      keep = mask_BxT[:, t][:, None]
      new_carry = jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new_carry, carry)
      h_BxH = jnp.where(keep, h_BxH, 0.0)
    carry = new_carry
    outputs.append(h_BxH)
  return jnp.stack(outputs, axis=1), carry


def _assert_trees_close(a, b, **tol):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


MASK_BxT = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1]], bool)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("masked", [pytest.param(False), True])
def test_scan_equals_python_loop_and_unhoisted(name, masked):
  cell, params, x_BxTxE, carry = _setup(name)
  mask_BxT = MASK_BxT if masked else None
  expected = _loop(cell, params, x_BxTxE, carry, mask_BxT)
  _assert_trees_close(scan_jit(cell, params, x_BxTxE, carry, mask_BxT), expected,
                      rtol=1e-5, atol=1e-6)
  _assert_trees_close(unhoisted_jit(cell, params, x_BxTxE, carry, mask_BxT), expected,
                      rtol=1e-5, atol=1e-6)
  _assert_trees_close(scan_jit(cell, params, x_BxTxE, carry, mask_BxT, unroll=2), expected,
                      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,phi", [("tanh", np.tanh), ("relu", lambda a: np.maximum(a, 0))])
def test_elman_matches_notes_formula_in_numpy(activation, phi):
  cell, params, x_BxTxE, carry = _setup("rnn_" + activation)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.asarray(carry, np.float64)
  expected = []
  for t in range(T):  # h_t = phi(x_t W_xh + h_{t-1} W_hh + b_h)
    h = phi(np.asarray(x_BxTxE[:, t], np.float64) @ p["W_xh_ExG"] + h @ p["W_hh_HxG"] + p["b_G"])
    expected.append(h)
  out_BxTxH, final = scan_jit(cell, params, x_BxTxE, carry)
  np.testing.assert_allclose(out_BxTxH, np.stack(expected, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(final, h, rtol=1e-5, atol=1e-6)
  assert np.any(np.asarray(out_BxTxH) < 0) == (activation == "tanh")


def test_elman_direct_is_elman_with_identity_input_matrix_and_the_formula():
  direct, elman = rnn.get_cell("elman_direct"), rnn.get_cell("elman")
  rng = np.random.default_rng(3)
  params = {"W_hh_HxG": jnp.asarray(rng.uniform(-0.5, 0.5, (H, H)), jnp.float32),
            "b_G": jnp.asarray(rng.uniform(-0.5, 0.5, H), jnp.float32)}
  x_BxTxH = jnp.asarray(rng.uniform(-2, 2, (B, T, H)), jnp.float32)
  carry = jnp.asarray(rng.uniform(-1, 1, (B, H)), jnp.float32)
  for mask_BxT in (None, MASK_BxT):
    got = scan_jit(direct, params, x_BxTxH, carry, mask_BxT)
    with_identity = {**params, "W_xh_ExG": jnp.eye(H)}
    _assert_trees_close(got, scan_jit(elman, with_identity, x_BxTxH, carry, mask_BxT),
                        rtol=1e-5, atol=1e-6)
    _assert_trees_close(got, _loop(direct, params, x_BxTxH, carry, mask_BxT), rtol=1e-5,
                        atol=1e-6)
  h, p = np.asarray(carry, np.float64), {k: np.asarray(v, np.float64) for k, v in params.items()}
  for t in range(T):  # h_t = tanh(x_t + h_{t-1} W_hh + b_h)
    h = np.tanh(np.asarray(x_BxTxH[:, t], np.float64) + h @ p["W_hh_HxG"] + p["b_G"])
  np.testing.assert_allclose(scan_jit(direct, params, x_BxTxH, carry)[1], h, rtol=1e-5,
                             atol=1e-6)
  check_grads(lambda prm, x: rnn.scan_layer(direct, prm, x, carry, MASK_BxT)[0].sum(),
              (params, x_BxTxH), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_elman_direct_init_and_shape_errors():
  direct = rnn.get_cell("elman_direct")
  params = direct.init(jax.random.PRNGKey(0), H, H)
  assert sorted(params) == ["W_hh_HxG", "b_G"] and params["W_hh_HxG"].shape == (H, H)
  with pytest.raises(ValueError, match="input_size must equal hidden_size, got 4 and 6"):
    direct.init(jax.random.PRNGKey(0), E, H)
  with pytest.raises(ValueError, match="has E=4 but a cell without W_xh adds its input to the "
                                       "hidden state, of size 6"):
    rnn.scan_layer(direct, params, jnp.zeros((B, T, E)), direct.initial_carry(B, H))


def _flax_scan(flax_cell, variables, x_BxTxE, carry):
  outputs = []
  for t in range(x_BxTxE.shape[1]):
    carry, y = flax_cell.apply(variables, carry, x_BxTxE[:, t])
    outputs.append(y)
  return jnp.stack(outputs, 1), carry


def test_gru_matches_flax_gru_cell():
  cell, params, x_BxTxE, h = _setup("gru")
  w_x = np.split(np.asarray(params["W_xh_ExG"]), 3, axis=1)
  w_h = np.split(np.asarray(params["W_hh_HxG"]), 3, axis=1)
  b = np.split(np.asarray(params["b_G"]), 3)
  flax_params = {"ir": {"kernel": w_x[0], "bias": b[0]}, "iz": {"kernel": w_x[1], "bias": b[1]},
                 "in": {"kernel": w_x[2], "bias": b[2]}, "hr": {"kernel": w_h[0]},
                 "hz": {"kernel": w_h[1]}, "hn": {"kernel": w_h[2], "bias": params["b_hn_H"]}}
  expected = _flax_scan(nn.GRUCell(features=H), {"params": flax_params}, x_BxTxE, h)
  _assert_trees_close(scan_jit(cell, params, x_BxTxE, h), expected, rtol=1e-5, atol=1e-6)


def test_lstm_matches_flax_optimized_lstm_cell():
  cell, params, x_BxTxE, carry = _setup("lstm")
  w_x = np.split(np.asarray(params["W_xh_ExG"]), 4, axis=1)
  w_h = np.split(np.asarray(params["W_hh_HxG"]), 4, axis=1)
  b = np.split(np.asarray(params["b_G"]), 4)
  flax_params = {}
  for k, gate in enumerate("ifgo"):
    flax_params["i" + gate] = {"kernel": w_x[k]}
    flax_params["h" + gate] = {"kernel": w_h[k], "bias": b[k]}
  expected = _flax_scan(nn.OptimizedLSTMCell(features=H), {"params": flax_params}, x_BxTxE, carry)
  _assert_trees_close(scan_jit(cell, params, x_BxTxE, carry), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CELLS)
def test_two_halves_with_carried_state_equal_one_pass(name):
  cell, params, x_BxTxE, carry = _setup(name)
  out_full, final_full = scan_jit(cell, params, x_BxTxE, carry)
  out_a, mid = scan_jit(cell, params, x_BxTxE[:, :2], carry)
  out_b, final = scan_jit(cell, params, x_BxTxE[:, 2:], mid)
  np.testing.assert_allclose(jnp.concatenate([out_a, out_b], 1), out_full, rtol=1e-6, atol=1e-6)
  _assert_trees_close(final, final_full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CELLS)
def test_padding_leaves_carry_unchanged(name):
  cell, params, x_BxTxE, carry = _setup(name)
  out, final = scan_jit(cell, params, x_BxTxE, carry, jnp.zeros((B, T), bool))
  _assert_trees_close(final, carry, rtol=0, atol=0)
  np.testing.assert_array_equal(out, 0.0)
  # A padded tail: the final carry is the carry after the real prefix.
  mask_BxT = jnp.arange(T)[None, :] < 3
  _, prefix_final = scan_jit(cell, params, x_BxTxE[:, :3], carry)
  _, padded_final = scan_jit(cell, params, x_BxTxE, carry, jnp.broadcast_to(mask_BxT, (B, T)))
  _assert_trees_close(padded_final, prefix_final, rtol=1e-5, atol=1e-6)  # two programs


@settings(deadline=None, max_examples=20)
@given(mask_T=hnp.arrays(bool, (T,)), name=st.sampled_from(CELLS), seed=st.integers(0, 2**16))
def test_masked_steps_are_skipped(mask_T, name, seed):
  """Property: a masked row ends in the carry of running only its real tokens, in order."""
  cell, params, x_BxTxE, carry = _setup(name, seed)
  _, final = scan_jit(cell, params, x_BxTxE, carry, np.broadcast_to(mask_T, (B, T)))
  expected = carry
  for t in np.flatnonzero(mask_T):
    expected, _ = step_jit(cell, params, expected, cell.input_projection(params, x_BxTxE[:, t]))
  _assert_trees_close(final, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,modes", [pytest.param("rnn_tanh", ("rev",)),
                                        pytest.param("gru", ("rev",)),
                                        ("lstm", ("fwd", "rev"))])
def test_check_grads(name, modes):
  with jax.enable_x64(True):
    cell, params, x_BxTxE, carry = _setup(name, dtype=jnp.float64)
    mask_BxT = jnp.asarray(MASK_BxT)

    def f(params, x_BxTxE, carry):
      out, final = rnn.scan_layer(cell, params, x_BxTxE, carry, mask_BxT)
      return jnp.sum(out ** 2) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree_util.tree_leaves(final))

    check_grads(jax.jit(f), (params, x_BxTxE, carry), order=1, modes=modes, atol=1e-6, rtol=1e-6)


def test_check_grads_second_order_elman():
  with jax.enable_x64(True):
    cell, params, x_BxTxE, carry = _setup("rnn_tanh", dtype=jnp.float64)
    f = jax.jit(lambda x: jnp.sum(rnn.scan_layer(cell, params, x, carry)[0] ** 2))
    check_grads(f, (x_BxTxE[:, :3],), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_jit_and_vmap(name):
  cell, params, x_BxTxE, carry = _setup(name)
  expected = rnn.scan_layer(cell, params, x_BxTxE, carry)
  jitted = jax.jit(lambda p, x, c: rnn.scan_layer(cell, p, x, c))
  _assert_trees_close(jitted(params, x_BxTxE, carry), expected, rtol=1e-5, atol=1e-6)
  # vmap over an ensemble of two parameter sets.
  params2 = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params)
  out_2xBxTxH, _ = jax.vmap(lambda p: rnn.scan_layer(cell, p, x_BxTxE, carry))(params2)
  np.testing.assert_allclose(out_2xBxTxH[0], expected[0], rtol=1e-5, atol=1e-6)
  double = jax.tree_util.tree_map(lambda a: 2 * a, params)
  np.testing.assert_allclose(out_2xBxTxH[1], scan_jit(cell, double, x_BxTxE, carry)[0],
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_keep_float32_carry():
  cell, params, x_BxTxE, _ = _setup("lstm")
  carry = cell.initial_carry(B, H)
  params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  out16, final16 = scan_jit(cell, params16, x_BxTxE.astype(jnp.bfloat16), carry)
  out32, _ = scan_jit(cell, params, x_BxTxE, carry)
  assert out16.dtype == jnp.float32 and all(c.dtype == jnp.float32 for c in final16)
  np.testing.assert_allclose(out16, out32, atol=3e-2)


@pytest.mark.parametrize("name", rnn.CELL_NAMES)
def test_every_cell_accepts_bfloat16_params_inputs_and_carry(name):
  cell, rng = rnn.get_cell(name), np.random.default_rng(0)
  input_size = H if name == "elman_direct" else E  # no W_xh: the input is added to h
  shapes = jax.eval_shape(lambda k: cell.init(k, input_size, H), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-.5, .5, s.shape)), shapes)
  x_BxTxE = jnp.asarray(rng.uniform(-2.0, 2.0, (B, T, input_size)), jnp.float32)
  params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  carry16 = cell.initial_carry(B, H, jnp.bfloat16)
  out16, final16 = scan_jit(cell, params16, x_BxTxE.astype(jnp.bfloat16), carry16)
  assert out16.dtype == jnp.bfloat16
  assert all(c.dtype == jnp.bfloat16 for c in jax.tree_util.tree_leaves(final16))
  # Against float32 arithmetic on the same rounded inputs: gates and activations are
  # computed in float32, only the bf16 carry is rounded between steps.
  as32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
  out32, _ = scan_jit(cell, as32(params16), x_BxTxE.astype(jnp.bfloat16).astype(jnp.float32),
                      as32(carry16))
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=2e-2)


def test_init_shapes_range_and_forget_bias():
  for name, gates in [("elman", 1), ("gru", 3), ("lstm", 4)]:
    shapes = jax.eval_shape(lambda k: rnn.get_cell(name).init(k, E, H), jax.random.PRNGKey(0))
    assert shapes["W_xh_ExG"].shape == (E, gates * H) and shapes["b_G"].shape == (gates * H,)
    assert shapes["W_hh_HxG"].shape == (H, gates * H)
    assert ("b_hn_H" in shapes) == (name == "gru")
  init = jax.jit(rnn.lstm_cell(forget_bias=1.0).init, static_argnums=(1, 2),
                 static_argnames="init_scale")
  params = init(jax.random.PRNGKey(1), E, H, init_scale=0.05)
  b_G = params.pop("b_G")
  for a in [*params.values(), b_G[:H], b_G[2 * H:]]:
    assert float(jnp.max(jnp.abs(a))) <= 0.05 and float(jnp.std(a)) > 0.01  # uniform, not zero
  assert 0.95 <= float(jnp.min(b_G[H:2 * H])) and float(jnp.max(b_G[H:2 * H])) <= 1.05


def test_get_cell_and_bad_inputs_raise():
  assert set(rnn.CELL_NAMES) == {"elman", "rnn_tanh", "rnn_relu", "elman_direct", "gru", "lstm"}
  with pytest.raises(ValueError, match="unknown cell 'transformer'"):
    rnn.get_cell("transformer")
  with pytest.raises(ValueError, match="activation must be one of"):
    rnn.elman_cell("sigmoid")
  with pytest.raises(ValueError, match="must be positive"):
    rnn.gru_cell().init(jax.random.PRNGKey(0), 0, H)
  cell, params, x_BxTxE, carry = _setup("lstm")
  with pytest.raises(ValueError, match=r"rank 3 \[B, T, E\], got shape \(3, 5\)"):
    rnn.scan_layer(cell, params, x_BxTxE[..., 0], carry)
  with pytest.raises(ValueError, match="has E=3 but W_xh_ExG has shape"):
    rnn.scan_layer(cell, params, x_BxTxE[..., :3], carry)
  with pytest.raises(ValueError, match=r"carry leaf has shape \(2, 6\), expected"):
    rnn.scan_layer(cell, params, x_BxTxE, cell.initial_carry(2, H))
  with pytest.raises(ValueError, match=r"mask_BxT has shape \(3, 4\)"):
    rnn.scan_layer_unhoisted(cell, params, x_BxTxE, carry, jnp.ones((B, 4), bool))


def test_bench_rnn_script_smoke(tmp_path):
  """End-to-end run of experiments/bench_rnn.py on tiny sizes."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_rnn.py"),
                  "--cells=elman,lstm", "--batch_size=2", "--bptt=3", "--size=8", "--repeats=1",
                  "--matmul_sizes=64", f"--json_out={out}"],
                 check=True, env={**os.environ, "PYTHONPATH": root}, capture_output=True)
  result = json.loads(out.read_text())
  assert set(result["cells"]) == {"elman", "lstm"}
  assert result["cells"]["lstm"]["flops_per_token"] == 6 * (8 * 8 + 8 * 8) * 4
  assert result["cells"]["elman"]["naive"]["speedup_vs_naive"] == 1.0


@pytest.mark.parametrize("name", ["elman", "elman_direct", "gru", "lstm"])
def test_bfloat16_gradients_are_summed_in_float32_over_a_long_sequence(name):
  """scan_layer(dtype=bfloat16) with float32 params: the params' gradients are sums over
  T = 512 steps (W_hh, b_hn inside the scan) and B T rows (b, W_xh); summed in bfloat16 they
  drift by ~2-3% here, summed in float32 they stay within bfloat16's own ~0.4% rounding."""
  cell = rnn.get_cell(name)
  b, t, h = 4, 512, 16
  params = cell.init(jax.random.PRNGKey(0), h, h, init_scale=0.3)
  x_BxTxE = jax.random.normal(jax.random.PRNGKey(1), (b, t, h))
  ct_BxTxH = jax.random.normal(jax.random.PRNGKey(2), (b, t, h))

  def score(p, dtype):
    out, _ = rnn.scan_layer(cell, p, x_BxTxE.astype(dtype or jnp.float32),
                            cell.initial_carry(b, h), dtype=dtype)
    return jnp.vdot(out.astype(jnp.float32), ct_BxTxH)

  exact, mixed = jax.grad(score)(params, None), jax.grad(score)(params, jnp.bfloat16)
  for key in exact:
    assert mixed[key].dtype == jnp.float32, key
    error = jnp.linalg.norm(mixed[key] - exact[key]) / jnp.linalg.norm(exact[key])
    assert error < 1e-2, (key, float(error))
