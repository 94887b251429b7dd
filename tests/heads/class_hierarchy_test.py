"""Tests for lm_jax.heads.class_hierarchy: the multi-level class softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax import heads
from lm_jax.heads import class_hierarchy


def _params(head, hidden_size, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: head.init(k, hidden_size), jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1.0, 1.0, s.shape), dtype), shapes)


def _explicit_tree(counts, levels, branching):
  """The hierarchy as explicit nodes, built independently of the head's index arithmetic:
  the words in decreasing count (ties by id) are cut top-down into consecutive chunks of
  ``branching ** (levels - d)`` words at depth ``d + 1`` (so each node has at most
  ``branching`` children), ``levels`` class levels; ``depth_nodes[d]`` lists the nodes
  at depth ``d + 1`` left to right (the order of level ``d``'s rows), each node the tuple of
  its words, and ``parent[d][i]`` is node ``i``'s parent index at depth ``d``."""
  ranked = tuple(sorted(range(len(counts)), key=lambda i: (-counts[i], i)))
  frontier, depth_nodes, parent = [ranked], [], []
  for d in range(levels + 1):
    size = branching ** (levels - d)  # words under a node at depth d + 1 (the last: fewer)
    children, owners = [], []
    for p, node in enumerate(frontier):
      chunks = [node[i:i + size] for i in range(0, len(node), size)]
      children.extend(chunks)
      owners.extend([p] * len(chunks))
    depth_nodes.append(children)
    parent.append(owners)
    frontier = children
  return depth_nodes, parent


def _explicit_log_prob(params, counts, levels, branching, hidden_H, word):
  """float64 log p(word): along the word's path in :func:`_explicit_tree`, at every depth a
  softmax over the node's siblings (the children of the same parent), written as loops."""
  depth_nodes, parent = _explicit_tree(counts, levels, branching)
  total = 0.0
  for d, level in enumerate(params["levels"]):
    weight, bias = np.asarray(level["weight_QxH"], np.float64), np.asarray(level["bias_Q"])
    assert weight.shape[0] == len(depth_nodes[d])  # one row per node at this depth
    node = next(i for i, words in enumerate(depth_nodes[d]) if word in words)
    siblings = [i for i, p in enumerate(parent[d]) if p == parent[d][node]]
    scores = {q: float(weight[q] @ hidden_H + bias[q]) for q in siblings}
    top = max(scores.values())
    total += scores[node] - (top + np.log(sum(np.exp(s - top) for s in scores.values())))
  return total


@pytest.mark.parametrize("levels, vocab_size", [(1, 10), (2, 10), (2, 27), (3, 17)])
def test_log_prob_is_the_explicit_product_of_level_probabilities(levels, vocab_size):
  rng = np.random.default_rng(levels)
  counts = rng.integers(0, 30, vocab_size)
  head = heads.class_hierarchy_softmax(counts, levels)
  branching = class_hierarchy.hierarchy_branching(vocab_size, levels)
  with jax.enable_x64():
    params = _params(head, 3)
    hidden_NxH = jnp.asarray(rng.normal(size=(vocab_size, 3)))
    words_N = jnp.arange(vocab_size)
    got = np.asarray(head.log_prob(params, hidden_NxH, words_N))
    full = np.asarray(head.log_probs(params, hidden_NxH))
  expected = [_explicit_log_prob(params, counts, levels, branching, np.asarray(h), w)
              for h, w in zip(hidden_NxH, range(vocab_size))]
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(full[np.arange(vocab_size), np.arange(vocab_size)], expected,
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.exp(full).sum(axis=1), 1.0, rtol=1e-12)


def test_one_level_is_the_class_softmax_over_equal_frequency_classes():
  # V = B^2: class_softmax's equal binning into C = B classes is the same partition, and
  # its class-major word rows are the frequency ranks, so the same params give the same model.
  counts = np.array([5, 9, 1, 7, 3, 8, 2, 6, 4, 0, 10, 11, 13, 12, 15, 14])
  tree = heads.class_hierarchy_softmax(counts, levels=1)
  flat = heads.class_softmax(counts, 4, binning="equal")
  params = _params(tree, 3, dtype=np.float32)
  rank_of_id = np.argsort(np.argsort(-counts, kind="stable"), kind="stable")
  row_of_id = np.asarray(flat.tables["row_of_V"])
  np.testing.assert_array_equal(row_of_id, rank_of_id)
  (root, words) = params["levels"]
  flat_params = {"class_weight_CxH": root["weight_QxH"], "class_bias_C": root["bias_Q"],
                 "word_weight_VxH": words["weight_QxH"], "word_bias_V": words["bias_Q"]}
  hidden_NxH = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  np.testing.assert_allclose(tree.log_probs(params, hidden_NxH),
                             flat.log_probs(flat_params, hidden_NxH), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_gradients_match_finite_differences(levels):
  counts = np.arange(11, 0, -1)
  head = heads.class_hierarchy_softmax(counts, levels)
  with jax.enable_x64():
    params = _params(head, 3, seed=levels)
    hidden_NxH = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)))
    targets_N = jnp.array([0, 3, 10, 5, 9, 1])
    where_N = jnp.array([True, True, True, False, True, True])
    check_grads(lambda p, h: head.loss(p, h, targets_N, where=where_N), (params, hidden_NxH),
                order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_level_shapes_and_branching():
  assert class_hierarchy.hierarchy_branching(10_000, 1) == 100
  assert class_hierarchy.hierarchy_branching(1_000_000, 2) == 100
  assert class_hierarchy.hierarchy_branching(1_000_000, 3) == 32
  assert class_hierarchy.hierarchy_branching(1_000_001, 2) == 101
  assert class_hierarchy.level_sizes(1_000_000, 2, 100) == [100, 10_000, 1_000_000]
  head = heads.class_hierarchy_softmax(np.ones(33_280), 2)
  shapes = jax.eval_shape(lambda k: head.init(k, 8), jax.random.key(0))
  assert [s["weight_QxH"].shape for s in shapes["levels"]] == [(31, 8), (1009, 8), (33_280, 8)]


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 200), st.sampled_from([1, 2, 3]))
def test_branching_is_the_smallest_that_covers_the_vocabulary(vocab_size, levels):
  b = class_hierarchy.hierarchy_branching(vocab_size, levels)
  assert b >= 2 and b ** (levels + 1) >= vocab_size
  assert b == 2 or (b - 1) ** (levels + 1) < vocab_size
  sizes = class_hierarchy.level_sizes(vocab_size, levels, b)
  assert sizes[-1] == vocab_size and sizes[0] <= b
  # Every node's children fit in its B slots: the hierarchy is complete.
  assert all(-(-child // b) == parent for parent, child in zip(sizes, sizes[1:]))


def test_frequent_words_share_the_first_classes():
  counts = np.array([1, 100, 2, 50, 3, 25, 4, 12, 5])
  head = heads.class_hierarchy_softmax(counts, levels=1, branching=3)
  ranks = np.asarray(head.tables["rank_of_id_V"])
  assert [int(i) for i in np.argsort(ranks)[:3]] == [1, 3, 5]  # the top class
  assert sorted(ranks.tolist()) == list(range(9))


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=4), "levels must be one of"), (dict(levels=2, branching=2), "branching=2"),
    (dict(levels=1, branching=1), "branching=1")])
