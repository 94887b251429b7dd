"""Tests for lm_jax.maxent.loglinear: feature forms, probabilities, MaxEnt gradients and fitting."""
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from lm_jax.maxent import loglinear as ll


def _context_problem(seed, n=7, k=3, f=5, y=4, pad=True):
  """Random ContextFeatures (with padding and values) and their dense equivalent."""
  rng = np.random.default_rng(seed)
  ctx = rng.integers(0, f, (n, k)).astype(np.int32)
  if pad:
    ctx[rng.random((n, k)) < 0.25] = -1
  vals = rng.normal(size=(n, k)).astype(np.float32)
  dense = np.zeros((n, y, f * y), np.float32)  # feature (c, y') flattened to c * Y + y'
  for i in range(n):
    for j in range(k):
      if ctx[i, j] >= 0:
        for c in range(y):
          dense[i, c, ctx[i, j] * y + c] += vals[i, j]
  labels = rng.integers(0, y, n).astype(np.int32)
  return (ll.ContextFeatures(jnp.asarray(ctx), f, y, jnp.asarray(vals)),
          ll.DenseFeatures(jnp.asarray(dense)), jnp.asarray(labels))


def _sparse_problem(seed, n=6, y=3, k=4, f=7, with_values=True):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, f, (n, y, k)).astype(np.int32)
  idx[rng.random((n, y, k)) < 0.25] = -1
  vals = rng.normal(size=(n, y, k)).astype(np.float32) if with_values else np.ones((n, y, k),
                                                                                   np.float32)
  dense = np.zeros((n, y, f), np.float32)
  for a, b, c in zip(*np.nonzero(idx >= 0)):
    dense[a, b, idx[a, b, c]] += vals[a, b, c]  # repeated ids add up
  sparse = ll.SparseFeatures(jnp.asarray(idx), f, jnp.asarray(vals) if with_values else None)
  return sparse, ll.DenseFeatures(jnp.asarray(dense)), jnp.asarray(rng.integers(0, y, n))


def _weights(feats, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=ll.weights_shape(feats)),
                     jnp.float32)


def test_expected_values_on_tiny_arrays():
  # Two examples, three candidates, two binary features (hand-computed).
  dense = ll.DenseFeatures(jnp.array([[[1., 0.], [0., 1.], [1., 1.]],
                                      [[0., 0.], [1., 0.], [0., 1.]]]))
  w = jnp.array([0.5, -0.5])
  np.testing.assert_allclose(ll.scores(w, dense), [[0.5, -0.5, 0.0], [0.0, 0.5, -0.5]])
  lse = np.log(np.exp(0.5) + np.exp(-0.5) + 1.0)
  np.testing.assert_allclose(ll.nll(w, dense, jnp.array([0, 2])), [lse - 0.5, lse + 0.5],
                             rtol=1e-6)
  np.testing.assert_allclose(ll.empirical_features(dense, jnp.array([0, 2])), [1.0, 1.0])
  p = np.exp([0.5, -0.5, 0.0]) / np.exp(lse)
  # Row 2's scores are row 1's permuted: its probabilities are (p2, p0, p1).
  expected = [(p[0] + p[2]) + p[0], (p[1] + p[2]) + p[1]]
  np.testing.assert_allclose(ll.expected_features(w, dense), expected, rtol=1e-6)
  # The conjunctive form: scores are sums of W's rows; padding (-1) adds nothing.
  w_fxy = jnp.arange(6.0).reshape(3, 2)
  ctx = ll.ContextFeatures(jnp.array([[0, 2], [1, -1]]), num_features=3, num_labels=2)
  np.testing.assert_allclose(ll.scores(w_fxy, ctx), [[4.0, 6.0], [2.0, 3.0]])
  np.testing.assert_allclose(ll.empirical_features(ctx, jnp.array([1, 0])),
                             [[0, 1], [1, 0], [0, 1]])


