"""Tests for lm_jax.models.language_model: reference maths, causality, state carrying, masking, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax import heads
from lm_jax.models import language_model as lm
from lm_jax.models import rnn

V, E, H, B, T = 11, 5, 6, 3, 6


def _model(cell="lstm", num_layers=2, dropout=0.0, **kwargs):
  return lm.make_language_model(vocab_size=V, embed_size=E, hidden_size=H, num_layers=num_layers,
                                cell=cell, dropout=dropout, init_scale=0.3, **kwargs)


LSTM2 = _model()
loss_jit = jax.jit(LSTM2.loss)
hidden_jit = jax.jit(LSTM2.hidden)


def _init(model, seed):
  """Params shaped like ``model.init``'s, drawn with NumPy: compiling threefry for every
  test's init would dominate this file's run time (``model.init`` is tested on its own)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), s.dtype), shapes)


def _data(seed=0):
  rng = np.random.default_rng(1000 + seed)
  return jnp.asarray(rng.integers(0, V, (B, T))), jnp.asarray(rng.integers(0, V, (B, T)))


def _close(a, b, **tol):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_init_structure_and_initial_state():
  params = jax.jit(LSTM2.init)(jax.random.PRNGKey(0))
  assert set(params) == {"embed_VxE", "layers", "head"} and params["embed_VxE"].shape == (V, E)
  assert params["layers"][0]["W_xh_ExG"].shape == (E, 4 * H)
  assert params["layers"][1]["W_xh_ExG"].shape == (H, 4 * H)
  assert params["head"]["weight_VxH"].shape == (V, H)
  assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(params)) <= 0.3
  state = LSTM2.initial_state(4)
  assert len(state) == 2 and all(c.shape == (4, H) for c in jax.tree_util.tree_leaves(state))