def test_bad_options_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    heads.class_hierarchy_softmax(np.ones(30), **kwargs)


def test_walk_sampling_matches_log_probs():
  counts = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
  head = heads.class_hierarchy_softmax(counts, levels=2)
  params = _params(head, 2, dtype=np.float32)
  hidden_NxH = jnp.tile(jnp.array([[0.7, -0.4]]), (40_000, 1))
  draws = np.asarray(jax.jit(head.sample)(params, hidden_NxH, jax.random.key(5)))
  p_V = np.exp(np.asarray(head.log_probs(params, hidden_NxH[:1]))[0])
  freq_V = np.bincount(draws, minlength=10) / draws.size
  tolerance_V = 4 * np.sqrt(p_V * (1 - p_V) / draws.size) + 1e-4  # 4 standard errors
  assert np.all(np.abs(freq_V - p_V) <= tolerance_V), (freq_V, p_V)


def test_make_head_and_flags_build_it():
  head = heads.make_head("classtree", vocab_size=8, counts=np.arange(8), levels=3)
  params = head.init(jax.random.key(0), 4)
  assert len(params["levels"]) == 4
  assert heads.HEAD_OPTIONS["classtree"] == ("levels",)
  from lm_jax.train.config import TrainConfig
  with pytest.raises(ValueError, match="--head_levels=4"):
    TrainConfig.from_flags(head="classtree", head_levels=4).validate()
