r"""Output layers over a vocabulary, exact and approximate, behind one interface.

Every factory returns an :class:`OutputHead` of pure functions (``init``, ``loss``,
``log_prob``, ``log_probs``, ``sample``, optional ``sparse``); see
:mod:`lm_jax.heads.base` for the contract. :func:`make_head` builds one by name, as
``train_lm.py --head=...`` does.
"""
from typing import Any

import numpy as np

from lm_jax.heads import noise
from lm_jax.heads.adaptive import adaptive_softmax
from lm_jax.heads.adaptive import default_cutoffs
from lm_jax.heads.adaptive import params_from_torch
from lm_jax.heads.base import full_softmax
from lm_jax.heads.base import INVALID_SAMPLE
from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import params_hidden_size
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import sample_from_log_probs
from lm_jax.heads.base import sparse_sgd_step
from lm_jax.heads.class_based import class_softmax
from lm_jax.heads.class_hierarchy import class_hierarchy_softmax
from lm_jax.heads.class_based import word_classes
from lm_jax.heads.differentiated import differentiated_softmax
from lm_jax.heads.differentiated import parse_bands
from lm_jax.heads.hierarchical import hierarchical_softmax
from lm_jax.heads.noise import alias_table
from lm_jax.heads.noise import log_uniform_noise
from lm_jax.heads.noise import make_noise
from lm_jax.heads.noise import NoiseDistribution
from lm_jax.heads.noise import uniform_noise
from lm_jax.heads.noise import unigram_noise
from lm_jax.heads.sampled import nce
from lm_jax.heads.sampled import negative_sampling
from lm_jax.heads.sampled import sampled_softmax
from lm_jax.heads.trees import balanced_tree
from lm_jax.heads.trees import class_tree
from lm_jax.heads.trees import huffman_tree
from lm_jax.heads.trees import Tree

HEAD_NAMES = ("full", "class", "hsm", "dsoftmax", "nce", "neg", "sampled", "adaptive",
              "classtree")
TREE_KINDS = ("huffman", "balanced", "class")
_NOISE_OPTIONS = ("noise", "noise_power", "num_samples", "shared_samples")
# The keyword options make_head accepts for each head (train_lm's flags map onto these).
# ``implementation`` ("auto", "cpu", "accelerator"; lm_jax.ops.platform) goes to the heads
# that have a CPU-tuned form beside their accelerator form.
HEAD_OPTIONS = {"full": ("implementation",),
                "class": ("num_classes", "binning", "implementation"),
                "hsm": ("tree", "num_classes", "implementation"),
                "dsoftmax": ("bands", "implementation"), "nce": _NOISE_OPTIONS + ("log_z",),
                "neg": _NOISE_OPTIONS, "sampled": _NOISE_OPTIONS,
                "adaptive": ("cutoffs", "div_value", "implementation"), "classtree": ("levels",)}


def _make_tree(kind: str, counts: np.ndarray, num_classes: Any) -> Tree:
  if kind == "huffman":
    return huffman_tree(counts)
  if kind == "balanced":
    return balanced_tree(counts.size)
  if kind == "class":
    return class_tree(counts, num_classes or None)
  raise ValueError(f"unknown tree {kind!r}; expected one of {TREE_KINDS}")


def _log_z(value: Any) -> Any:
  if value == "learned":
    return value
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"log_z must be 'learned' or a number, got {value!r}") from None


