"""Tests for lm_jax.heads.class_based: frequency binning and the two-level class softmax."""
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from lm_jax.heads import class_based

N, H = 6, 3
COUNTS = np.array([40, 3, 25, 0, 9, 9, 1, 14, 2, 6, 0, 5])  # V = 12, ids not sorted by count
V = COUNTS.shape[0]


def _setup(num_classes=4, binning="mass", seed=0, dtype=jnp.float32, tokens_per_item=None,
           backward="scan"):
  head = class_based.class_softmax(COUNTS, num_classes, binning=binning,
                                   tokens_per_item=tokens_per_item, backward=backward)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: head.init(k, H), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape), dtype), shapes)
  hidden_NxH = jnp.asarray(rng.normal(0.0, 1.5, (N, H)), dtype)
  targets_N = jnp.asarray(rng.integers(0, V, (N,)), jnp.int32)
  return head, params, hidden_NxH, targets_N


def _check_partition(counts, classes, num_classes):
  class_of_V, position_V, members_CxM, mask_CxM = classes
  vocab_size = len(counts)
  assert members_CxM.shape[0] == num_classes and mask_CxM.shape == members_CxM.shape
  sizes_C = mask_CxM.sum(axis=1)
  assert np.all(sizes_C >= 1), sizes_C  # No empty class.
  np.testing.assert_array_equal(np.bincount(class_of_V, minlength=num_classes), sizes_C)
  np.testing.assert_array_equal(members_CxM[class_of_V, position_V], np.arange(vocab_size))
  assert np.all(mask_CxM[class_of_V, position_V])
  assert np.all(mask_CxM[:, 0]) and np.all(np.diff(mask_CxM.astype(int), axis=1) <= 0)
  # Classes follow frequency: a more frequent word never sits in a later class.
  more_frequent = counts[:, None] > counts[None, :]
  assert not np.any(more_frequent & (class_of_V[:, None] > class_of_V[None, :]))


@pytest.mark.parametrize("binning", ["mass", "sqrt", "equal"])
def test_equal_shares_within_one_word(binning):
  counts = np.random.default_rng(1).integers(1, 50, 200)
  classes = class_based.word_classes(counts, 10, binning=binning)
  _check_partition(counts, classes, 10)
  mass_V = {"mass": counts, "sqrt": np.sqrt(counts), "equal": np.ones(200)}[binning]
  mass_C = np.bincount(classes[0], weights=mass_V, minlength=10)
  assert np.all(np.abs(mass_C - mass_V.sum() / 10) <= mass_V.max() + 1e-9), mass_C


def test_equal_binning_gives_equal_sizes_by_frequency():
  counts = np.round(1e6 / np.arange(1, 1001)).astype(int)[::-1]  # Zipf, rarest id first
  class_of_V, _, members_CxM, mask_CxM = class_based.word_classes(counts, 10, binning="equal")
  np.testing.assert_array_equal(mask_CxM.sum(1), np.full(10, 100))
  np.testing.assert_array_equal(class_of_V, np.repeat(np.arange(10), 100)[::-1])


def test_sqrt_binning_gives_rare_words_smaller_classes():
  counts = np.round(1e6 / np.arange(1, 1001)).astype(int)  # Zipf
  sizes = {b: class_based.word_classes(counts, binning=b)[3].sum(1) for b in ("mass", "sqrt")}
  assert sizes["sqrt"].max() < sizes["mass"].max() / 3
  assert sizes["mass"][:5].tolist() == [1, 1, 1, 1, 1]  # The frequent words are classes alone.


def test_default_is_ceil_sqrt_v_classes_and_handcrafted_example():
  for vocab_size in (2, 10, 17, 100):
    classes = class_based.word_classes(np.ones(vocab_size), None)
    assert classes[2].shape[0] == math.ceil(math.sqrt(vocab_size))
  class_of_V, position_V, members_CxM, mask_CxM = class_based.word_classes([1, 6, 1, 2], 2)
  assert class_of_V.tolist() == [1, 0, 1, 1] and position_V.tolist() == [1, 0, 2, 0]
  assert members_CxM.tolist() == [[1, 1, 1], [3, 0, 2]]


@settings(deadline=None, max_examples=50)
@given(counts=hnp.arrays(np.int64, st.integers(2, 60), elements=st.integers(0, 10**6)),
       fraction=st.floats(0.0, 1.0), binning=st.sampled_from(class_based.BINNINGS))
def test_every_class_nonempty_for_any_counts(counts, fraction, binning):
  num_classes = 1 + int(fraction * (len(counts) - 1))
  _check_partition(counts, class_based.word_classes(counts, num_classes, binning=binning),
                   num_classes)