def test_two_layer_elman_matches_numpy_float64(activation="tanh"):
  model = _model(cell="rnn_" + activation)
  params = _init(model, 1)
  inputs_BxT, targets_BxT = _data(1)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  phi = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0.0))
  x = p["embed_VxE"][np.asarray(inputs_BxT)]
  for layer in p["layers"]:
    h, outs = np.zeros((B, H)), []
    for t in range(T):
      h = phi(x[:, t] @ layer["W_xh_ExG"] + h @ layer["W_hh_HxG"] + layer["b_G"])
      outs.append(h)
    x = np.stack(outs, 1)
  logits = x @ p["head"]["weight_VxH"].T + p["head"]["bias_V"]
  lse = np.log(np.sum(np.exp(logits), axis=-1))
  expected = lse - np.take_along_axis(logits, np.asarray(targets_BxT)[..., None], -1)[..., 0]
  loss_BxT, state = model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B))
  np.testing.assert_allclose(loss_BxT, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state[-1], x[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,num_layers", [("gru", 1), ("lstm", 2)])
def test_causality_by_gradient(cell, num_layers):
  """d loss[:, t] / d emb[:, s] is zero for s > t, nonzero for s <= t, and rows do not mix."""
  model = _model(cell=cell, num_layers=num_layers)
  params = _init(model, 2)
  inputs_BxT, targets_BxT = _data(2)
  emb_BxTxE = params["embed_VxE"][inputs_BxT]

  def loss_BxT(emb):
    hidden_BxTxH, _ = model.hidden_from_embeddings(params, emb, model.initial_state(B))
    return model.head.loss(params["head"], hidden_BxTxH.reshape(B * T, H),
                           targets_BxT.reshape(B * T)).reshape(B, T)

  jac = np.asarray(jax.jacrev(loss_BxT)(emb_BxTxE))  # [B, T, B, T, E]
  magnitude = np.abs(jac).sum(-1)  # [B, T, B, T]
  for b in range(B):
    for t in range(T):
      assert np.all(magnitude[b, t, b, t + 1:] == 0.0), (b, t)
      assert np.all(magnitude[b, t, b, :t + 1] > 0.0), (b, t)
      assert np.all(np.delete(magnitude[b, t], b, axis=0) == 0.0), (b, t)


def test_two_halves_with_carried_state_equal_one_pass():
  model = LSTM2
  params = _init(model, 3)
  inputs_BxT, targets_BxT = _data(3)
  state0 = jax.tree_util.tree_map(lambda z: z + 0.1, model.initial_state(B))
  loss_full, state_full = loss_jit(params, inputs_BxT, targets_BxT, state0)
  loss_a, mid = loss_jit(params, inputs_BxT[:, :3], targets_BxT[:, :3], state0)
  loss_b, state_ab = loss_jit(params, inputs_BxT[:, 3:], targets_BxT[:, 3:], mid)
  np.testing.assert_allclose(jnp.concatenate([loss_a, loss_b], 1), loss_full, rtol=1e-5, atol=1e-6)
  _close(state_ab, state_full, rtol=1e-5, atol=1e-6)


def test_padding_keeps_state_and_zeroes_loss():
  params = _init(LSTM2, 4)
  inputs_BxT, targets_BxT = _data(4)
  state0 = jax.tree_util.tree_map(lambda z: z + 0.2, LSTM2.initial_state(B))
  loss_BxT, state = loss_jit(params, inputs_BxT, targets_BxT, state0, mask_BxT=jnp.zeros((B, T), bool))
  np.testing.assert_array_equal(loss_BxT, 0.0)
  _close(state, state0, rtol=0, atol=0)


@settings(deadline=None, max_examples=15)
@given(lengths=st.lists(st.integers(1, T), min_size=B, max_size=B), seed=st.integers(0, 2**16))
def test_right_padding_changes_nothing_on_real_tokens(lengths, seed):
  """Property: with a prefix mask, real positions keep their loss and the state is that after the last real token."""
  params = _init(LSTM2, seed)
  inputs_BxT, targets_BxT = _data(seed)
  mask_BxT = jnp.arange(T)[None, :] < jnp.array(lengths)[:, None]
  state0 = LSTM2.initial_state(B)
  loss_masked, state_masked = loss_jit(params, inputs_BxT, targets_BxT, state0, mask_BxT=mask_BxT)
  loss_full, _ = loss_jit(params, inputs_BxT, targets_BxT, state0)
  np.testing.assert_allclose(loss_masked, jnp.where(mask_BxT, loss_full, 0.0), rtol=1e-5, atol=1e-6)
  hidden_BxTxH, _ = hidden_jit(params, inputs_BxT, state0)
  last_h_BxH = hidden_BxTxH[jnp.arange(B), jnp.array(lengths) - 1]
  np.testing.assert_allclose(state_masked[-1][1], last_h_BxH, rtol=1e-5, atol=1e-6)


def test_log_probs_normalised_and_consistent_with_loss():
  params = _init(LSTM2, 5)
  inputs_BxT, targets_BxT = _data(5)
  hidden_BxTxH, _ = hidden_jit(params, inputs_BxT, LSTM2.initial_state(B))
  logp_BxTxV = LSTM2.log_probs(params, hidden_BxTxH)
  assert logp_BxTxV.shape == (B, T, V)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_BxTxV, axis=-1), 0.0, atol=1e-5)
  loss_BxT, _ = loss_jit(params, inputs_BxT, targets_BxT, LSTM2.initial_state(B))
  gathered = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss_BxT, -gathered, rtol=1e-5, atol=1e-5)


