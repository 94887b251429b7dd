"""Tests for lm_jax.heads.adaptive: PyTorch's AdaptiveLogSoftmaxWithLoss semantics, exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lm_jax import heads
from lm_jax.heads import adaptive

V, H, N = 11, 8, 9
CUTOFFS = [3, 6]  # shortlist {0, 1, 2}; clusters {3, 4, 5} and {6, ..., 10}


def _params(seed=0, *, head_bias=False, div_value=2.0):
  head = adaptive.adaptive_softmax(V, CUTOFFS, div_value=div_value, head_bias=head_bias)
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return head, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.7, s.shape), jnp.float32),
                            shapes)


def reference_log_probs(params, hidden_NxH, cutoffs, vocab_size):
  """PyTorch's AdaptiveLogSoftmaxWithLoss.log_prob, in float64 NumPy, loop by loop."""
  h = np.asarray(hidden_NxH, np.float64)
  head_logits = h @ np.asarray(params["head_weight_SxH"], np.float64).T
  if "head_bias_S" in params:
    head_logits = head_logits + np.asarray(params["head_bias_S"], np.float64)

  def log_softmax(z):
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

  head_logp = log_softmax(head_logits)
  bounds = list(cutoffs) + [vocab_size]
  out = np.zeros((h.shape[0], vocab_size))
  out[:, :bounds[0]] = head_logp[:, :bounds[0]]
  for i, tail in enumerate(params["tail"]):
    z = (h @ np.asarray(tail["proj_RxH"], np.float64).T) @ np.asarray(tail["weight_WxR"],
                                                                       np.float64).T
    out[:, bounds[i]:bounds[i + 1]] = log_softmax(z) + head_logp[:, bounds[0] + i][:, None]
  return out


@pytest.mark.parametrize("head_bias", [False, True])
def test_equals_the_explicit_two_level_formula_and_is_normalised(head_bias):
  head, params = _params(1, head_bias=head_bias)
  rng = np.random.default_rng(2)
  hidden_NxH = jnp.asarray(rng.normal(0, 1, (N, H)), jnp.float32)
  targets_N = jnp.asarray([0, 2, 3, 5, 6, 10, 7, 1, 4], jnp.int32)
  expected = reference_log_probs(params, hidden_NxH, CUTOFFS, V)
  logp_NxV = head.log_probs(params, hidden_NxH)
  np.testing.assert_allclose(logp_NxV, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_NxV, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, targets_N),
                             expected[np.arange(N), targets_N], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                             -expected[np.arange(N), targets_N], rtol=1e-5, atol=1e-5)


def test_projection_sizes_follow_pytorch():
  head = adaptive.adaptive_softmax(100, [10, 30, 60], div_value=4.0, head_bias=True)
  params = head.init(jax.random.PRNGKey(0), 64)
  assert params["head_weight_SxH"].shape == (13, 64) and params["head_bias_S"].shape == (13,)
  assert [t["proj_RxH"].shape for t in params["tail"]] == [(16, 64), (4, 64), (1, 64)]
  assert [t["weight_WxR"].shape for t in params["tail"]] == [(20, 16), (30, 4), (40, 1)]
  with pytest.raises(ValueError, match="projection sizes"):
    head.init(jax.random.PRNGKey(0), 32)  # 32 // 64 = 0 rows for the third cluster


@pytest.mark.parametrize("cutoffs", [[], [0, 3], [3, 3], [5, 2], [3, 11], [2.5]])
def test_bad_cutoffs_follow_pytorchs_rule(cutoffs):
  with pytest.raises(ValueError, match="cutoffs"):
    adaptive.adaptive_softmax(V, cutoffs)


