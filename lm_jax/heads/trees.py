r"""Binary trees over the vocabulary for the hierarchical softmax, built on the host in NumPy.

A :class:`Tree` stores, for every word, the padded path from the root to its leaf: the
inner nodes passed (``nodes_VxD``), the branch taken at each (``signs_VxD``: +1 for the
first child, -1 for the second) and which of the ``D`` slots are real (``mask_VxD``).
Inner nodes are numbered ``0 .. V-2`` breadth-first, so the root is 0. ``children_Ix2``
lets a sampler walk down: an entry ``c >= 0`` is inner node ``c``, an entry ``c < 0`` is
the leaf of word ``~c`` (that is ``-c - 1``).

References:
  Morin and Bengio, "Hierarchical probabilistic neural network language model",
  AISTATS 2005. Mikolov, Chen, Corrado and Dean, "Efficient estimation of word
  representations in vector space", 2013, Section 2.1 (Huffman codes, as in word2vec).
"""
import heapq
from typing import NamedTuple, Optional

import numpy as np

from lm_jax.heads import class_based


class Tree(NamedTuple):
  """Padded root-to-leaf paths of a binary tree with ``V`` leaves and ``I = V - 1`` inner nodes."""
  nodes_VxD: np.ndarray  # int32 inner-node ids along each path, root first; padding 0.
  signs_VxD: np.ndarray  # float32 +1 (first child) / -1 (second child); padding 0.
  mask_VxD: np.ndarray  # bool, True on the depth_V[w] real steps of word w.
  depth_V: np.ndarray  # int32 code length of each word.
  children_Ix2: np.ndarray  # int32 children of each inner node: >= 0 inner id, < 0 leaf ~word.
  num_inner: int  # I = V - 1.


class _Joiner:
  """Appends inner nodes; node ids are ``0 .. V-1`` for leaves, ``V + k`` for inner node k."""

  def __init__(self, vocab_size):
    self.vocab_size, self.first, self.second = vocab_size, [], []

  def join(self, first, second):
    self.first.append(first)
    self.second.append(second)
    return self.vocab_size + len(self.first) - 1

  def huffman(self, nodes, weights):
    """Huffman merges of ``nodes`` by weight (ties by insertion order); returns the root."""
    heap = [(float(w), i, int(n)) for i, (w, n) in enumerate(zip(weights, nodes))]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
      w_a, _, a = heapq.heappop(heap)
      w_b, _, b = heapq.heappop(heap)
      heapq.heappush(heap, (w_a + w_b, order, self.join(a, b)))
      order += 1
    return heap[0][2]

  def balanced(self, nodes):
    """Halves ``nodes`` recursively (first half the larger): depths differ by at most one."""
    nodes = [int(n) for n in nodes]

    def build(lo, hi):  # Recursion depth is only log2(len(nodes)).
      if hi - lo == 1:
        return nodes[lo]
      middle = lo + (hi - lo + 1) // 2
      return self.join(build(lo, middle), build(middle, hi))

    return build(0, len(nodes))

  def tree(self, root) -> Tree:
    """The padded-path :class:`Tree` of the joined nodes, inner nodes renumbered breadth-first."""
    vocab_size = self.vocab_size
    num_inner = vocab_size - 1
    if len(self.first) != num_inner:
      raise ValueError(f"a binary tree over V = {vocab_size} leaves needs {num_inner} inner "
                       f"nodes, got {len(self.first)}")
    children_Ix2 = np.stack([self.first, self.second], axis=1).astype(np.int64)
    # Breadth-first renumbering from the root, one vectorised step per level.
    order, level_of_inner = [], np.zeros(num_inner, np.int64)
    frontier, level = np.array([root - vocab_size]), 0
    while frontier.size:
      order.append(frontier)
      level_of_inner[frontier] = level
      below = children_Ix2[frontier].reshape(-1)
      frontier, level = below[below >= vocab_size] - vocab_size, level + 1
    order = np.concatenate(order)
    new_id = np.empty(num_inner, np.int64)
    new_id[order] = np.arange(num_inner)
    # parent (old inner index) and branch sign of every node id.
    parent = np.full(vocab_size + num_inner, -1, np.int64)
    sign = np.zeros(vocab_size + num_inner, np.float32)
    parent[children_Ix2[:, 0]] = np.arange(num_inner)
    parent[children_Ix2[:, 1]] = np.arange(num_inner)
    sign[children_Ix2[:, 0]], sign[children_Ix2[:, 1]] = 1.0, -1.0
    depth_V = level_of_inner[parent[:vocab_size]] + 1
    depth = int(depth_V.max())
    nodes_VxD = np.zeros((vocab_size, depth), np.int32)
    signs_VxD = np.zeros((vocab_size, depth), np.float32)
    current_V, words_V = np.arange(vocab_size), np.arange(vocab_size)
    for step in range(depth):  # Leaf to root, one vectorised step per level.
      active = step < depth_V
      column = depth_V[active] - 1 - step
      nodes_VxD[words_V[active], column] = new_id[parent[current_V[active]]]
      signs_VxD[words_V[active], column] = sign[current_V[active]]
      current_V = np.where(active, vocab_size + parent[current_V], current_V)
    encoded_Ix2 = np.where(children_Ix2 >= vocab_size, new_id[np.maximum(children_Ix2 - vocab_size, 0)],
                           ~children_Ix2)[order]
    mask_VxD = np.arange(depth)[None, :] < depth_V[:, None]
    return Tree(nodes_VxD, signs_VxD, mask_VxD, depth_V.astype(np.int32),
                encoded_Ix2.astype(np.int32), num_inner)


