"""Heads, sizes, inputs and float64 NumPy references shared by the Flax layer tests.

The references recompute each head's distribution from its params in plain NumPy,
following the maths of the head's docstring (the frequency ranks and the noise prior from
``COUNTS_V`` directly; of the head's tables only the class map and the tree's children,
whose meaning the docstrings give), so a layer that disagrees is wrong, not merely
different from the function it wraps.
"""
import jax.numpy as jnp
import numpy as np

from lm_jax import heads

N, H, V, E, B, T = 6, 4, 9, 3, 2, 5
COUNTS_V = np.array([0, 3, 1, 9, 5, 2, 7, 4, 6])
_SCALE = dict(vocab_size=V, counts=COUNTS_V, init_scale=0.5)  # logits far from uniform
HEADS = {
    "full": lambda: heads.full_softmax(V, init_scale=0.5),
    "class": lambda: heads.make_head("class", **_SCALE),
    "hsm": lambda: heads.make_head("hsm", **_SCALE),
    "dsoftmax": lambda: heads.make_head("dsoftmax", bands="3:3,6:1", **_SCALE),
    "nce": lambda: heads.make_head("nce", num_samples=3, **_SCALE),
    "neg": lambda: heads.make_head("neg", num_samples=3, **_SCALE),
    "sampled": lambda: heads.make_head("sampled", num_samples=3, **_SCALE),
    "adaptive": lambda: heads.make_head("adaptive", cutoffs="3,6", div_value=2.0, **_SCALE),
    "classtree": lambda: heads.make_head("classtree", levels=2, **_SCALE),
}
HEAD_NAMES = list(HEADS)
EXACT_HEADS = ("full", "class", "hsm", "dsoftmax", "adaptive", "classtree")  # loss = -log p
WHERE_N = np.array([True, True, False, True, True, False])


def data(seed=0):
  """``(hidden_NxH, targets_N)``."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(0, 1.5, (N, H)), jnp.float32),
          jnp.asarray(rng.integers(0, V, (N,)), jnp.int32))


# --- float64 NumPy references: log p(v | h) for every token and id, [N, V]. ---

def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _frequency_order():
  """``(id_of_rank, rank_of_id)``: ids by decreasing count, ties by id."""
  id_of_rank = np.array(sorted(range(V), key=lambda v: (-COUNTS_V[v], v)))
  rank_of_id = np.empty(V, int)
  rank_of_id[id_of_rank] = np.arange(V)
  return id_of_rank, rank_of_id


def _full(p, h, offset_V=0.0):
  """log_softmax(h W^T + b (+ an evaluation offset))."""
  return _log_softmax(h @ p["weight_VxH"].T + p["bias_V"] + offset_V)


def _unigram_log_prior():
  """Negative sampling's evaluation offset: log q, q ~ count^0.75, zero counts floored at the
  rarest seen word's log q."""
  q_V = COUNTS_V ** 0.75 / np.sum(COUNTS_V ** 0.75)
  seen = q_V > 0
  return np.where(seen, np.log(np.where(seen, q_V, 1.0)), np.log(q_V[seen]).min())


def _class(p, h, tables):
  """log p(class | h) + log p(word | class, h); word v's row is row_of_V[v]."""
  class_V, row_V = np.asarray(tables["class_of_V"]), np.asarray(tables["row_of_V"])
  class_logp_NxC = _log_softmax(h @ p["class_weight_CxH"].T + p["class_bias_C"])
  word_logits_NxV = h @ p["word_weight_VxH"][row_V].T + p["word_bias_V"][row_V]
  out = np.empty_like(word_logits_NxV)
  for c in np.unique(class_V):
    members = class_V == c
    out[:, members] = class_logp_NxC[:, [c]] + _log_softmax(word_logits_NxV[:, members])
  return out