def test_training_touches_only_the_clusters_its_targets_need():
  head, params = _params(3)
  hidden_NxH = jnp.asarray(np.random.default_rng(4).normal(size=(N, H)), jnp.float32)
  targets_N = jnp.asarray([0, 1, 2, 3, 4, 5, 3, 0, 1], jnp.int32)  # nothing in cluster 2
  grads = jax.grad(lambda p: head.loss(p, hidden_NxH, targets_N).sum())(params)
  assert float(jnp.abs(grads["tail"][1]["weight_WxR"]).sum()) == 0.0
  assert float(jnp.abs(grads["tail"][1]["proj_RxH"]).sum()) == 0.0
  assert float(jnp.abs(grads["tail"][0]["weight_WxR"]).sum()) > 0.0
  # The cluster's scan skips items past its tokens: few tokens, small items, same values.
  small = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, tokens_per_item=2)
  np.testing.assert_allclose(small.loss(params, hidden_NxH, targets_N),
                             head.loss(params, hidden_NxH, targets_N), rtol=1e-6)


def test_check_grads_and_agreement_with_autodiff_of_the_dense_formula():
  head, params = _params(5)
  hidden_NxH = jnp.asarray(np.random.default_rng(6).normal(size=(N, H)), jnp.float32)
  targets_N = jnp.asarray([0, 2, 3, 5, 6, 10, 7, 1, 4], jnp.int32)
  check_grads(lambda p, h: head.loss(p, h, targets_N), (params, hidden_NxH), order=1,
              modes=("rev",), atol=1e-2, rtol=1e-2)
  dense = lambda p, h: -head.log_probs(p, h)[jnp.arange(N), targets_N]
  got = jax.grad(lambda p, h: head.loss(p, h, targets_N).sum(), argnums=(0, 1))(params,
                                                                                hidden_NxH)
  want = jax.grad(lambda p, h: dense(p, h).sum(), argnums=(0, 1))(params, hidden_NxH)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_autodiff_backward_supports_jvp_and_equals_the_scan_backward():
  head, params = _params(5)
  autodiff = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, backward="autodiff")
  hidden_NxH = jnp.asarray(np.random.default_rng(7).normal(size=(N, H)), jnp.float32)
  targets_N = jnp.asarray([0, 2, 3, 5, 6, 10, 7, 1, 4], jnp.int32)
  check_grads(lambda p, h: autodiff.loss(p, h, targets_N), (params, hidden_NxH), order=1,
              modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
  with pytest.raises(TypeError, match="custom_vjp"):  # the default is reverse mode only
    jax.jvp(lambda h: head.loss(params, h, targets_N), (hidden_NxH,), (hidden_NxH,))
  total = lambda h_: lambda p, h: h_.loss(p, h, targets_N).sum()
  got = jax.grad(total(head), argnums=(0, 1))(params, hidden_NxH)
  want = jax.grad(total(autodiff), argnums=(0, 1))(params, hidden_NxH)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  with pytest.raises(ValueError, match="backward='bogus'"):
    adaptive.adaptive_softmax(V, CUTOFFS, backward="bogus")


@pytest.mark.parametrize("weighting", ["sum", "masked_mean", "per_token", "one_token"])
def test_both_backward_branches_equal_the_float64_gradient(weighting):
  """The backward scales the forward's unit gradients when the cotangent is one number on a
  cluster's tokens (sum, masked mean) and rescans otherwise (per-token weights); both are
  the gradient of the explicit float64 formula."""
  with jax.enable_x64(True):
    _, params = _params(8)
    head = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, tokens_per_item=2)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    hidden_NxH = jnp.asarray(np.random.default_rng(9).normal(size=(N, H)), jnp.float64)
    targets_N = jnp.asarray([0, 2, 3, 5, 6, 10, 7, 1, 4], jnp.int32)
    where_N = jnp.ones(N, bool)
    weights_N = jnp.ones(N, jnp.float64)
    if weighting == "masked_mean":
      where_N = jnp.asarray([1, 1, 0, 1, 1, 0, 1, 1, 1], bool)
      weights_N = where_N / where_N.sum()
    elif weighting == "per_token":
      weights_N = jnp.asarray(np.random.default_rng(10).uniform(0.1, 2.0, N))
    elif weighting == "one_token":
      weights_N = jnp.zeros(N, jnp.float64).at[4].set(1.0)
    got = jax.grad(lambda p, h: jnp.sum(weights_N * head.loss(p, h, targets_N, where=where_N)),
                   argnums=(0, 1))(params, hidden_NxH)
    dense = lambda p, h: -head.log_probs(p, h)[jnp.arange(N), targets_N]
    want = jax.grad(lambda p, h: jnp.sum(jnp.where(where_N, weights_N * dense(p, h), 0.0)),
                    argnums=(0, 1))(params, hidden_NxH)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got,
                 want)