def _cutoffs(value: Any) -> list[int]:
  """The cutoffs the user gave, or ``[]`` for the default ones."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return []
  if isinstance(value, str):
    try:
      return [int(v) for v in value.split(",")]
    except ValueError:
      raise ValueError(f"cutoffs must be comma-separated ints like '2000,10000', got "
                       f"{value!r}") from None
  return list(value)


def make_head(name: str, *, vocab_size: int, counts: Any = None, init_scale: float = 0.1,
              **options: Any) -> OutputHead:
  """The head called ``name`` (one of :data:`HEAD_NAMES`), built from training counts.

  Args:
    name: ``full``, ``class``, ``hsm``, ``dsoftmax``, ``nce``, ``neg``, ``sampled``,
      ``adaptive`` or ``classtree``.
    vocab_size: ``V``.
    counts: ``[V]`` training-set count of each id (needed by every head but ``full``).
    init_scale: half-width of the uniform parameter initialisation.
    **options: the factory's own options: ``class``: ``num_classes`` (0 or None: sqrt V),
      ``binning``; ``hsm``: ``tree`` (one of :data:`TREE_KINDS`), ``num_classes`` (class
      tree); ``dsoftmax``: ``bands`` (a list of ``(words, dims)`` or a string for
      :func:`parse_bands`; empty: the default bands); ``nce``, ``neg``, ``sampled``:
      ``noise`` (``unigram``, ``log_uniform``, ``uniform``), ``noise_power``,
      ``num_samples``, ``shared_samples``; ``nce`` also ``log_z`` (``"learned"`` or a
      number, fixed); ``adaptive``: ``cutoffs`` (ints or ``"2000,10000"``; empty:
      :func:`default_cutoffs` of the counts, keeping at ``init`` the clusters whose
      projection has at least 8 rows, and always the first), ``div_value``. The adaptive
      head maps ids to frequency ranks with the counts, so any vocabulary order works;
      ``classtree``: ``levels`` (1, 2 or 3 class levels above the words; default 2).
      ``full``, ``class``, ``hsm``, ``dsoftmax`` and ``adaptive`` also take
      ``implementation``: ``"auto"`` (default; the CPU-tuned form on a CPU, the accelerator
      form on GPU and TPU, chosen when the program is lowered), ``"cpu"`` or
      ``"accelerator"`` (:mod:`lm_jax.ops.platform`).

  Returns:
    An :class:`OutputHead`.
  """
  if name not in HEAD_NAMES:
    raise ValueError(f"unknown head {name!r}; expected one of {HEAD_NAMES}")
  unknown = sorted(set(options) - set(HEAD_OPTIONS[name]))
  if unknown:
    raise ValueError(f"head {name!r} does not take option(s) {unknown}; it takes "
                     f"{list(HEAD_OPTIONS[name])}")
  implementation = options.get("implementation", "auto")
  if name == "full":
    return full_softmax(vocab_size, init_scale=init_scale, implementation=implementation)
  if counts is None:
    raise ValueError(f"head {name!r} needs the training counts of each token id (counts=[V])")
  counts = np.asarray(counts)
  if counts.shape != (vocab_size,):
    raise ValueError(f"counts has shape {counts.shape}, expected [V] = ({vocab_size},)")
  get = options.get
  if name == "class":
    return class_softmax(counts, get("num_classes") or None, binning=get("binning", "equal"),
                         init_scale=init_scale, implementation=implementation)
  if name == "hsm":
    return hierarchical_softmax(_make_tree(get("tree", "huffman"), counts, get("num_classes")),
                                init_scale=init_scale, implementation=implementation)
  if name == "dsoftmax":
    bands = get("bands") or None
    return differentiated_softmax(counts, parse_bands(bands) if isinstance(bands, str) else bands,
                                  init_scale=init_scale, implementation=implementation)
  if name == "adaptive":
    cutoffs = _cutoffs(get("cutoffs"))
    # Default cutoffs adapt to H at init (kept: the first cluster, and the later ones whose
    # projection has >= 8 rows), so they are valid for every H >= 16 at div_value 4;
    # cutoffs the user gives are taken as given.
    return adaptive_softmax(vocab_size, cutoffs or default_cutoffs(counts),
                            div_value=get("div_value", 4.0), counts=counts,
                            init_scale=init_scale, min_projection=None if cutoffs else 8,
                            implementation=implementation)
  if name == "classtree":
    return class_hierarchy_softmax(counts, int(get("levels", 2)), init_scale=init_scale)
  noise_dist = make_noise(get("noise", "unigram"), vocab_size=vocab_size, counts=counts,
                          power=get("noise_power", 0.75))
  kw = dict(init_scale=init_scale, shared_samples=get("shared_samples", True))
  if name == "nce":
    return nce(noise_dist, get("num_samples", 64), log_z=_log_z(get("log_z", "learned")), **kw)
  factory = negative_sampling if name == "neg" else sampled_softmax
  return factory(noise_dist, get("num_samples", 64), **kw)