def _hsm(p, h, tables):
  """Sum of log sigma(+-score) down the tree from the root (inner node 0), read from the
  children table (>= 0 inner node, < 0 the leaf of word ~c), not from the path tables."""
  children_Ix2 = np.asarray(tables["children_Ix2"])
  scores_NxI = h @ p["node_weight_IxH"].T + p["node_bias_I"]
  out = np.full((h.shape[0], V), np.nan)
  stack = [(0, np.zeros(h.shape[0]))]
  while stack:
    node, logp_N = stack.pop()
    for child, sign in zip(children_Ix2[node], (1.0, -1.0)):  # first child: sigma(+s)
      below_N = logp_N - np.logaddexp(0.0, -sign * scores_NxI[:, node])
      if child >= 0:
        stack.append((child, below_N))
      else:
        out[:, ~child] = below_N
  return out


def _dsoftmax(p, h):
  """Band b scores its n_b next words (by frequency) from its own d_b slice of h."""
  id_of_rank, _ = _frequency_order()
  logits_NxV = np.empty((h.shape[0], V))
  word, dim = 0, 0
  for weight in p["band_weights"]:
    n, d = weight.shape
    logits_NxV[:, id_of_rank[word:word + n]] = h[:, dim:dim + d] @ weight.T
    word, dim = word + n, dim + d
  assert (word, dim) == (V, H)
  return _log_softmax(logits_NxV + p["bias_V"])


def _adaptive(p, h):
  """Shortlist ranks from the head softmax; cluster i's ranks: log p(cluster) + the
  log-softmax of U_i P_i h."""
  _, rank_of_id = _frequency_order()
  head_logp_NxS = _log_softmax(h @ p["head_weight_SxH"].T + p.get("head_bias_S", 0.0))
  shortlist = head_logp_NxS.shape[1] - len(p["tail"])
  by_rank = [head_logp_NxS[:, :shortlist]]
  for i, tail in enumerate(p["tail"]):
    by_rank.append(head_logp_NxS[:, [shortlist + i]]
                   + _log_softmax(h @ tail["proj_RxH"].T @ tail["weight_WxR"].T))
  return np.concatenate(by_rank, axis=1)[:, rank_of_id]


def _classtree(p, h):
  """Sum over levels of the log-softmax of each rank's ancestor among its siblings; B is the
  smallest branching >= 2 with B^(L+1) >= V, rank r's node at depth d+1 is r // B^(L-d)."""
  _, rank_of_id = _frequency_order()
  levels = len(p["levels"]) - 1
  branching = 2
  while branching ** (levels + 1) < V:
    branching += 1
  out = np.zeros((h.shape[0], V))
  for d, level in enumerate(p["levels"]):
    logits_NxQ = h @ level["weight_QxH"].T + level["bias_Q"]
    for v in range(V):
      node = rank_of_id[v] // branching ** (levels - d)
      first = node // branching * branching
      siblings = logits_NxQ[:, first:min(first + branching, logits_NxQ.shape[1])]
      out[:, v] += _log_softmax(siblings)[:, node - first]
  return out


def reference_log_probs(name, params, hidden_NxH, tables):
  """``[N, V]`` float64 log-probabilities of head ``name`` (a key of HEADS) with ``params``."""
  p = _float64(params)
  h = np.asarray(hidden_NxH, np.float64)
  if name in ("full", "nce", "sampled"):  # the sampled heads evaluate as an exact softmax
    return _full(p, h)
  if name == "neg":
    return _full(p, h, _unigram_log_prior())
  if name in ("class", "hsm"):
    return {"class": _class, "hsm": _hsm}[name](p, h, tables)
  return {"dsoftmax": _dsoftmax, "adaptive": _adaptive, "classtree": _classtree}[name](p, h)