def test_check_grads_tiny_model():
  model = lm.make_language_model(vocab_size=5, embed_size=3, hidden_size=3, num_layers=2,
                                 cell="lstm", init_scale=0.5)
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _init(model, 6))
    state = jax.tree_util.tree_map(lambda z: z.astype(jnp.float64) + 0.1, model.initial_state(2))
    inputs = jnp.array([[1, 2, 3], [4, 0, 2]])
    mask = jnp.array([[True, True, True], [True, True, False]])
    f = jax.jit(lambda p, s: jnp.sum(model.loss(p, inputs, inputs, s, mask_BxT=mask)[0]))
    check_grads(f, (params, state), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_dropout_sites_and_keys():
  plain = _model(cell="rnn_tanh")
  params = _init(plain, 7)
  inputs_BxT, targets_BxT = _data(7)
  state0 = plain.initial_state(B)
  plain_loss = jax.jit(plain.loss)
  base, _ = plain_loss(params, inputs_BxT, targets_BxT, state0)
  key = jax.random.PRNGKey(1)
  same, _ = plain_loss(params, inputs_BxT, targets_BxT, state0, dropout_key=key)  # rate 0
  np.testing.assert_allclose(same, base, rtol=1e-6)
  noisy = _model(cell="rnn_tanh", dropout=0.5)
  noisy_loss = jax.jit(noisy.loss)
  no_key, _ = noisy_loss(params, inputs_BxT, targets_BxT, state0)
  np.testing.assert_allclose(no_key, base, rtol=1e-6)
  first, _ = noisy_loss(params, inputs_BxT, targets_BxT, state0, dropout_key=key)
  again, _ = noisy_loss(params, inputs_BxT, targets_BxT, state0, dropout_key=key)
  other, _ = noisy_loss(params, inputs_BxT, targets_BxT, state0, dropout_key=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, base) and not np.allclose(first, other)


def test_inverted_dropout_keeps_the_mean():
  x = jnp.ones((20000,))
  y = lm.inverted_dropout(x, 0.25, jax.random.PRNGKey(0))
  assert abs(float(jnp.mean(y == 0.0)) - 0.25) < 0.02
  assert abs(float(jnp.mean(y)) - 1.0) < 0.03
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 4.0 / 3.0], rtol=1e-6)


def test_inverted_dropout_broadcast_dims_share_one_mask_over_time():
  x = jnp.arange(1.0, 1.0 + 8 * 50 * 40).reshape(8, 50, 40)
  key = jax.random.PRNGKey(3)
  for row_ids in (None, jnp.arange(8)):
    y = lm.inverted_dropout(x, 0.4, key, row_ids=row_ids, broadcast_dims=(1,))
    kept = np.asarray(y != 0.0)
    # The same mask at every t.
    np.testing.assert_array_equal(kept, np.broadcast_to(kept[:, :1], kept.shape))
    assert abs(kept[:, 0].mean() - 0.6) < 0.06  # 320 mask entries, one per (row, feature)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.6, rtol=1e-6)
  # Per-row masks: row b's mask does not depend on the other rows (device splits agree).
  whole = lm.inverted_dropout(x, 0.4, key, row_ids=jnp.arange(8), broadcast_dims=(1,))
  part = lm.inverted_dropout(x[4:], 0.4, key, row_ids=jnp.arange(4, 8), broadcast_dims=(-2,))
  np.testing.assert_array_equal(whole[4:], part)
  with pytest.raises(ValueError, match="broadcast_dims cannot contain the row axis 0"):
    lm.inverted_dropout(x, 0.4, key, row_ids=jnp.arange(8), broadcast_dims=(0,))


def test_variational_dropout_model_reuses_masks_over_time(monkeypatch):
  params = _init(_model(cell="rnn_tanh", num_layers=1), 4)
  inputs_BxT, targets_BxT = _data(4)
  key = jax.random.PRNGKey(5)
  losses = {}
  for variational in (False, True):
    model = _model(cell="rnn_tanh", num_layers=1, dropout=0.5, variational_dropout=variational)
    losses[variational], _ = model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B),
                                        dropout_key=key)
    again, _ = model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B),
                          dropout_key=key)
    np.testing.assert_array_equal(losses[variational], again)
  assert not np.allclose(losses[False], losses[True])
  # What the layer reads from a constant embedding sequence: the same dropped features at every t.
  seen = []
  scan_layer = rnn.scan_layer
  monkeypatch.setattr(rnn, "scan_layer",
                      lambda *a, **k: seen.append(a[2]) or scan_layer(*a, **k))
  model = _model(cell="rnn_tanh", num_layers=1, dropout=0.5, variational_dropout=True)
  model.hidden_from_embeddings(params, jnp.ones((B, T, E)), model.initial_state(B),
                               dropout_key=key)
  x_BxTxE = np.asarray(seen[0])
  assert (x_BxTxE == 0).any() and (x_BxTxE != 0).any()
  np.testing.assert_array_equal(x_BxTxE, np.broadcast_to(x_BxTxE[:, :1], x_BxTxE.shape))