@pytest.mark.parametrize("seed", [0, 1])
def test_every_form_agrees_with_the_dense_form(seed):
  @jax.jit
  def everything(w, feats, labels, where):
    return (ll.scores(w, feats), ll.nll(w, feats, labels, where),
            ll.empirical_features(feats, labels, where).reshape(-1),
            ll.expected_features(w, feats, where).reshape(-1))

  for feats, dense, labels in (_context_problem(seed), _sparse_problem(seed),
                               _sparse_problem(seed, with_values=False)):
    w = _weights(feats, seed)
    where = jnp.asarray(np.random.default_rng(seed).integers(0, 3, labels.shape[0]), jnp.float32)
    for got, want in zip(everything(w, feats, labels, where),
                         everything(w.reshape(-1), dense, labels, where)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nll_matches_numpy_float64_reference():
  _, dense, labels = _context_problem(3)
  w = _weights(dense, 3)
  s = np.einsum("nyf,f->ny", np.float64(dense.features_NxYxF), np.float64(w))
  ref = np.log(np.exp(s).sum(1)) - s[np.arange(len(labels)), labels]
  np.testing.assert_allclose(ll.nll(w, dense, labels), ref, rtol=1e-5)
  lp = ll.log_probs(w, dense)
  np.testing.assert_allclose(lp, s - np.log(np.exp(s).sum(1, keepdims=True)), rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 30.0))
def test_log_probs_are_normalised_and_gradient_is_expected_minus_empirical(seed, scale):
  feats, _, labels = _context_problem(seed)
  w = scale * _weights(feats, seed + 1)
  np.testing.assert_allclose(jax.nn.logsumexp(ll.log_probs(w, feats), axis=-1), 0.0, atol=1e-5)
  where = jnp.asarray(np.random.default_rng(seed).integers(0, 3, labels.shape[0]), jnp.float32)
  grad = jax.grad(lambda w: ll.nll(w, feats, labels, where).sum())(w)
  maxent = ll.expected_features(w, feats, where) - ll.empirical_features(feats, labels, where)
  np.testing.assert_allclose(grad, maxent, rtol=1e-4, atol=1e-4 * (1 + scale))


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**16), shift=st.floats(-50.0, 50.0))
def test_adding_a_constant_to_a_context_row_leaves_probabilities_unchanged(seed, shift):
  # Softmax shift invariance in the conjunctive form: W[f, :] + c changes every score of the
  # examples with feature f by the same amount, so no probability changes.
  feats, _, _ = _context_problem(seed, pad=False)
  w = _weights(feats, seed)
  shifted = w.at[seed % feats.num_features].add(shift)
  np.testing.assert_allclose(ll.log_probs(shifted, feats), ll.log_probs(w, feats), atol=2e-4)


def test_check_grads():
  with jax.enable_x64(True):
    feats, _, labels = _context_problem(4)
    w = jnp.asarray(np.random.default_rng(5).normal(size=ll.weights_shape(feats)))
    # nll uses losses' custom_vjp, which has no forward mode; log_probs has both.
    check_grads(jax.jit(lambda w: ll.nll(w, feats, labels)), (w,), order=2, modes=("rev",))
    check_grads(jax.jit(lambda w: ll.expected_features(w, feats).sum()), (w,), order=1,
                modes=("rev",))
    sparse, _, _ = _sparse_problem(4)
    w = jnp.asarray(np.random.default_rng(5).normal(size=ll.weights_shape(sparse)))
    check_grads(jax.jit(lambda w: ll.log_probs(w, sparse)), (w,), order=1, modes=("fwd", "rev"))


def test_masks_weights_and_padding_labels():
  feats, _, labels = _context_problem(5)
  w = _weights(feats, 5)
  n = labels.shape[0]
  mask = jnp.arange(n) % 2 == 0
  bad_labels = jnp.where(mask, labels, -7)  # garbage where masked must be ignored
  out = ll.nll(w, feats, bad_labels, mask)
  np.testing.assert_array_equal(np.asarray(out)[~np.asarray(mask)], 0.0)
  np.testing.assert_allclose(out[mask], ll.nll(w, feats, labels)[mask])
  assert np.all(np.isfinite(jax.grad(lambda w: ll.nll(w, feats, bad_labels, mask).sum())(w)))
  none = jnp.zeros(n, bool)
  np.testing.assert_array_equal(ll.nll(w, feats, labels, none), 0.0)
  np.testing.assert_array_equal(ll.empirical_features(feats, bad_labels, none), 0.0)
  np.testing.assert_array_equal(ll.expected_features(w, feats, none), 0.0)
  # An integer weight is a multiplicity: weight 2 equals the example written twice.
  counts = jnp.array([2, 1, 0, 1, 3, 1, 1])
  rep = np.repeat(np.arange(n), np.asarray(counts))
  dup = ll.ContextFeatures(feats.context_NxK[rep], feats.num_features, feats.num_labels,
                           feats.values_NxK[rep])
  np.testing.assert_allclose(ll.nll(w, feats, labels, counts).sum(),
                             ll.nll(w, dup, labels[rep]).sum(), rtol=1e-5)
  np.testing.assert_allclose(ll.expected_features(w, feats, counts),
                             ll.expected_features(w, dup), rtol=1e-5, atol=1e-6)