def _float64(tree):
  if isinstance(tree, dict):
    return {k: _float64(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_float64(v) for v in tree]
  return np.asarray(tree, np.float64)


def assert_matches_reference(name, expected_NxV, log_probs_NxV, log_prob_N, loss_N, targets_N):
  """The layer's outputs against the reference at float32 accuracy; ``loss_N`` was computed
  with ``where=WHERE_N`` and is checked for the exact heads only."""
  np.testing.assert_allclose(np.exp(expected_NxV).sum(axis=1), 1.0, rtol=1e-12)  # a distribution
  np.testing.assert_allclose(log_probs_NxV, expected_NxV, rtol=1e-5, atol=1e-5)
  at_target_N = expected_NxV[np.arange(len(targets_N)), np.asarray(targets_N)]
  np.testing.assert_allclose(log_prob_N, at_target_N, rtol=1e-5, atol=1e-5)
  if name in EXACT_HEADS:
    np.testing.assert_allclose(loss_N, np.where(WHERE_N, -at_target_N, 0.0), rtol=1e-5, atol=1e-5)


def reference_rnn(cell, params, inputs_BxTxE, mask_BxT):
  """``(outputs_BxTxH, carry)`` of an Elman (tanh) / GRU / LSTM layer, a float64 loop over time.

  Elman: h = tanh(x W_xh + b + h W_hh). GRU (gates r, z, n): r, z = sigma(x W_x. + b_. +
  h W_h.), n = tanh(x W_xn + b_n + r (h W_hn + b_hn)), h' = (1 - z) n + z h. LSTM (i, f, g,
  o): c' = sigma(f) c + sigma(i) tanh(g), h' = sigma(o) tanh(c'). Where the mask is False
  the carry is kept and the output is 0.
  """
  p = _float64(params)
  x_BxTxE, mask_BxT = np.asarray(inputs_BxTxE, np.float64), np.asarray(mask_BxT, bool)
  batch, steps, _ = x_BxTxE.shape
  hidden = p["W_hh_HxG"].shape[0]
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
  outputs = np.zeros((batch, steps, hidden))
  for t in range(steps):
    from_x, from_h = x_BxTxE[:, t] @ p["W_xh_ExG"] + p["b_G"], h @ p["W_hh_HxG"]
    new_c = c
    if cell == "elman":
      new_h = np.tanh(from_x + from_h)
    elif cell == "gru":
      (x_r, x_z, x_n), (h_r, h_z, h_n) = np.split(from_x, 3, -1), np.split(from_h, 3, -1)
      r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
      n = np.tanh(x_n + r * (h_n + p["b_hn_H"]))
      new_h = (1 - z) * n + z * h
    else:
      i, f, g, o = np.split(from_x + from_h, 4, -1)
      new_c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      new_h = sigmoid(o) * np.tanh(new_c)
    keep = mask_BxT[:, t, None]
    h, c = np.where(keep, new_h, h), np.where(keep, new_c, c)
    outputs[:, t] = np.where(keep, new_h, 0.0)
  return outputs, ((c, h) if cell == "lstm" else h)


# --- initializers ---

def fan_in_filler(key, shape, dtype):
  """An initializer that fills a kernel with its fan-in as Flax lays kernels out,
  ``[..., in, out]``."""
  del key
  return jnp.full(shape, shape[-2], dtype)


def expected_fan_in(name, shape):
  """The width of the vector a head's or cell's matrix multiplies: H for the head matrices
  ``..._?xH`` and ``W_hh_HxG``, E for ``W_xh_ExG``; adaptive's ``weight_WxR`` takes the
  projection (R) and a D-softmax band ``[n_b, d_b]`` its slice of h (d_b): ``shape[1]``."""
  if name.endswith("xH") or name == "W_hh_HxG":
    return H
  return E if name == "W_xh_ExG" else shape[1]


def assert_initialized(params, defaults, bias=0.3):
  """``{leaf name: array}``: matrices hold their fan-in (:func:`fan_in_filler`), vectors
  ``bias``, scalars their ``defaults`` value (the head's own init)."""
  assert sorted(params) == sorted(defaults)
  for name, value in params.items():
    value = np.asarray(value)
    if value.ndim == 2:
      np.testing.assert_array_equal(value, expected_fan_in(name, value.shape), err_msg=name)
    elif value.ndim == 1:
      np.testing.assert_allclose(value, bias, rtol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(value, defaults[name], err_msg=name)