def test_counts_map_ids_to_frequency_ranks():
  rng = np.random.default_rng(7)
  counts_V = rng.permutation(np.arange(1, V + 1) * 10)
  ranked = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0)
  by_counts = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, counts=counts_V)
  _, params = _params(8)
  hidden_NxH = jnp.asarray(rng.normal(size=(N, H)), jnp.float32)
  rank_of_id = np.argsort(np.argsort(-counts_V, kind="stable"), kind="stable")
  np.testing.assert_allclose(by_counts.log_probs(params, hidden_NxH),
                             ranked.log_probs(params, hidden_NxH)[:, rank_of_id], rtol=1e-6)
  ids_N = jnp.arange(N, dtype=jnp.int32)
  np.testing.assert_allclose(by_counts.loss(params, hidden_NxH, ids_N),
                             ranked.loss(params, hidden_NxH, jnp.asarray(rank_of_id[:N])),
                             rtol=1e-6)


def test_make_head_and_default_cutoffs():
  counts_V = np.array([50, 20, 10, 5, 5, 3, 2, 2, 1, 1, 1])
  assert heads.default_cutoffs(counts_V) == [3]  # 80% of the mass in 3 words; 3 x 4 > V - 1
  zipf_V = 1.0 / np.arange(1, 10_001)
  cutoffs = heads.default_cutoffs(zipf_V)
  cover = np.cumsum(zipf_V) / zipf_V.sum()
  assert cover[cutoffs[0] - 1] >= 0.8 > cover[cutoffs[0] - 2]  # the fewest words for 80%
  assert cutoffs == [cutoffs[0] * 4 ** i for i in range(len(cutoffs))] and cutoffs[-1] < 10_000
  head = heads.make_head("adaptive", vocab_size=V, counts=counts_V, cutoffs="3,6", div_value=2.0)
  params = head.init(jax.random.PRNGKey(0), H)
  assert len(params["tail"]) == 2
  with pytest.raises(ValueError, match="comma-separated ints"):
    heads.make_head("adaptive", vocab_size=V, counts=counts_V, cutoffs="3;6")