def _numpy_log_probs(params, hidden_NxH, class_of_V, row_of_V):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.asarray(hidden_NxH, np.float64)
  class_logits = h @ p["class_weight_CxH"].T + p["class_bias_C"]
  class_logp = class_logits - np.log(np.exp(class_logits).sum(-1, keepdims=True))
  word_logits = h @ p["word_weight_VxH"][row_of_V].T + p["word_bias_V"][row_of_V]
  out = np.zeros(word_logits.shape)
  for y in range(len(class_of_V)):  # The explicit two-factor product, word by word.
    same = class_of_V == class_of_V[y]
    within = word_logits[:, y] - np.log(np.exp(word_logits[:, same]).sum(-1))
    out[:, y] = class_logp[:, class_of_V[y]] + within
  return out


def test_class_major_rows_keep_classes_contiguous():
  for binning in class_based.BINNINGS:
    class_of_V = class_based.word_classes(COUNTS, 4, binning=binning)[0]
    row_of_V = class_based.class_major_rows(COUNTS, 4, binning=binning)
    np.testing.assert_array_equal(np.sort(row_of_V), np.arange(V))  # A permutation.
    assert np.all(np.diff(class_of_V[np.argsort(row_of_V)]) >= 0)  # Class by class.


@pytest.mark.parametrize("binning,tokens_per_item", [
    ("mass", None), pytest.param("sqrt", None), ("sqrt", 1),
    pytest.param("mass", 64)])
def test_equals_two_factor_product_and_is_normalised(binning, tokens_per_item):
  head, params, hidden_NxH, targets_N = _setup(binning=binning, tokens_per_item=tokens_per_item)
  class_of_V = class_based.word_classes(COUNTS, 4, binning=binning)[0]
  row_of_V = class_based.class_major_rows(COUNTS, 4, binning=binning)
  expected = _numpy_log_probs(params, hidden_NxH, class_of_V, row_of_V)
  logp_NxV = head.log_probs(params, hidden_NxH)
  np.testing.assert_allclose(logp_NxV, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_NxV, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.log_prob(params, hidden_NxH, targets_N),
                             expected[np.arange(N), np.asarray(targets_N)], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                             -expected[np.arange(N), np.asarray(targets_N)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward, modes", [("scan", ("rev",)), ("autodiff", ("fwd", "rev"))])
def test_check_grads_of_loss(backward, modes):
  with jax.enable_x64(True):
    head, params, hidden_NxH, targets_N = _setup(dtype=jnp.float64, backward=backward)
    where_N = jnp.array([True, True, False, True, True, True])
    check_grads(lambda p, h: head.loss(p, h, targets_N, where=where_N), (params, hidden_NxH),
                order=1, modes=modes)


@pytest.mark.parametrize("binning, tokens_per_item", [("mass", None), ("equal", 1), ("sqrt", 4)])
def test_scan_backward_equals_autodiff_of_the_gathered_windows(binning, tokens_per_item):
  """The default loss (windows sliced in place, hand-written backward) against autodiff of
  the gathered windows, float64: values and the gradients of every param and the hidden
  states, with a masked token and repeated classes."""
  with jax.enable_x64(True):
    kw = dict(binning=binning, dtype=jnp.float64, tokens_per_item=tokens_per_item, seed=4)
    scan, params, hidden_NxH, targets_N = _setup(**kw)
    autodiff = _setup(**kw, backward="autodiff")[0]
    targets_N = targets_N.at[3].set(targets_N[0])  # two tokens of one class share an item
    where_N = jnp.array([True, True, True, True, False, True])
    cotangent_N = jnp.arange(1.0, N + 1)  # not uniform: each token's weight reaches its rows

    def value_and_grads(head):
      f = lambda p, h: jnp.sum(cotangent_N * head.loss(p, h, targets_N, where=where_N))
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, hidden_NxH)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                 value_and_grads(scan), value_and_grads(autodiff))
    with pytest.raises(TypeError, match="forward-mode"):
      jax.jvp(lambda h: scan.loss(params, h, targets_N), (hidden_NxH,), (hidden_NxH,))
  with pytest.raises(ValueError, match=r"backward must be one of \('scan', 'autodiff'\)"):
    class_based.class_softmax(COUNTS, 4, backward="jvp")