def test_head_is_called_with_flat_tokens_and_a_key():
  calls = []
  base_head = heads.full_softmax(V)

  def spy_loss(params, hidden_NxH, targets_N, *, key=None, where=None):
    calls.append((hidden_NxH.shape, targets_N.shape, None if where is None else where.shape, key is None))
    return base_head.loss(params, hidden_NxH, targets_N, where=where)

  model = _model(num_layers=1, head=base_head._replace(loss=spy_loss))
  params = _init(model, 8)
  inputs_BxT, targets_BxT = _data(8)
  model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B))
  model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B),
             mask_BxT=jnp.ones((B, T), bool), dropout_key=jax.random.PRNGKey(0))
  assert calls == [((B * T, H), (B * T,), None, True), ((B * T, H), (B * T,), (B * T,), False)]


def test_jit_vmap_and_cell_object():
  model = _model(cell=rnn.elman_cell("relu"), num_layers=1)
  params = _init(model, 9)
  inputs_BxT, targets_BxT = _data(9)
  eager, _ = model.loss(params, inputs_BxT, targets_BxT, model.initial_state(B))
  jitted, _ = jax.jit(model.loss)(params, inputs_BxT, targets_BxT, model.initial_state(B))
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  per_row = jax.vmap(lambda x, y, s: model.loss(params, x[None], y[None], s)[0][0])(
      inputs_BxT, targets_BxT, jax.tree_util.tree_map(lambda z: z[:, None], model.initial_state(B)))
  np.testing.assert_allclose(per_row, eager, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
    _model(dropout=1.0)
  with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
    _model(num_layers=0)
  with pytest.raises(ValueError, match="unknown cell 'lstmm'"):
    _model(cell="lstmm")
  params = _init(LSTM2, 0)
  inputs_BxT, targets_BxT = _data()
  with pytest.raises(ValueError, match="state has 1 layer carries, expected num_layers=2"):
    LSTM2.loss(params, inputs_BxT, targets_BxT, LSTM2.initial_state(B)[:1])
  with pytest.raises(ValueError, match=r"inputs_BxT must be integer token ids of rank 2"):
    LSTM2.hidden(params, inputs_BxT.astype(jnp.float32), LSTM2.initial_state(B))
  with pytest.raises(ValueError, match=r"targets_BxT has shape \(3, 5\), expected the inputs' \(3, 6\)"):
    LSTM2.loss(params, inputs_BxT, targets_BxT[:, :5], LSTM2.initial_state(B))


def test_tied_weights_share_the_embedding():
  """A tied model equals an untied one whose head weight is the embedding; both uses
  of the matrix contribute to its gradient."""
  kwargs = dict(vocab_size=7, embed_size=4, hidden_size=4, cell="elman")
  tied = lm.make_language_model(tie_weights=True, **kwargs)
  untied = lm.make_language_model(**kwargs)
  params = tied.init(jax.random.PRNGKey(0))
  assert set(params["head"]) == {"bias_V"}
  untied_params = {**params, "head": {**params["head"], "weight_VxH": params["embed_VxE"]}}
  tokens_BxT = jnp.array([[1, 2, 3, 4], [5, 6, 0, 1]])
  state = tied.initial_state(2)
  loss = lambda m, p: jnp.sum(m.loss(p, tokens_BxT, tokens_BxT, state)[0])
  np.testing.assert_allclose(loss(tied, params), loss(untied, untied_params), rtol=1e-6)
  g_tied = jax.grad(lambda p: loss(tied, p))(params)["embed_VxE"]
  g_untied = jax.grad(lambda p: loss(untied, p))(untied_params)
  np.testing.assert_allclose(g_tied, g_untied["embed_VxE"] + g_untied["head"]["weight_VxH"],
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="tie_weights needs embed_size == hidden_size"):
    lm.make_language_model(vocab_size=7, embed_size=3, hidden_size=4, tie_weights=True)


def test_generation_from_a_non_finite_model_says_so():
  """A NaN parameter makes the hidden state non-finite: generation names the token instead
  of feeding the head's -1 sentinel back as a wrapped-around id."""
  from lm_jax.models import generation  # pylint: disable=g-import-not-at-top
  model = lm.make_language_model(vocab_size=7, embed_size=3, hidden_size=4, num_layers=1,
                                 cell="elman")
  params = model.init(jax.random.PRNGKey(0))
  tokens = generation.generate(model, params, np.array([1, 2]), num_tokens=4,
                               key=jax.random.PRNGKey(1))
  assert tokens.shape == (4,) and np.all((tokens >= 0) & (tokens < 7))
  bad = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(ValueError, match="hidden state became non-finite .* at generated token 0"):
    generation.generate(model, bad, np.array([1, 2]), num_tokens=4, key=jax.random.PRNGKey(1))


# Heads whose every matmul is plain and so runs in bfloat16 under --dtype=bfloat16; the
# others (class, hsm, sampled, ...) upcast the bfloat16 hidden state and compute in float32.
BFLOAT16_HEADS = ("full", "dsoftmax")


@pytest.mark.parametrize("cell,head", [("lstm", h) for h in heads.HEAD_NAMES]
                         + [("gru", "full"), ("elman", "full")])
def test_bfloat16_compute_keeps_float32_params_grads_and_losses(cell, head, dot_dtypes):
  """--dtype=bfloat16: the matmuls of the loss and its gradient take bfloat16 operands (the
  embedding and layers always; the head's too for BFLOAT16_HEADS), never a bfloat16 operand
  promoted beside a float32 one; the params, their gradients and the loss stay float32, and
  the loss is the float32 model's within bfloat16's rounding (8 bits of mantissa)."""
  counts = np.arange(20, 0, -1) * 3
  options = {"bands": "10:8,-1:8"} if head == "dsoftmax" else {}
  kwargs = dict(vocab_size=20, embed_size=8, hidden_size=16, num_layers=2, cell=cell,
                head=heads.make_head(head, vocab_size=20, counts=counts, **options))
  assert kwargs["head"].mixed_precision == (head in BFLOAT16_HEADS)
  f32 = lm.make_language_model(**kwargs)
  bf16 = lm.make_language_model(**kwargs, dtype=jnp.bfloat16)
  params = f32.init(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 20)

  def mean_loss(model, p):  # the same noise samples for both (sampled heads)
    return model.loss(p, tokens, tokens, model.initial_state(3),
                      dropout_key=jax.random.PRNGKey(2))[0].mean()

  dots = dot_dtypes(jax.value_and_grad(lambda p: mean_loss(bf16, p)), params)
  assert ("bfloat16", "bfloat16") in dots
  assert all(len(set(d)) == 1 for d in dots), dots  # no silent promotion
  if head in BFLOAT16_HEADS:
    assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
  (loss16, grads16), (loss32, grads32) = (jax.value_and_grad(lambda p: mean_loss(m, p))(params)
                                          for m in (bf16, f32))
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)))
  norms = [jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(g))) for g in (grads16, grads32)]
  assert dot / (norms[0] * norms[1]) > 0.99  # the same descent direction
  nll16 = bf16.nll(params, tokens, tokens, bf16.initial_state(3))[0]
  assert nll16.dtype == jnp.float32


