r"""Output layers over a vocabulary, exact and approximate, behind one interface.

Every factory returns an :class:`OutputHead` of pure functions (``init``, ``loss``,
``log_prob``, ``log_probs``, ``sample``, optional ``sparse``); see
:mod:`lm_jax.heads.base` for the contract. :func:`make_head` builds one by name, as
``train_lm.py --head=...`` does.
"""
from typing import Any

import numpy as np

from lm_jax.heads import noise
from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import full_softmax
from lm_jax.heads.base import sample_from_log_probs
from lm_jax.heads.base import sparse_sgd_step
from lm_jax.heads.class_based import class_softmax
from lm_jax.heads.class_based import word_classes
from lm_jax.heads.differentiated import differentiated_softmax
from lm_jax.heads.differentiated import parse_bands
from lm_jax.heads.hierarchical import hierarchical_softmax
from lm_jax.heads.noise import NoiseDistribution
from lm_jax.heads.noise import alias_table
from lm_jax.heads.noise import log_uniform_noise
from lm_jax.heads.noise import make_noise
from lm_jax.heads.noise import uniform_noise
from lm_jax.heads.noise import unigram_noise
from lm_jax.heads.sampled import nce
from lm_jax.heads.sampled import negative_sampling
from lm_jax.heads.sampled import sampled_softmax
from lm_jax.heads.trees import Tree
from lm_jax.heads.trees import balanced_tree
from lm_jax.heads.trees import class_tree
from lm_jax.heads.trees import huffman_tree

HEAD_NAMES = ("full", "class", "hsm", "dsoftmax", "nce", "neg", "sampled")
TREE_KINDS = ("huffman", "balanced", "class")


def _take(options, name, *keys):
  """Pops ``keys`` from ``options``; anything left over is an error naming the head."""
  taken = {k: options.pop(k) for k in keys if k in options}
  if options:
    raise ValueError(f"head {name!r} does not take option(s) {sorted(options)}; it takes "
                     f"{list(keys)}")
  return taken


def _noise(options, vocab_size, counts):
  name = options.pop("noise", "unigram")
  power = options.pop("noise_power", 0.75)
  return make_noise(name, vocab_size=vocab_size, counts=counts, power=power)


def make_head(name: str, *, vocab_size: int, counts: Any = None, init_scale: float = 0.1,
              **options: Any) -> OutputHead:
  """The head called ``name`` (one of :data:`HEAD_NAMES`), built from training counts.

  Args:
    name: ``full``, ``class``, ``hsm``, ``dsoftmax``, ``nce``, ``neg`` or ``sampled``.
    vocab_size: ``V``.
    counts: ``[V]`` training-set count of each id (needed by every head but ``full``).
    init_scale: half-width of the uniform parameter initialisation.
    **options: the factory's own options: ``class``: ``num_classes`` (0 or None: sqrt V),
      ``binning``; ``hsm``: ``tree`` (one of :data:`TREE_KINDS`), ``num_classes`` (class
      tree); ``dsoftmax``: ``bands`` (a list of ``(words, dims)`` or a string for
      :func:`parse_bands`; empty: the default bands); ``nce``, ``neg``, ``sampled``:
      ``noise`` (``unigram``, ``log_uniform``, ``uniform``), ``noise_power``,
      ``num_samples``, ``shared_samples``; ``nce`` also ``log_z`` (``"learned"`` or a
      number, fixed).

  Returns:
    An :class:`OutputHead`.
  """
  if name not in HEAD_NAMES:
    raise ValueError(f"unknown head {name!r}; expected one of {HEAD_NAMES}")
  if name == "full":
    if options:
      raise ValueError(f"head 'full' takes no options, got {sorted(options)}")
    return full_softmax(vocab_size, init_scale=init_scale)
  if counts is None:
    raise ValueError(f"head {name!r} needs the training counts of each token id (counts=[V])")
  counts = np.asarray(counts)
  if counts.shape != (vocab_size,):
    raise ValueError(f"counts has shape {counts.shape}, expected [V] = ({vocab_size},)")
  options = dict(options)
  if name == "class":
    kw = _take(options, name, "num_classes", "binning")
    return class_softmax(counts, kw.pop("num_classes", None) or None, init_scale=init_scale, **kw)
  if name == "hsm":
    kw = _take(options, name, "tree", "num_classes")
    tree_kind = kw.get("tree", "huffman")
    if tree_kind == "huffman":
      tree = huffman_tree(counts)
    elif tree_kind == "balanced":
      tree = balanced_tree(vocab_size)
    elif tree_kind == "class":
      tree = class_tree(counts, kw.get("num_classes") or None)
    else:
      raise ValueError(f"unknown tree {tree_kind!r}; expected one of {TREE_KINDS}")
    return hierarchical_softmax(tree, init_scale=init_scale)
  if name == "dsoftmax":
    bands = _take(options, name, "bands").get("bands") or None
    if isinstance(bands, str):
      bands = parse_bands(bands)
    return differentiated_softmax(counts, bands, init_scale=init_scale)
  noise_dist = _noise(options, vocab_size, counts)
  num_samples = options.pop("num_samples", 64)
  if name == "nce":
    kw = _take(options, name, "shared_samples", "log_z")
    log_z = kw.pop("log_z", "learned")
    if log_z != "learned":
      try:
        log_z = float(log_z)
      except (TypeError, ValueError):
        raise ValueError(f"log_z must be 'learned' or a number, got {log_z!r}") from None
    return nce(noise_dist, num_samples, log_z=log_z, init_scale=init_scale, **kw)
  kw = _take(options, name, "shared_samples")
  factory = negative_sampling if name == "neg" else sampled_softmax
  return factory(noise_dist, num_samples, init_scale=init_scale, **kw)