def huffman_tree(counts) -> Tree:
  r"""The Huffman tree of the counts (word2vec / fastText codes): frequent words get short paths.

  Minimises the expected path length :math:`\sum_w p_w\, d_w`, which lies in
  :math:`[\mathcal{H}(p), \mathcal{H}(p) + 1)` bits; heap-based, :math:`O(V \log V)`;
  zero counts are allowed (those words get the longest codes).

  Args:
    counts: ``[V]`` training counts, ``V >= 2``.

  Returns:
    A :class:`Tree`.

  >>> huffman_tree([5, 1, 1, 3]).depth_V.tolist()
  [1, 3, 3, 2]
  """
  counts = class_based.check_counts(counts)
  joiner = _Joiner(counts.shape[0])
  return joiner.tree(joiner.huffman(np.arange(counts.shape[0]), counts))


def balanced_tree(vocab_size: int) -> Tree:
  r"""A balanced binary tree: every word at depth :math:`\lfloor \log_2 V \rfloor` or
  :math:`\lceil \log_2 V \rceil` (the ids halved recursively, neighbours stay close).

  Args:
    vocab_size: ``V >= 2``.

  Returns:
    A :class:`Tree`.

  >>> balanced_tree(5).depth_V.tolist()
  [3, 3, 2, 2, 2]
  """
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
    raise ValueError(f"need a vocabulary of V >= 2 words, got vocab_size = {vocab_size}")
  joiner = _Joiner(int(vocab_size))
  return joiner.tree(joiner.balanced(np.arange(vocab_size)))


def class_tree(counts, num_classes: Optional[int] = None, *, binning: str = "mass",
               within: str = "huffman") -> Tree:
  r"""Two-level frequency-class tree: a Huffman tree over the classes of
  :func:`~lm_jax.heads.class_based.word_classes`, each leaf of which is the root of a binary
  tree over that class's words (Huffman over their counts, or ``within="balanced"``).

  It is still one binary tree of sigmoids, so :func:`hierarchical_softmax` walks it like any
  other; unlike the class softmax it needs no ``[C, M]`` padding.

  Args:
    counts: ``[V]`` training counts, ``V >= 2``.
    num_classes: ``C``; default :math:`\lceil \sqrt V \rceil`.
    binning: ``"mass"`` or ``"sqrt"`` (see ``word_classes``).
    within: ``"huffman"`` or ``"balanced"``, the tree inside each class.

  Returns:
    A :class:`Tree`.

  >>> class_tree([8, 4, 2, 1, 1], 2, within="balanced").depth_V.tolist()
  [1, 3, 3, 3, 3]
  """
  if within not in ("huffman", "balanced"):
    raise ValueError(f"within must be 'huffman' or 'balanced', got {within!r}")
  counts = class_based.check_counts(counts)
  _, _, members_CxM, mask_CxM = class_based.word_classes(counts, num_classes, binning=binning)
  joiner = _Joiner(counts.shape[0])
  class_roots, class_mass = [], []
  for members_M, mask_M in zip(members_CxM, mask_CxM):
    members = members_M[mask_M]
    class_roots.append(joiner.huffman(members, counts[members]) if within == "huffman"
                       else joiner.balanced(members))
    class_mass.append(counts[members].sum())
  return joiner.tree(joiner.huffman(class_roots, class_mass))


def expected_depth(tree: Tree, counts) -> float:
  """Average path length :math:`\\sum_w p_w d_w` under the unigram ``counts`` (bits per word)."""
  counts = class_based.check_counts(counts)
  return float(np.dot(counts, tree.depth_V) / counts.sum())


__all__ = ["Tree", "huffman_tree", "balanced_tree", "class_tree", "expected_depth"]
