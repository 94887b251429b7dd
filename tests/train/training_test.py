"""Train/eval steps: exact gradients, carried state, reductions, parallel = serial."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from lm_jax import heads
from lm_jax.data import batching
from lm_jax.models import language_model
from lm_jax.train import optimizers
from lm_jax.train import training

V, B, T = 11, 4, 5


def _model(cell="lstm", dropout=0.0):
  return language_model.make_language_model(vocab_size=V, embed_size=6, hidden_size=8,
                                            num_layers=2, cell=cell, dropout=dropout)


def _batch(seed=0, reset=False, mask=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), bool) if mask is None else mask
  return {"inputs_BxT": jnp.asarray(tokens[:, :-1]), "targets_BxT": jnp.asarray(tokens[:, 1:]),
          "mask_BxT": jnp.asarray(mask), "reset": jnp.asarray(reset)}


def _state(model, optimizer, seed=0):
  return training.create_train_state(model, optimizer, seed=seed, batch_size=B)


def test_sgd_step_equals_manual_gradient_step():
  model = _model()
  opt = optimizers.make_optimizer("sgd", 0.5)
  state = _state(model, opt)
  batch = _batch()

  def mean_loss(params):
    loss, _ = model.loss(params, batch["inputs_BxT"], batch["targets_BxT"], state.rnn_state,
                         mask_BxT=batch["mask_BxT"])
    return loss.mean()

  grads = jax.grad(mean_loss)(state.params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  new_state, metrics = training.train_step(state, batch, model=model, optimizer=opt)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               new_state.params, expected)
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["loss_sum"] / metrics["token_count"],
                             mean_loss(state.params), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(sum(
      float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads))), rtol=1e-5)


def test_sum_over_time_scales_gradient_by_tokens_per_row():
  model = _model(cell="elman")
  batch = _batch(1)
  grads = {}
  for reduction in training.GRAD_REDUCTIONS:
    opt = optimizers.make_optimizer("sgd", 1.0)
    state = _state(model, opt)
    new_state, _ = training.train_step(state, batch, model=model, optimizer=opt,
                                       grad_reduction=reduction)
    grads[reduction] = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a * T, b, rtol=1e-4, atol=1e-7),
               grads["token_mean"], grads["sum_over_time"])


def test_state_is_carried_unless_reset():
  model = _model()
  opt = optimizers.make_optimizer("sgd", 0.0)  # params fixed: isolate the state
  state = _state(model, opt)
  b1, b2 = _batch(0), _batch(1)
  s1, _ = training.train_step(state, b1, model=model, optimizer=opt)
  _, expected = model.loss(state.params, b1["inputs_BxT"], b1["targets_BxT"],
                           model.initial_state(B))
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, s1.rnn_state, expected)
  carried, m_carried = training.train_step(s1, b2, model=model, optimizer=opt)
  reset, m_reset = training.train_step(s1, {**b2, "reset": jnp.asarray(True)}, model=model,
                                       optimizer=opt)
  fresh, m_fresh = training.train_step(state, b2, model=model, optimizer=opt)
  np.testing.assert_allclose(m_reset["loss_sum"], m_fresh["loss_sum"], rtol=1e-6)
  assert not np.allclose(m_carried["loss_sum"], m_fresh["loss_sum"])
  jax.tree.map(close, reset.rnn_state, fresh.rnn_state)


def test_masked_tokens_do_not_count():
  model = _model()
  opt = optimizers.make_optimizer("sgd", 1.0)
  state = _state(model, opt)
  mask = np.ones((B, T), bool)
  mask[:, 3:] = False
  full = _batch(0, mask=mask)
  other = {**full, "targets_BxT": full["targets_BxT"].at[:, 3:].set(0)}
  s_a, m_a = training.train_step(state, full, model=model, optimizer=opt)
  s_b, m_b = training.train_step(state, other, model=model, optimizer=opt)
  assert float(m_a["token_count"]) == B * 3
  np.testing.assert_allclose(m_a["loss_sum"], m_b["loss_sum"], rtol=1e-6)
  jax.tree.map(np.testing.assert_allclose, s_a.params, s_b.params)


def test_learning_rate_lives_in_the_state():
  opt = optimizers.make_optimizer("sgd", 1.0, clip=5.0)
  state = _state(_model(), opt)
  assert float(training.get_learning_rate(state)) == 1.0
  state = training.set_learning_rate(state, 0.25)
  assert float(training.get_learning_rate(state)) == 0.25


def test_lazy_adam_equals_adam_on_dense_gradients():
  rng = np.random.default_rng(0)
  params = {"w_VxH": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b_V": jnp.asarray(rng.normal(size=4), jnp.float32)}
  lazy, adam = optimizers.make_optimizer("lazy_adam", 0.01), optimizers.make_optimizer("adam", 0.01)
  p_lazy, p_adam, s_lazy, s_adam = params, params, lazy.init(params), adam.init(params)
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, s_lazy = lazy.update(g, s_lazy, p_lazy)
    p_lazy = jax.tree.map(jnp.add, p_lazy, u)
    u, s_adam = adam.update(g, s_adam, p_adam)
    p_adam = jax.tree.map(jnp.add, p_adam, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_lazy, p_adam)


def test_lazy_adam_leaves_untouched_rows_and_their_moments_alone():
  """Row 1 gets a gradient at step 1 only: afterwards it stays put (Adam keeps moving it)."""
  lr, b1, b2 = 0.1, 0.9, 0.999
  params = {"w_VxH": jnp.zeros((3, 2))}
  lazy, adam = optimizers.make_optimizer("lazy_adam", lr), optimizers.make_optimizer("adam", lr)
  s_lazy, s_adam = lazy.init(params), adam.init(params)
  g1 = {"w_VxH": jnp.array([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0]])}
  g2 = {"w_VxH": jnp.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])}
  u1, s_lazy = lazy.update(g1, s_lazy, params)
  # Step 1 is Adam's: m/(1-b1) / sqrt(v/(1-b2)) = sign(g) where g != 0 (eps aside) ...
  np.testing.assert_allclose(u1["w_VxH"], -lr * np.array([[1, -1], [1, 0], [0, 0]]), atol=1e-6)
  u2, s_lazy = lazy.update(g2, s_lazy, params)
  np.testing.assert_array_equal(u2["w_VxH"][1:], 0.0)  # ... then rows 1 and 2 stay put
  # row 0 follows Adam's recurrences with the shared count t = 2
  m = (1 - b1) * b1 * np.array([1.0, -2.0]) + (1 - b1) * np.array([1.0, 1.0])
  v = (1 - b2) * b2 * np.array([1.0, 4.0]) + (1 - b2) * np.array([1.0, 1.0])
  expected = -lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + 1e-8)
  np.testing.assert_allclose(u2["w_VxH"][0], expected, rtol=1e-4)
  _, s_adam = adam.update(g1, s_adam, params)
  u2_adam, _ = adam.update(g2, s_adam, params)
  assert float(jnp.abs(u2_adam["w_VxH"][1, 0])) > 0.01  # plain Adam's momentum moves row 1


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="rmsprop"):
    optimizers.make_optimizer("rmsprop", 1.0)


@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_parallel_step_equals_single_device(parallel):
  """A step on 4 fake CPU devices equals one device on the whole batch (params to 1e-6)."""
  assert jax.device_count() >= 4
  model = _model(dropout=0.0)
  opt = optimizers.make_optimizer("adam", 1e-2, clip=1.0)
  state = _state(model, opt)
  state = state.replace(rnn_state=jax.tree.map(
      lambda s: jax.random.normal(jax.random.PRNGKey(3), s.shape), state.rnn_state))
  mask = np.ones((B, T), bool)
  mask[1, 2:] = False  # unequal token counts per device
  batch = _batch(2, mask=mask)
  single, m_single = training.train_step(state, batch, model=model, optimizer=opt)
  step = functools.partial(training.train_step, model=model, optimizer=opt, axis_name="d")
  row_specs = training.TrainState(step=P(), params=P(), opt_state=P(), rng=P(), rnn_state=P("d"))
  batch_specs = {"inputs_BxT": P("d"), "targets_BxT": P("d"), "mask_BxT": P("d"), "reset": P()}
  if parallel == "shard_map":
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(row_specs, batch_specs),
                               out_specs=(row_specs, P()), check_vma=False))
    multi, m_multi = fn(state, batch)
  else:
    def split(x):
      return x.reshape(4, x.shape[0] // 4, *x.shape[1:])
    per_device_state = state.replace(rnn_state=jax.tree.map(split, state.rnn_state))
    per_device_batch = {k: (split(v) if v.ndim else v) for k, v in batch.items()}
    fn = jax.pmap(step, axis_name="d",
                  in_axes=(training.TrainState(None, None, None, None, 0),
                           {"inputs_BxT": 0, "targets_BxT": 0, "mask_BxT": 0, "reset": None}),
                  out_axes=(training.TrainState(None, None, None, None, 0), None),
                  devices=jax.devices()[:4])
    multi, m_multi = fn(per_device_state, per_device_batch)
    multi = multi.replace(rnn_state=jax.tree.map(lambda x: x.reshape(B, *x.shape[2:]),
                                                 multi.rnn_state))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
               multi.params, single.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
               multi.rnn_state, single.rnn_state)
  for k in ("loss_sum", "token_count", "grad_norm"):
    np.testing.assert_allclose(m_multi[k], m_single[k], rtol=1e-5)


def test_evaluate_is_exact_over_the_split():
  """Every target counted once; equals a single-row pass over the whole stream."""
  model = _model()
  params = model.init(jax.random.PRNGKey(0))
  tokens = np.random.default_rng(0).integers(0, V, size=53).astype(np.int32)
  got = training.evaluate(params, batching.eval_batches(tokens, batch_size=1, bptt=7),
                          model=model, batch_size=1)
  loss, _ = model.loss(params, tokens[None, :-1], tokens[None, 1:], model.initial_state(1))
  assert got["tokens"] == len(tokens) - 1
  np.testing.assert_allclose(got["loss_nats"], float(loss.mean()), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(float(loss.mean())), rtol=1e-5)
  np.testing.assert_allclose(got["bits_per_token"], float(loss.mean()) / np.log(2), rtol=1e-5)
  multi_row = training.evaluate(params, batching.eval_batches(tokens, batch_size=3, bptt=7),
                                model=model, batch_size=3)
  assert multi_row["tokens"] == len(tokens) - 1


def test_summarize_loss_rejects_zero_tokens():
  with pytest.raises(ValueError, match="zero tokens"):
    training.summarize_loss(0.0, 0.0)


@pytest.mark.parametrize("loss_nats, perplexity", [
    (1e6, float("inf")), (709.0, np.exp(709.0)), (float("inf"), float("inf")),
    (float("nan"), float("nan")), (2.0, np.exp(2.0))])
def test_summarize_loss_of_a_diverged_run_never_raises(loss_nats, perplexity):
  """e^loss past the float range (``--lr=1000``) is inf, not OverflowError; NaN stays NaN."""
  summary = training.summarize_loss(loss_nats * 10, 10)
  np.testing.assert_equal(summary["perplexity"], perplexity)
  np.testing.assert_equal(summary["loss_nats"], loss_nats)
  np.testing.assert_allclose(summary["bits_per_token"], loss_nats / np.log(2.0))


def test_skip_nonfinite_keeps_the_state_but_counts_the_step():
  model = _model()
  opt = optimizers.make_optimizer("adam", 1e-2)
  state = _state(model, opt)
  state = state.replace(rnn_state=jax.tree.map(lambda s: s + 0.5, state.rnn_state))
  bad = dict(_batch(1), inputs_BxT=_batch(1)["inputs_BxT"].at[0, 0].set(10**6))  # embeds NaN
  new, metrics = training.train_step(state, bad, model=model, optimizer=opt,
                                     skip_nonfinite=True)
  assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
  for field in ("params", "opt_state", "rng", "rnn_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(new, field), getattr(state, field))
  unguarded, m = training.train_step(state, bad, model=model, optimizer=opt)
  assert float(m["nonfinite"]) == 1.0
  assert not np.isfinite(np.asarray(unguarded.params["embed_VxE"])).all()
  good, m = training.train_step(state, _batch(1), model=model, optimizer=opt,
                                skip_nonfinite=True)
  assert float(m["nonfinite"]) == 0.0
  assert not np.array_equal(good.params["embed_VxE"], state.params["embed_VxE"])


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_steps_take_the_head_tables_as_arguments_so_programs_stay_small_at_1m_words():
  """hsm at V = 1M: its [V, D] tree tables (~50 MB) are arguments of the jitted train and
  eval steps, so their StableHLO stays far below 1 MB (closed over, the tables were embedded
  as constants). Params stay abstract: no 1M-row matrix is allocated."""
  vocab = 1_000_000
  head = heads.make_head("hsm", vocab_size=vocab, counts=np.ones(vocab, np.int64),
                         tree="balanced")
  model = language_model.make_language_model(vocab_size=vocab, embed_size=8, hidden_size=8,
                                             num_layers=1, cell="lstm", head=head)
  opt = optimizers.make_optimizer("adam", 1e-2)
  state = jax.eval_shape(lambda: training.create_train_state(model, opt, seed=0, batch_size=2))
  batch = {"inputs_BxT": jax.ShapeDtypeStruct((2, 3), jnp.int32),
           "targets_BxT": jax.ShapeDtypeStruct((2, 3), jnp.int32),
           "mask_BxT": jax.ShapeDtypeStruct((2, 3), jnp.bool_),
           "reset": jax.ShapeDtypeStruct((), jnp.bool_)}
  tables = _abstract(head.tables)
  train = jax.jit(functools.partial(training.train_step, model=model, optimizer=opt))
  evaluate = jax.jit(functools.partial(training.eval_step, model=model))
  for name, lowered in (("train", train.lower(state, batch, tables)),
                        ("eval", evaluate.lower(state.params, state.rnn_state, batch, tables))):
    assert len(lowered.as_text()) < 1_000_000, (name, len(lowered.as_text()))


def test_steps_with_tables_as_arguments_equal_the_closed_over_tables():
  head = heads.make_head("hsm", vocab_size=V, counts=np.arange(V) + 1)
  model = language_model.make_language_model(vocab_size=V, embed_size=6, hidden_size=8,
                                             num_layers=1, cell="elman", head=head)
  opt = optimizers.make_optimizer("sgd", 0.5)
  state, batch = _state(model, opt), _batch()
  train = jax.jit(functools.partial(training.train_step, model=model, optimizer=opt))
  evaluate = jax.jit(functools.partial(training.eval_step, model=model))
  with_tables, m_with = train(state, batch, head.tables)
  closed_over, m_closed = train(state, batch)
  jax.tree.map(np.testing.assert_array_equal, (with_tables, m_with), (closed_over, m_closed))
  jax.tree.map(np.testing.assert_array_equal,
               evaluate(state.params, state.rnn_state, batch, head.tables),
               evaluate(state.params, state.rnn_state, batch))