@pytest.mark.parametrize("head", ["full", "class"])
def test_bfloat16_gradients_over_a_long_sequence_stay_within_its_rounding(head):
  """Through the whole model at T = 512: every parameter's gradient within 1% of float32's
  (measured 0.02-0.4%). Casting the layer params to bfloat16 before the scan summed dW_hh
  over T in bfloat16 (2.4-3% off): rnn.scan_layer casts them inside the step."""
  kwargs = dict(vocab_size=20, embed_size=16, hidden_size=16, cell="lstm", init_scale=0.3,
                head=heads.make_head(head, vocab_size=20, counts=np.arange(20, 0, -1),
                                     init_scale=0.3))
  f32 = lm.make_language_model(**kwargs)
  bf16 = lm.make_language_model(**kwargs, dtype=jnp.bfloat16)
  params = f32.init(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 512), 0, 20)

  def grads(model):
    return jax.grad(lambda p: model.loss(p, tokens, tokens, model.initial_state(2))[0].sum())(
        params)

  exact, mixed = grads(f32), grads(bf16)
  for path, e, m in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(exact),
                        jax.tree.leaves(mixed)):
    error = float(jnp.linalg.norm(m - e) / jnp.linalg.norm(e))
    assert error < 1e-2, (jax.tree_util.keystr(path[0]), error)


def test_float16_compute_is_refused():
  with pytest.raises(ValueError, match="float16 needs loss scaling"):
    lm.make_language_model(vocab_size=5, embed_size=3, hidden_size=4, dtype=jnp.float16)