@pytest.mark.parametrize("hidden_size", [16, 17, 64, 256, 1024])
def test_default_cutoffs_are_valid_for_every_hidden_size_from_16(hidden_size):
  """At V = 100k the default list has 5 clusters (projections [64, 16, 4, 1, 0] at H = 256,
  which PyTorch's rule refuses); make_head keeps the leading clusters with >= 8 rows (at
  least one), the last kept cluster running to V, and the head is a normalised model."""
  vocab_size = 100_000
  counts_V = np.random.default_rng(0).permutation(1e6 / np.arange(1, vocab_size + 1) ** 1.2)
  assert len(heads.default_cutoffs(counts_V)) == 5
  head = heads.make_head("adaptive", vocab_size=vocab_size, counts=counts_V)
  shapes = jax.eval_shape(lambda k: head.init(k, hidden_size), jax.random.PRNGKey(0))
  rows = [tail["proj_RxH"].shape[0] for tail in shapes["tail"]]
  wide = [hidden_size // 4 ** (i + 1) for i in range(5) if hidden_size // 4 ** (i + 1) >= 8]
  assert rows == (wide or [hidden_size // 4]), rows
  assert sum(tail["weight_WxR"].shape[0] for tail in shapes["tail"]) + (
      shapes["head_weight_SxH"].shape[0] - len(rows)) == vocab_size
  if hidden_size == 16:  # one cheap exact check: the vocabulary's probabilities sum to 1
    params = head.init(jax.random.PRNGKey(0), hidden_size)
    hidden_NxH = jax.random.normal(jax.random.PRNGKey(1), (2, hidden_size))
    np.testing.assert_allclose(jnp.exp(head.log_probs(params, hidden_NxH)).sum(-1), 1.0,
                               rtol=1e-4)
    targets_N = jnp.array([int(np.argmin(counts_V)), int(np.argmax(counts_V))])
    np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                               -head.log_probs(params, hidden_NxH)[jnp.arange(2), targets_N],
                               rtol=1e-4)


def test_params_from_torch_layout_is_the_documented_one():
  """A state_dict with PyTorch's keys and shapes (NumPy here) maps to the same distribution."""
  rng = np.random.default_rng(9)
  sizes = adaptive.projection_sizes(H, 2, 2.0)
  bounds = CUTOFFS + [V]
  state_dict = {"head.weight": rng.normal(size=(CUTOFFS[0] + 2, H)),
                "head.bias": rng.normal(size=(CUTOFFS[0] + 2,))}
  for i, r in enumerate(sizes):
    state_dict[f"tail.{i}.0.weight"] = rng.normal(size=(r, H))
    state_dict[f"tail.{i}.1.weight"] = rng.normal(size=(bounds[i + 1] - bounds[i], r))
  params = heads.params_from_torch(state_dict)
  head = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, head_bias=True)
  assert jax.tree.structure(params) == jax.tree.structure(head.init(jax.random.PRNGKey(0), H))
  hidden_NxH = rng.normal(size=(N, H)).astype(np.float32)
  np.testing.assert_allclose(head.log_probs(params, hidden_NxH),
                             reference_log_probs(params, hidden_NxH, CUTOFFS, V), rtol=1e-4,
                             atol=1e-4)


def test_matches_pytorch_when_installed():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  module = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, CUTOFFS, div_value=2.0, head_bias=True)
  params = heads.params_from_torch(module.state_dict())
  head = adaptive.adaptive_softmax(V, CUTOFFS, div_value=2.0, head_bias=True)
  hidden = torch.randn(N, H)
  targets = torch.tensor([0, 2, 3, 5, 6, 10, 7, 1, 4])
  with torch.no_grad():
    output, loss = module(hidden, targets)
    expected = module.log_prob(hidden).numpy()
  hidden_NxH = jnp.asarray(hidden.numpy())
  np.testing.assert_allclose(head.log_probs(params, hidden_NxH), expected, rtol=1e-5, atol=1e-5)
  logp_N = head.log_prob(params, hidden_NxH, jnp.asarray(targets.numpy()))
  np.testing.assert_allclose(logp_N, output.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(-logp_N.mean(), float(loss), rtol=1e-5)


def test_bench_adaptive_torch_script_smoke(tmp_path):
  """experiments/bench_adaptive_torch.py at a small size: both sides agree, the table's
  ratio is the ratio of its per-token times."""
  pytest.importorskip("torch")
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_adaptive_torch.py"),
                  "--vocab_size=500", "--hidden=32", "--tokens=64", "--cutoffs=20,100",
                  "--repeats=2", f"--json_out={out}"],
                 check=True, env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                 timeout=600)
  payload = json.loads(out.read_text())
  rows = {r["impl"]: r for r in payload["rows"]}
  assert set(rows) == {"lm_jax", "torch"}
  np.testing.assert_allclose(payload["loss"]["lm_jax"], payload["loss"]["torch"], rtol=1e-4)
  np.testing.assert_allclose(rows["lm_jax"]["speedup_vs_torch"],
                             rows["torch"]["us_per_token"] / rows["lm_jax"]["us_per_token"])
  assert rows["torch"]["speedup_vs_torch"] == 1.0
