r"""Hierarchical softmax: a word's probability is the product of binary decisions on its tree path.

Each inner node :math:`i` of a binary tree over the vocabulary (see
:mod:`lm_jax.heads.trees`) holds a vector :math:`u_i` and bias :math:`b_i`; going to its
first child has probability :math:`\sigma(h \cdot u_i + b_i)`, to its second
:math:`\sigma(-(h \cdot u_i + b_i))`, so the leaves' probabilities sum to one by
construction. The training walk is vectorised: one gather of the ``[N, D, H]`` path-node
vectors, a batched dot and a masked ``log_sigmoid`` sum, :math:`O(H D)` per token.

References:
  Morin and Bengio, "Hierarchical probabilistic neural network language model",
  AISTATS 2005. Mnih and Hinton, "A scalable hierarchical distributed language model",
  NIPS 2008. Mikolov et al., "Distributed representations of words and phrases and their
  compositionality", NIPS 2013, Section 2.1, Eq. (3).
"""
import jax
import jax.numpy as jnp

from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import loss_from_sparse
from lm_jax.heads.base import _check_hidden
from lm_jax.heads.base import sample_by_walk
from lm_jax.heads.trees import Tree
from lm_jax.heads.trees import balanced_tree
from lm_jax.heads.trees import class_tree
from lm_jax.heads.trees import expected_depth
from lm_jax.heads.trees import huffman_tree

__all__ = ["Tree", "balanced_tree", "class_tree", "expected_depth", "hierarchical_softmax",
           "huffman_tree"]


def _path_log_prob(scores_NxD, signs_NxD, mask_NxD):
  """:math:`\\sum_d \\text{mask}_d \\log\\sigma(s_d\\, x_d)` over the last axis."""
  return jnp.sum(jnp.where(mask_NxD, jax.nn.log_sigmoid(signs_NxD * scores_NxD), 0.0), axis=-1)


def hierarchical_softmax(tree: Tree, *, init_scale: float = 0.1, dtype=jnp.float32) -> OutputHead:
  r"""Hierarchical softmax over a binary :class:`~lm_jax.heads.trees.Tree`.

  .. math::
    \log p(w \mid h) = \sum_{d=1}^{D_w} \log \sigma\big(s_{w,d}\,(h \cdot u_{n_{w,d}}
    + b_{n_{w,d}})\big)

  with :math:`n_{w,d}` the inner nodes on the path to :math:`w` and :math:`s_{w,d} = \pm 1`
  the branch taken. Params ``{"node_weight_IxH", "node_bias_I"}`` (``I = V - 1``), uniform
  in ``[-init_scale, init_scale]``. ``loss`` (= ``-log_prob``, exact; ``key`` ignored) costs
  :math:`O(H D)` per token. ``log_probs`` scores all ``I`` nodes (:math:`O(V H)`) and
  gathers the ``[V, D]`` paths. ``sample`` at ``temperature=1.0`` (a Python number) walks
  down from the root with a ``lax.fori_loop`` over depth, :math:`O(H D)` per sample;
  tempering each binary decision would *not* give :math:`p^{1/T}` renormalised, so any
  other temperature, or a traced one, samples exactly from ``log_probs`` via
  :func:`~lm_jax.heads.base.sample_from_log_probs`. ``sparse`` gathers the path rows.

  Args:
    tree: from ``huffman_tree``, ``balanced_tree`` or ``class_tree``.
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
  num_inner = tree.num_inner
  vocab_size, depth = tree.nodes_VxD.shape

  def init(key, hidden_size):
    k_w, k_b = jax.random.split(key)
    return {"node_weight_IxH": jax.random.uniform(k_w, (num_inner, hidden_size), dtype,
                                                  -init_scale, init_scale),
            "node_bias_I": jax.random.uniform(k_b, (num_inner,), dtype, -init_scale, init_scale)}

  def gather(params, targets_N, key=None):
    del key
    targets_N = jnp.asarray(targets_N)
    nodes_ND = jnp.asarray(tree.nodes_VxD)[targets_N].reshape(-1)
    rows = {"node_weight_IxH": params["node_weight_IxH"][nodes_ND],
            "node_bias_I": params["node_bias_I"][nodes_ND]}
    index = {"node_weight_IxH": nodes_ND, "node_bias_I": nodes_ND}
    aux = (jnp.asarray(tree.signs_VxD)[targets_N], jnp.asarray(tree.mask_VxD)[targets_N])
    return rows, index, aux

  def sparse_loss(rows, hidden_NxH, aux, *, where=None):
    signs_NxD, mask_NxD = aux
    num_tokens = hidden_NxH.shape[0]
    compute = jnp.result_type(jnp.float32, hidden_NxH, rows["node_weight_IxH"])
    weight_NxDxH = rows["node_weight_IxH"].astype(compute).reshape(num_tokens, depth, -1)
    scores_NxD = (jnp.einsum("ndh,nh->nd", weight_NxDxH, jnp.asarray(hidden_NxH, compute))
                  + rows["node_bias_I"].astype(compute).reshape(num_tokens, depth))
    loss_N = -_path_log_prob(scores_NxD, signs_NxD.astype(compute), mask_NxD)
    return loss_N if where is None else jnp.where(where, loss_N, 0.0)

  sparse = RowSparse(gather, sparse_loss)
  loss = loss_from_sparse(sparse)

  def log_prob(params, hidden_NxH, targets_N):
    return -loss(params, hidden_NxH, targets_N)

  def node_scores(params, hidden_NxH):
    compute = jnp.result_type(jnp.float32, hidden_NxH, params["node_weight_IxH"])
    return (jnp.matmul(hidden_NxH.astype(compute), params["node_weight_IxH"].astype(compute).T)
            + params["node_bias_I"].astype(compute)), compute

  def log_probs(params, hidden_NxH):
    hidden_NxH, _ = _check_hidden(hidden_NxH)
    scores_NxI, compute = node_scores(params, hidden_NxH)
    scores_NxVxD = scores_NxI[:, jnp.asarray(tree.nodes_VxD)]
    return _path_log_prob(scores_NxVxD, jnp.asarray(tree.signs_VxD, compute),
                          jnp.asarray(tree.mask_VxD))

  def walk(params, hidden_NxH, key):
    compute = jnp.result_type(jnp.float32, hidden_NxH, params["node_weight_IxH"])
    hidden_NxH = hidden_NxH.astype(compute)
    children_Ix2 = jnp.asarray(tree.children_Ix2)

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

  return OutputHead(init, loss, log_prob, log_probs, sample_by_walk(walk, log_probs), sparse)
