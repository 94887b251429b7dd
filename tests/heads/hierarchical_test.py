"""Tests for lm_jax.heads.trees and lm_jax.heads.hierarchical: tree builders and the vectorised walk."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax.heads import hierarchical
from lm_jax.heads import trees

N, H = 6, 3
COUNTS = np.array([40, 3, 25, 0, 9, 9, 1, 14, 2, 6, 0, 5])  # V = 12, ids not sorted by count
V = COUNTS.shape[0]
TREES = {
    "huffman": lambda: trees.huffman_tree(COUNTS),
    "balanced": lambda: trees.balanced_tree(V),
    "class_huffman": lambda: trees.class_tree(COUNTS, 4),
    "class_balanced": lambda: trees.class_tree(COUNTS, 3, binning="sqrt", within="balanced"),
}


def _setup(kind="huffman", seed=0, dtype=jnp.float32):
  tree = TREES[kind]()
  head = hierarchical.hierarchical_softmax(tree)
  rng = np.random.default_rng(seed)
  params = {"node_weight_IxH": jnp.asarray(rng.uniform(-1, 1, (V - 1, H)), dtype),
            "node_bias_I": jnp.asarray(rng.uniform(-1, 1, (V - 1,)), dtype)}
  hidden_NxH = jnp.asarray(rng.normal(0.0, 1.5, (N, H)), dtype)
  targets_N = jnp.asarray(rng.integers(0, V, (N,)), jnp.int32)
  return tree, head, params, hidden_NxH, targets_N


def _codes(tree):
  return ["".join("0" if s > 0 else "1" for s in tree.signs_VxD[w, :tree.depth_V[w]])
          for w in range(len(tree.depth_V))]


def _check_tree(tree, vocab_size):
  assert tree.num_inner == vocab_size - 1 and tree.children_Ix2.shape == (vocab_size - 1, 2)
  np.testing.assert_array_equal(tree.mask_VxD.sum(1), tree.depth_V)  # depth = code length
  assert np.all(tree.signs_VxD[~tree.mask_VxD] == 0) and np.all(tree.nodes_VxD[:, 0] == 0)
  codes = _codes(tree)
  assert len(set(codes)) == vocab_size
  for a in codes:  # Prefix-free.
    assert not any(b != a and b.startswith(a) for b in codes)
  # Every leaf appears once among the children, every inner node but the root once.
  children = np.sort(tree.children_Ix2.reshape(-1))
  np.testing.assert_array_equal(children, np.r_[~np.arange(vocab_size)[::-1], 1:vocab_size - 1])


def _entropy_bits(counts):
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


@settings(deadline=None, max_examples=50)
@given(counts=hnp.arrays(np.int64, st.integers(2, 40), elements=st.integers(0, 10**5)))
def test_huffman_codes_optimal_and_no_worse_than_balanced(counts):
  counts = counts + (counts.sum() == 0)  # At least one nonzero count for the entropy.
  huffman = trees.huffman_tree(counts)
  _check_tree(huffman, len(counts))
  more_frequent = counts[:, None] > counts[None, :]
  assert not np.any(more_frequent & (huffman.depth_V[:, None] > huffman.depth_V[None, :]))
  expected = trees.expected_depth(huffman, counts)
  entropy = _entropy_bits(counts)
  assert entropy - 1e-9 <= expected
  if np.count_nonzero(counts) >= 2:  # Within one bit of the entropy (Shannon / Huffman bound).
    assert expected < entropy + 1
  else:  # A single word holds all the mass: entropy 0, and a binary tree needs depth 1.
    assert expected == 1.0
  assert expected <= trees.expected_depth(trees.balanced_tree(len(counts)), counts) + 1e-12


@pytest.mark.parametrize("vocab_size", [2, 3, 5, 8, 12, 100])
def test_balanced_depths(vocab_size):
  tree = trees.balanced_tree(vocab_size)
  _check_tree(tree, vocab_size)
  assert tree.depth_V.max() == int(np.ceil(np.log2(vocab_size)))
  assert tree.depth_V.min() == int(np.floor(np.log2(vocab_size)))


def test_handmade_huffman_and_class_tree():
  assert trees.huffman_tree([5, 1, 1, 3]).depth_V.tolist() == [1, 3, 3, 2]
  tree = trees.class_tree([8, 4, 2, 1, 1], 2, within="balanced")  # classes {0}, {1, 2, 3, 4}
  assert tree.depth_V.tolist() == [1, 3, 3, 3, 3]
  for kind in ("class_huffman", "class_balanced"):
    _check_tree(TREES[kind](), V)


def _walk_probabilities(tree, params, hidden_H):
  """Explicit float64 walk: recurse from the root along children, multiplying sigmoids."""
  w = np.asarray(params["node_weight_IxH"], np.float64)
  b = np.asarray(params["node_bias_I"], np.float64)
  h = np.asarray(hidden_H, np.float64)
  probs = np.zeros(V)
  stack = [(0, 1.0)]
  while stack:
    node, prob = stack.pop()
    p_first = 1.0 / (1.0 + np.exp(-(w[node] @ h + b[node])))
    for child, p in zip(tree.children_Ix2[node], (p_first, 1.0 - p_first)):
      if child < 0:
        probs[~child] = prob * p
      else:
        stack.append((child, prob * p))
  return probs


@pytest.mark.parametrize("kind", list(TREES))
def test_walk_equals_product_of_sigmoids_and_is_normalised(kind):
  tree, head, params, hidden_NxH, targets_N = _setup(kind)
  logp_NxV = head.log_probs(params, hidden_NxH)
  expected = np.stack([_walk_probabilities(tree, params, h) for h in hidden_NxH])
  np.testing.assert_allclose(np.exp(logp_NxV), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_NxV, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, targets_N),
                             logp_NxV[jnp.arange(N), targets_N], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                             -np.log(expected[np.arange(N), np.asarray(targets_N)]), rtol=1e-5)


def test_check_grads_of_loss():
  # head.loss is path_nll (custom_vjp: reverse mode only); sparse.loss is the plain walk.
  with jax.enable_x64(True):
    _, head, params, hidden_NxH, targets_N = _setup("class_balanced", dtype=jnp.float64)
    where_N = jnp.array([True, True, False, True, True, True])
    check_grads(lambda p, h: head.loss(p, h, targets_N, where=where_N), (params, hidden_NxH),
                order=1, modes=("rev",))
    rows, _, aux = head.sparse.gather(params, targets_N)
    check_grads(lambda r, h: head.sparse.loss(r, h, aux, where=where_N), (rows, hidden_NxH),
                order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("chunk_size", [1, 4, 6, None, 50])
def test_path_nll_equals_autodiff_of_the_plain_walk(chunk_size):
  # Values and all three gradients agree with autodiff of the unchunked walk (float64), also
  # when the chunk does not divide N (4: padded tokens) and with a cotangent that is not 1.
  with jax.enable_x64(True):
    tree, _, params, hidden_NxH, targets_N = _setup("huffman", seed=3, dtype=jnp.float64)
    nodes, signs, mask = (jnp.asarray(a)[targets_N]
                          for a in (tree.nodes_VxD, tree.signs_VxD, tree.mask_VxD))
    weight_N = jnp.linspace(0.5, 2.0, N)

    def plain(w, b, h):
      scores = jnp.einsum("ndh,nh->nd", w[nodes], h) + b[nodes]
      return -jnp.sum(jnp.where(mask, jax.nn.log_sigmoid(signs * scores), 0.0), -1)

    def chunked(w, b, h):
      return hierarchical.path_nll(w, b, h, nodes, signs, mask, chunk_size=chunk_size)

    args = (params["node_weight_IxH"], params["node_bias_I"], hidden_NxH)
    np.testing.assert_allclose(chunked(*args), plain(*args), rtol=1e-12)
    want = jax.grad(lambda *a: jnp.sum(weight_N * plain(*a)), argnums=(0, 1, 2))(*args)
    got = jax.grad(lambda *a: jnp.sum(weight_N * chunked(*a)), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    check_grads(chunked, args, order=1, modes=("rev",))


@pytest.mark.parametrize("kind", sorted(TREES))
def test_chunked_and_autodiff_backwards_agree(kind):
  tree, _, params, hidden_NxH, targets_N = _setup(kind, seed=5)
  where_N = jnp.array([True, False, True, True, True, True])
  results = []
  for backward, chunk_size in (("chunked", None), ("chunked", 4), ("autodiff", None)):
    head = hierarchical.hierarchical_softmax(tree, backward=backward, chunk_size=chunk_size)
    f = lambda p, h: jnp.sum(head.loss(p, h, targets_N, where=where_N))
    results.append((head.loss(params, hidden_NxH, targets_N, where=where_N),
                    jax.grad(f, argnums=(0, 1))(params, hidden_NxH)))
  for got in results[1:]:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(results[0])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_backward_options():
  tree = TREES["huffman"]()
  with pytest.raises(ValueError, match="backward must be one of"):
    hierarchical.hierarchical_softmax(tree, backward="manual")
  with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
    hierarchical.hierarchical_softmax(tree, chunk_size=0)


def test_path_nll_is_reverse_mode_only():
  tree, _, params, hidden_NxH, targets_N = _setup()
  f = lambda h: hierarchical.path_nll(params["node_weight_IxH"], params["node_bias_I"], h,
                                      tree.nodes_VxD[targets_N], tree.signs_VxD[targets_N],
                                      tree.mask_VxD[targets_N])
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f, (hidden_NxH,), (hidden_NxH,))


def test_init_shapes():
  _, head, _, _, _ = _setup()
  params = head.init(jax.random.PRNGKey(0), H)
  assert params["node_weight_IxH"].shape == (V - 1, H) and params["node_bias_I"].shape == (V - 1,)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"1-D \[V\], got shape \(2, 2\)"):
    trees.huffman_tree(np.ones((2, 2)))
  with pytest.raises(ValueError, match="finite and >= 0, got -3"):
    trees.class_tree([4, -3, 1])
  with pytest.raises(ValueError, match="V >= 2 words, got V = 1"):
    trees.huffman_tree([5])
  with pytest.raises(ValueError, match="V >= 2 words, got vocab_size = 1"):
    trees.balanced_tree(1)
  with pytest.raises(ValueError, match="within must be 'huffman' or 'balanced', got 'flat'"):
    trees.class_tree(COUNTS, within="flat")
  with pytest.raises(ValueError, match="tree must be a lm_jax.heads.trees.Tree, got list"):
    hierarchical.hierarchical_softmax([0, 1])