def test_jit_vmap_and_low_precision():
  feats, _, labels = _context_problem(6)
  w = _weights(feats, 6)
  np.testing.assert_allclose(jax.jit(ll.nll)(w, feats, labels), ll.nll(w, feats, labels),
                             rtol=1e-6)
  ws = jnp.stack([w, 2 * w, -w])
  batched = jax.vmap(ll.log_probs, in_axes=(0, None))(ws, feats)
  np.testing.assert_allclose(batched[1], ll.log_probs(2 * w, feats), rtol=1e-6)
  lp = ll.log_probs(w.astype(jnp.bfloat16), feats)
  assert lp.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(lp, axis=-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_fit_satisfies_maxent_constraints(l2):
  # At the optimum: empirical - expected feature counts = l2 * w (zero without L2), to 1e-5.
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    phi = rng.normal(size=(60, 4, 3))
    feats = ll.DenseFeatures(jnp.asarray(phi))
    true_w = np.array([1.0, -0.5, 0.25])
    s = phi @ true_w
    p = np.exp(s - s.max(1, keepdims=True))
    labels = jnp.asarray([rng.choice(4, p=q / q.sum()) for q in p])
    w, info = ll.fit(feats, labels, l2=l2, tol=1e-10, num_steps=200, w0=jnp.zeros(3))
    assert w.dtype == jnp.float64 and bool(info.converged), info
    residual = ll.constraint_residual(w, feats, labels, l2=l2)
    np.testing.assert_allclose(residual, 0.0, atol=1e-5)
    # And the optimum is a minimum of the objective: any perturbation is worse.
    obj = lambda v: ll.nll(v, feats, labels).sum() + 0.5 * l2 * jnp.sum(v * v)
    for d in np.eye(3):
      assert obj(w) < obj(w + 1e-3 * d) and obj(w) < obj(w - 1e-3 * d)
    np.testing.assert_allclose(info.objective, obj(w) / 60, rtol=1e-12)


def test_fit_with_another_optax_optimizer_and_callback():
  feats, _, labels = _sparse_problem(9, n=30)
  calls = []
  adam, record = optax.adam(0.05), lambda *a: calls.append(a)
  w_adam, info = ll.fit(feats, labels, l2=1.0, optimizer=adam, num_steps=1000, tol=1e-4,
                        callback=record, callback_every=50)
  assert bool(info.converged) and len(calls) == int(info.num_steps) // 50 > 0, (info, len(calls))
  assert float(info.grad_norm) < 1e-4 and calls[-1][0] == 50 * len(calls)
  # The normalised gradient is residual / N: Adam's optimum meets the constraints to N * tol.
  residual = ll.constraint_residual(w_adam, feats, labels, l2=1.0)
  assert 0 < float(jnp.abs(residual).max()) < 30 * 1e-4
  w0 = _weights(feats, 9)
  w_same, info0 = ll.fit(feats, labels, l2=1.0, num_steps=0, w0=w0, optimizer=adam,
                         callback=record, callback_every=50)  # the same compiled loop
  np.testing.assert_array_equal(w_same, w0)
  assert int(info0.num_steps) == 0 and not bool(info0.converged)


def test_bad_inputs_raise_clear_errors():
  feats, dense, labels = _context_problem(10)
  w = _weights(feats, 10)
  with pytest.raises(ValueError, match=r"w has shape \(3,\); .* need \(5, 4\)"):
    ll.scores(jnp.zeros(3), feats)
  with pytest.raises(ValueError, match="w must be floating"):
    ll.scores(jnp.zeros((5, 4), jnp.int32), feats)
  with pytest.raises(ValueError, match=r"features_NxYxF must have rank 3, got shape \(2, 3\)"):
    ll.scores(jnp.zeros(3), ll.DenseFeatures(jnp.zeros((2, 3))))
  with pytest.raises(ValueError, match="context_NxK must be integer"):
    ll.scores(w, ll.ContextFeatures(jnp.zeros((2, 3)), 5, 4))
  with pytest.raises(ValueError, match=r"indices_NxYxK must have rank 3, got shape \(2,\)"):
    ll.scores(jnp.zeros(5), ll.SparseFeatures(jnp.zeros(2, jnp.int32), 5))
  with pytest.raises(ValueError, match=r"values shape \(7, 2\) must equal context_NxK shape"):
    ll.scores(w, ll.ContextFeatures(feats.context_NxK, 5, 4, jnp.zeros((7, 2))))
  with pytest.raises(ValueError, match="context_NxK has id 4 >= num_features=4"):
    ll.scores(jnp.zeros((4, 4)), ll.ContextFeatures(feats.context_NxK, 4, 4))
  with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
    ll.weights_shape(ll.SparseFeatures(jnp.zeros((1, 2, 3), jnp.int32), 0))
  with pytest.raises(ValueError, match=r"labels_N must have shape \(7,\), got \(6,\)"):
    ll.nll(w, feats, labels[:6])
  with pytest.raises(ValueError, match="labels_N must be integer"):
    ll.empirical_features(feats, labels.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\); got 4"):
    ll.nll(w, feats, labels.at[2].set(4))
  with pytest.raises(ValueError, match=r"where must have shape \(7,\)"):
    ll.expected_features(w, feats, jnp.ones(3, bool))
  with pytest.raises(ValueError, match="l2 must be >= 0, got -1"):
    ll.fit(feats, labels, l2=-1.0)
  with pytest.raises(ValueError, match="unknown feature container dict"):
    ll.scores(w, {"context_NxK": feats.context_NxK})


def test_diagonal_preconditioner_and_the_constraints_for_context_features():
  ctx = ll.ContextFeatures(jnp.array([[0, 1], [0, 2], [0, 1], [0, -1]]), 4, 3)
  counts = jnp.array([1.0, 2.0, 0.0, 5.0])
  scale = ll.diagonal_preconditioner(ctx, counts, l2=0.5)
  # Feature f fires N_f = (8, 1, 2, 0) times; the uniform model's E[phi^2] is N_f / Y.
  np.testing.assert_allclose(scale[:, 0], 1 / np.sqrt(np.array([8, 1, 2, 0]) / 3 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(ll.diagonal_preconditioner(ctx)[3], 1.0)  # nothing to count
  with jax.enable_x64(True):  # the conjunctive form, merged examples (weights), L2
    feats, _, labels = _context_problem(11, n=40, f=6, y=3)
    counts = jnp.asarray(np.random.default_rng(8).integers(0, 4, 40))
    w, info = ll.fit(feats, labels, l2=1.0, where=counts, tol=1e-10,
                     w0=jnp.zeros(ll.weights_shape(feats)),
                     preconditioner=ll.diagonal_preconditioner(feats, counts, l2=1.0))
    assert bool(info.converged) and int(info.num_steps) > 5
    np.testing.assert_allclose(ll.constraint_residual(w, feats, labels, l2=1.0, where=counts),
                               0.0, atol=1e-5)
  with pytest.raises(ValueError, match=r"preconditioner shape \(2,\) does not broadcast"):
    ll.fit(feats, labels, preconditioner=jnp.ones(2))


def test_experiment_script_smoke(tmp_path):
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  rng = np.random.default_rng(0)
  words = ["abc", "bad", "cab", "dead", "a"]
  text = " ".join(rng.choice(words, 800)) + "zz"  # 'z' only in validation
  (tmp_path / "tiny.txt").write_text(text)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "maxent_char_lm.py"),
       f"--data={tmp_path / 'tiny.txt'}", "--max_order=3", "--num_buckets=4096", "--steps=5",
       f"--json_out={out}"], capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert "bits/char validation" in proc.stdout and results["lbfgs_steps"] == 5
  assert "2 unseen in validation" in proc.stdout
  assert results["vocab"] == 7  # 'abcde ' + <unk>
  assert results["valid_bits_per_char"] < results["baseline_valid_bits_per_char"]["unigram_add1"]
