r"""Hierarchical softmax: a word's probability is the product of binary decisions on its tree path.

Each inner node :math:`i` of a binary tree over the vocabulary (see
:mod:`lm_jax.heads.trees`) holds a vector :math:`u_i` and bias :math:`b_i`; going to its
first child has probability :math:`\sigma(h \cdot u_i + b_i)`, to its second
:math:`\sigma(-(h \cdot u_i + b_i))`, so the leaves' probabilities sum to one by
construction. The training walk is vectorised: one gather of the ``[N, D, H]`` path-node
vectors, a batched dot and a masked ``log_sigmoid`` sum, :math:`O(H D)` per token. The dense
``loss`` runs that walk in chunks of tokens with a hand-written backward
(:func:`path_nll`), so the ``[N, D, H]`` rows never exist whole: its forward + backward is
about 2x faster on CPU than autodiff of the same walk (measured in WORKSPACE_NOTES.md).

References:
  Morin and Bengio, "Hierarchical probabilistic neural network language model",
  AISTATS 2005. Mnih and Hinton, "A scalable hierarchical distributed language model",
  NIPS 2008. Mikolov et al., "Distributed representations of words and phrases and their
  compositionality", NIPS 2013, Section 2.1, Eq. (3).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import log_prob_from_loss
from lm_jax.heads.base import loss_from_sparse
from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.base import with_target_contract
from lm_jax.heads.trees import balanced_tree
from lm_jax.heads.trees import class_tree
from lm_jax.heads.trees import expected_depth
from lm_jax.heads.trees import huffman_tree
from lm_jax.heads.trees import Tree
from lm_jax.ops import platform

__all__ = ["BACKWARDS", "Tree", "balanced_tree", "class_tree", "expected_depth",
           "hierarchical_softmax", "huffman_tree", "path_nll"]

# Default tokens per chunk of path_nll: about this many gathered path-row elements (4 MiB of
# float32), so a chunk's [C, D, H] rows stay in cache.
_CHUNK_ELEMENTS = 2**20


def _path_log_prob(scores_NxD, signs_NxD, mask_NxD):
  """:math:`\\sum_d \\text{mask}_d \\log\\sigma(s_d\\, x_d)` over the last axis."""
  return jnp.sum(jnp.where(mask_NxD, jax.nn.log_sigmoid(signs_NxD * scores_NxD), 0.0), axis=-1)


def _chunked(x, chunk_size):
  """``[N, ...] -> [ceil(N / C), C, ...]``, zero-padded: padded tokens have an all-False mask
  (forward) and a zero gradient (backward), so they add nothing."""
  num_chunks = -(-x.shape[0] // chunk_size)
  pad = num_chunks * chunk_size - x.shape[0]
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(num_chunks, chunk_size,
                                                                  *x.shape[1:])


def _path_nll_chunks(weight_IxH, bias_I, hidden_NxH, nodes_NxD, signs_NxD, mask_NxD,
                     chunk_size):
  """Forward of :func:`path_nll`: ``(nll_N, dnll_dscore_NxD)``, chunk by chunk."""
  num_tokens, depth = nodes_NxD.shape

  def chunk(args):
    hidden_CxH, nodes_CxD, signs_CxD, mask_CxD = args
    scores_CxD = (jnp.einsum("cdh,ch->cd", weight_IxH[nodes_CxD], hidden_CxH)
                  + bias_I[nodes_CxD])
    signed_CxD = signs_CxD * scores_CxD
    nll_C = -jnp.sum(jnp.where(mask_CxD, jax.nn.log_sigmoid(signed_CxD), 0.0), axis=-1)
    # d(-log sigma(s x)) / dx = -s sigma(-s x).
    dscore_CxD = jnp.where(mask_CxD, -signs_CxD * jax.nn.sigmoid(-signed_CxD), 0.0)
    return nll_C, dscore_CxD

  nll, dscore = jax.lax.map(chunk, tuple(_chunked(x, chunk_size)
                                          for x in (hidden_NxH, nodes_NxD, signs_NxD, mask_NxD)))
  return nll.reshape(-1)[:num_tokens], dscore.reshape(-1, depth)[:num_tokens]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _path_nll(weight_IxH, bias_I, hidden_NxH, nodes_NxD, signs_NxD, mask_NxD, chunk_size):
  return _path_nll_chunks(weight_IxH, bias_I, hidden_NxH, nodes_NxD, signs_NxD, mask_NxD,
                          chunk_size)[0]


def _path_nll_fwd(weight_IxH, bias_I, hidden_NxH, nodes_NxD, signs_NxD, mask_NxD, chunk_size):
  nll_N, dscore_NxD = _path_nll_chunks(weight_IxH, bias_I, hidden_NxH, nodes_NxD, signs_NxD,
                                       mask_NxD, chunk_size)
  return nll_N, (weight_IxH, bias_I, hidden_NxH, nodes_NxD, dscore_NxD)


def _path_nll_bwd(chunk_size, residuals, cotangent_N):
  weight_IxH, bias_I, hidden_NxH, nodes_NxD, dscore_NxD = residuals
  num_tokens, hidden_size = hidden_NxH.shape
  grad_NxD = cotangent_N[:, None] * dscore_NxD  # 0 on padded path entries.

  def chunk(carry, args):  # dL/dh = sum_d g_d u_d; dL/du_i += g h, dL/db_i += g (scatter-add).
    dweight_IxH, dbias_I = carry
    hidden_CxH, nodes_CxD, grad_CxD = args
    dhidden_CxH = jnp.einsum("cd,cdh->ch", grad_CxD, weight_IxH[nodes_CxD])
    dweight_IxH = dweight_IxH.at[nodes_CxD].add(grad_CxD[:, :, None] * hidden_CxH[:, None, :])
    dbias_I = dbias_I.at[nodes_CxD].add(grad_CxD)
    return (dweight_IxH, dbias_I), dhidden_CxH

  (dweight_IxH, dbias_I), dhidden = jax.lax.scan(
      chunk, (jnp.zeros_like(weight_IxH), jnp.zeros_like(bias_I)),
      tuple(_chunked(x, chunk_size) for x in (hidden_NxH, nodes_NxD, grad_NxD)))
  dhidden_NxH = dhidden.reshape(-1, hidden_size)[:num_tokens]
  return dweight_IxH, dbias_I, dhidden_NxH, None, None, None


_path_nll.defvjp(_path_nll_fwd, _path_nll_bwd)


def path_nll(weight_IxH: jax.typing.ArrayLike, bias_I: jax.typing.ArrayLike,
             hidden_NxH: jax.typing.ArrayLike, nodes_NxD: jax.typing.ArrayLike,
             signs_NxD: jax.typing.ArrayLike, mask_NxD: jax.typing.ArrayLike, *,
             chunk_size: Optional[int] = None, implementation: str = "auto") -> jax.Array:
  r"""Negative log-likelihood of tree paths, :math:`-\sum_d m_d \log\sigma(s_d (h \cdot u_{n_d}
  + b_{n_d}))` per token, with a hand-written chunked backward.

  Forward and backward run over chunks of ``C`` tokens (``lax.map`` / ``lax.scan``): each chunk
  gathers its ``[C, D, H]`` node rows, scores them, and in the backward forms
  :math:`\partial L / \partial h = \sum_d g_d u_{n_d}` and scatter-adds :math:`g_d h` into the
  rows :math:`n_d` (:math:`g_d = \partial L / \partial x_d = -s_d \sigma(-s_d x_d)` times the
  token's cotangent, saved by the forward as ``[N, D]``). Autodiff of the plain walk instead
  materialises ``[N, D, H]`` rows and their ``[N, D, H]`` cotangent, ~75 MB each at PTB's
  ``N = 4480, D = 21, H = 200``, which is memory traffic that dominated the loss;
  ``experiments/bench_heads.py`` and WORKSPACE_NOTES.md have the measured speed-up.
  Reverse mode only (``jax.custom_vjp``): ``jax.grad``/``jax.vjp`` work, ``jax.jvp`` does not.

  Args:
    weight_IxH: ``[I, H]`` node vectors :math:`u`.
    bias_I: ``[I]`` node biases :math:`b`.
    hidden_NxH: ``[N, H]`` hidden states.
    nodes_NxD: ``[N, D]`` int node ids on each token's path (any valid id where masked).
    signs_NxD: ``[N, D]`` :math:`\pm 1` branch signs.
    mask_NxD: ``[N, D]`` bool, True on real path entries.
    chunk_size: tokens per chunk ``C``; default on CPU about 4 MiB of ``[C, D, H]`` float32
      rows, on GPU and TPU every token in one chunk (one batched gather and contraction, no
      loop whose trip count grows with ``N``).
    implementation: ``"auto"`` (the default chunk size per platform, chosen when the
      program is lowered), ``"cpu"`` or ``"accelerator"``; an explicit ``chunk_size`` wins.

  Returns:
    ``[N]`` negative log-likelihoods, in the dtype of ``weight_IxH`` and ``hidden_NxH``
    promoted.

  >>> nll = path_nll(jnp.array([[1.0]]), jnp.zeros(1), jnp.array([[0.0], [2.0]]),
  ...                jnp.zeros((2, 1), int), jnp.array([[1.0], [-1.0]]), jnp.ones((2, 1), bool))
  >>> print(jnp.round(nll, 4))  # -log sigma(0), -log sigma(-2)
  [0.6931 2.1269]
  """
  dtype = jnp.result_type(weight_IxH, bias_I, hidden_NxH)
  nodes_NxD = jnp.asarray(nodes_NxD, jnp.int32)
  num_tokens, depth = nodes_NxD.shape
  hidden_size = jnp.shape(hidden_NxH)[-1]
  platform.check_implementation(implementation)
  args = (jnp.asarray(weight_IxH, dtype), jnp.asarray(bias_I, dtype),
          jnp.asarray(hidden_NxH, dtype), nodes_NxD, jnp.asarray(signs_NxD, dtype),
          jnp.asarray(mask_NxD, bool))
  chunked = lambda size: lambda *a: _path_nll(*a, max(1, min(int(size), max(num_tokens, 1))))
  if chunk_size is not None:
    return chunked(chunk_size)(*args)
  return platform.per_platform(
      chunked(max(1, _CHUNK_ELEMENTS // max(1, depth * hidden_size))), chunked(num_tokens),
      *args, implementation=implementation)


def _init(num_inner, init_scale, dtype, key, hidden_size):
  k_w, k_b = jax.random.split(key)
  return {"node_weight_IxH": jax.random.uniform(k_w, (num_inner, hidden_size), dtype,
                                                -init_scale, init_scale),
          "node_bias_I": jax.random.uniform(k_b, (num_inner,), dtype, -init_scale, init_scale)}


def _gather(params, targets_N, key=None, *, tables):
  del key
  targets_N = jnp.asarray(targets_N)
  nodes_ND = tables["nodes_VxD"][targets_N].reshape(-1)
  rows = {"node_weight_IxH": params["node_weight_IxH"][nodes_ND],
          "node_bias_I": params["node_bias_I"][nodes_ND]}
  index = {"node_weight_IxH": nodes_ND, "node_bias_I": nodes_ND}
  return rows, index, (tables["signs_VxD"][targets_N], tables["mask_VxD"][targets_N])


def _sparse_loss(rows, hidden_NxH, aux, *, where=None):
  signs_NxD, mask_NxD = aux
  num_tokens, depth = mask_NxD.shape
  compute = jnp.result_type(jnp.float32, hidden_NxH, rows["node_weight_IxH"])
  weight_NxDxH = rows["node_weight_IxH"].astype(compute).reshape(num_tokens, depth, -1)
  scores_NxD = (jnp.einsum("ndh,nh->nd", weight_NxDxH, jnp.asarray(hidden_NxH, compute))
                + rows["node_bias_I"].astype(compute).reshape(num_tokens, depth))
  loss_N = -_path_log_prob(scores_NxD, signs_NxD.astype(compute), mask_NxD)
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _chunked_loss(chunk_size, implementation, params, hidden_NxH, targets_N, *, key=None,
                  where=None, tables):
  del key
  hidden_NxH, targets_N = _check_hidden(hidden_NxH, targets_N)
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["node_weight_IxH"])
  loss_N = path_nll(params["node_weight_IxH"].astype(compute),
                    params["node_bias_I"].astype(compute), hidden_NxH.astype(compute),
                    tables["nodes_VxD"][targets_N],
                    tables["signs_VxD"][targets_N].astype(compute),
                    tables["mask_VxD"][targets_N], chunk_size=chunk_size,
                    implementation=implementation)
  return loss_N if where is None else jnp.where(where, loss_N, 0.0)


def _log_probs(params, hidden_NxH, *, tables):
  hidden_NxH, _ = _check_hidden(hidden_NxH)
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["node_weight_IxH"])
  scores_NxI = (jnp.matmul(hidden_NxH.astype(compute), params["node_weight_IxH"].astype(compute).T)
                + params["node_bias_I"].astype(compute))
  scores_NxVxD = scores_NxI[:, tables["nodes_VxD"]]
  return _path_log_prob(scores_NxVxD, tables["signs_VxD"].astype(compute), tables["mask_VxD"])


def _walk(depth, params, hidden_NxH, key, tables):
  """Down from the root, one Bernoulli draw per level (a ``fori_loop`` over the depth)."""
  compute = jnp.result_type(jnp.float32, hidden_NxH, params["node_weight_IxH"])
  hidden_NxH = hidden_NxH.astype(compute)
  children_Ix2 = tables["children_Ix2"]

  def step(level, node_N):  # node >= 0: inner node still to decide; < 0: leaf ~word.
    inner_N = jnp.maximum(node_N, 0)
    score_N = (jnp.sum(params["node_weight_IxH"][inner_N].astype(compute) * hidden_NxH, -1)
               + params["node_bias_I"][inner_N].astype(compute))
    uniform_N = jax.random.uniform(jax.random.fold_in(key, level), node_N.shape, compute)
    first_N = jnp.log(uniform_N) < jax.nn.log_sigmoid(score_N)
    child_N = jnp.where(first_N, children_Ix2[inner_N, 0], children_Ix2[inner_N, 1])
    return jnp.where(node_N >= 0, child_N, node_N)

  root_N = jnp.zeros(hidden_NxH.shape[:1], jnp.int32)
  return jnp.invert(jax.lax.fori_loop(0, depth, step, root_N)).astype(jnp.int32)


BACKWARDS = ("chunked", "autodiff")


def hierarchical_softmax(tree: Tree, *, backward: str = "chunked",
                         chunk_size: Optional[int] = None, init_scale: float = 0.1,
                         dtype=jnp.float32, implementation: str = "auto") -> OutputHead:
  r"""Hierarchical softmax over a binary :class:`~lm_jax.heads.trees.Tree`.

  .. math::
    \log p(w \mid h) = \sum_{d=1}^{D_w} \log \sigma\big(s_{w,d}\,(h \cdot u_{n_{w,d}}
    + b_{n_{w,d}})\big)

  with :math:`n_{w,d}` the inner nodes on the path to :math:`w` and :math:`s_{w,d} = \pm 1`
  the branch taken. Params ``{"node_weight_IxH", "node_bias_I"}`` (``I = V - 1``), uniform
  in ``[-init_scale, init_scale]``. ``loss`` (= ``-log_prob``, exact; ``key`` ignored) costs
  :math:`O(H D)` per token; with ``backward="chunked"`` it is :func:`path_nll` (chunks of
  ``chunk_size`` tokens, its own backward; reverse mode only), with ``backward="autodiff"`` the
  plain walk through JAX autodiff (slower, but ``jax.jvp`` works); ``sparse.loss`` is always
  the plain walk over the gathered rows. ``log_probs`` scores all ``I`` nodes (:math:`O(V H)`) and
  gathers the ``[V, D]`` paths. ``sample`` at ``temperature=1.0`` (a Python number) walks
  down from the root with a ``lax.fori_loop`` over depth, :math:`O(H D)` per sample;
  tempering each binary decision would *not* give :math:`p^{1/T}` renormalised, so any
  other temperature, or a traced one, samples exactly from ``log_probs`` via
  :func:`~lm_jax.heads.base.sample_from_log_probs`. ``sparse`` gathers the path rows.

  Args:
    tree: from ``huffman_tree``, ``balanced_tree`` or ``class_tree``.
    backward: ``"chunked"`` (:func:`path_nll`) or ``"autodiff"``, how ``loss`` is
      differentiated.
    chunk_size: tokens per chunk of :func:`path_nll`; default about 4 MiB of path rows on
      CPU, one chunk on GPU and TPU.
    implementation: ``"auto"`` (per platform), ``"cpu"`` or ``"accelerator"``: the
      chunking of :func:`path_nll` (``backward="chunked"``).
    init_scale: half-width of the uniform initialisation.
    dtype: parameter dtype.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead`.

  References:
    Morin and Bengio, AISTATS 2005, Section 3; Mikolov et al., NIPS 2013, Eq. (3).

  >>> head = hierarchical_softmax(balanced_tree(3))  # root -> (inner 1 -> (0, 1), word 2)
  >>> params = {"node_weight_IxH": jnp.array([[1.0], [0.0]]), "node_bias_I": jnp.zeros(2)}
  >>> with jnp.printoptions(precision=4):
  ...   print(jnp.exp(head.log_probs(params, jnp.array([[0.0], [2.0]]))))
  [[0.25   0.25   0.5   ]
   [0.4404 0.4404 0.1192]]
  """
  if not isinstance(tree, Tree):
    raise ValueError(f"tree must be a lm_jax.heads.trees.Tree, got {type(tree).__name__}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  platform.check_implementation(implementation)
  vocab_size, depth = tree.nodes_VxD.shape
  tables = {"nodes_VxD": jnp.asarray(tree.nodes_VxD, jnp.int32),
            "signs_VxD": jnp.asarray(tree.signs_VxD, jnp.int8),
            "mask_VxD": jnp.asarray(tree.mask_VxD, bool),
            "children_Ix2": jnp.asarray(tree.children_Ix2, jnp.int32)}
  partial = functools.partial
  sparse = RowSparse(_gather, _sparse_loss)
  loss = (partial(_chunked_loss, chunk_size, implementation) if backward == "chunked"
          else loss_from_sparse(sparse))
  return with_target_contract(
      OutputHead(partial(_init, tree.num_inner, init_scale, dtype), loss,
                 log_prob_from_loss(loss), _log_probs,
                 sample_by_walk(partial(_walk, depth), _log_probs), sparse, tables),
      vocab_size)