def test_init_shapes():
  head = class_based.class_softmax(COUNTS, 4, init_scale=0.05)
  params = head.init(jax.random.PRNGKey(0), H)
  assert {k: v.shape for k, v in params.items()} == {
      "class_weight_CxH": (4, H), "class_bias_C": (4,), "word_weight_VxH": (V, H),
      "word_bias_V": (V,)}
  assert all(float(jnp.max(jnp.abs(v))) <= 0.05 for v in params.values())


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"1-D \[V\], got shape \(2, 2\)"):
    class_based.word_classes(np.ones((2, 2)))
  with pytest.raises(ValueError, match="finite and >= 0, got -3"):
    class_based.class_softmax([4, -3, 1])
  with pytest.raises(ValueError, match="V >= 2 words, got V = 1"):
    class_based.class_softmax([5])
  with pytest.raises(ValueError, match=r"num_classes must be in \[1, V = 3\], got 4"):
    class_based.word_classes([1, 2, 3], 4)
  with pytest.raises(ValueError, match="tokens_per_item must be >= 1, got 0"):
    class_based.class_softmax([1, 2, 3], tokens_per_item=0)
  with pytest.raises(ValueError, match="tokens_per_item must be >= 1, got 0"):
    class_based.class_work_list(jnp.zeros(3, jnp.int32), 2, 0)
  with pytest.raises(ValueError, match="binning must be one of"):
    class_based.word_classes([1, 2, 3], binning="log")
  head, params, hidden_NxH, targets_N = _setup()
  with pytest.raises(ValueError, match=r"targets_N has shape \(5,\)"):
    head.loss(params, hidden_NxH, targets_N[:5])


def _check_work_list(class_N, num_classes, tokens_per_item):
  class_N = np.asarray(class_N)
  work = jax.jit(class_based.class_work_list, static_argnums=(1, 2))(
      class_N, num_classes, tokens_per_item)
  num_items = class_based.num_work_items(len(class_N), num_classes, tokens_per_item)
  assert work.token_LxK.shape == (num_items, tokens_per_item)
  item_N, slot_N = np.asarray(work.item_N), np.asarray(work.slot_N)
  token_LxK, valid_LxK = np.asarray(work.token_LxK), np.asarray(work.valid_LxK)
  item_class_L = np.asarray(work.item_class_L)
  # Every token sits in exactly one valid slot, in an item of its own class.
  np.testing.assert_array_equal(token_LxK[item_N, slot_N], np.arange(len(class_N)))
  assert np.all(valid_LxK[item_N, slot_N]) and valid_LxK.sum() == len(class_N)
  np.testing.assert_array_equal(item_class_L[item_N], class_N)
  # Items are class-sorted and full except each class's last one: ceil(n_c / K) per class.
  assert np.all(np.diff(item_class_L) >= 0)
  used_L = valid_LxK.any(axis=1)
  n_C = np.bincount(class_N, minlength=num_classes)
  np.testing.assert_array_equal(np.bincount(item_class_L[used_L], minlength=num_classes),
                                -(-n_C // tokens_per_item))
  return work


def test_work_list_empty_classes_and_overflowing_windows():
  # Class 1 has no token, class 0 has 5 tokens (two windows of K = 2 plus one), class 3 one.
  work = _check_work_list([0, 3, 0, 0, 2, 0, 0, 2], 4, 2)
  assert work.item_class_L.tolist()[:5] == [0, 0, 0, 2, 3]
  assert work.token_LxK.tolist()[:3] == [[0, 2], [3, 5], [6, 0]]  # Stable: token order kept.
  assert work.valid_LxK.tolist()[2] == [True, False]
  assert not np.any(np.asarray(work.valid_LxK)[5:])  # Unused items at the end are empty.


@settings(deadline=None, max_examples=15)
@given(data=st.data(), num_classes=st.integers(1, 9), tokens_per_item=st.integers(1, 5))
def test_work_list_covers_every_token_once(data, num_classes, tokens_per_item):
  class_N = data.draw(hnp.arrays(np.int32, 24, elements=st.integers(0, num_classes - 1)))
  _check_work_list(class_N, num_classes, tokens_per_item)


def test_all_tokens_in_the_largest_class_is_exact():
  # The worst case for the static item count: every token in one class, K not dividing N.
  head, params, hidden_NxH, _ = _setup(binning="sqrt", tokens_per_item=4)
  class_of_V = class_based.word_classes(COUNTS, 4, binning="sqrt")[0]
  largest = np.argmax(np.bincount(class_of_V))
  targets_N = jnp.asarray(np.resize(np.flatnonzero(class_of_V == largest), N), jnp.int32)
  np.testing.assert_allclose(head.loss(params, hidden_NxH, targets_N),
                             -head.log_probs(params, hidden_NxH)[np.arange(N), targets_N],
                             rtol=1e-5, atol=1e-5)
