r"""Output layers over a vocabulary, exact and approximate, behind one interface.

Every factory returns an :class:`OutputHead` of pure functions (``init``, ``loss``,
``log_prob``, ``log_probs``, ``sample``, optional ``sparse``); see
:mod:`lm_jax.heads.base` for the contract. :func:`make_head` builds one by name, as
``train_lm.py --head=...`` does.
"""
from typing import Any

import numpy as np

from lm_jax.heads.base import OutputHead
from lm_jax.heads.base import RowSparse
from lm_jax.heads.base import full_softmax
from lm_jax.heads.base import sample_from_log_probs
from lm_jax.heads.base import sparse_sgd_step

HEAD_NAMES = ("full", "class", "hsm", "dsoftmax", "nce", "neg", "sampled")


def make_head(name: str, *, vocab_size: int, counts: Any = None, init_scale: float = 0.1,
              **options: Any) -> OutputHead:
  """The head called ``name`` (one of :data:`HEAD_NAMES`), built from training counts.

  Args:
    name: ``full``, ``class``, ``hsm``, ``dsoftmax``, ``nce``, ``neg`` or ``sampled``.
    vocab_size: ``V``.
    counts: ``[V]`` training-set count of each id (needed by every head but ``full``).
    init_scale: half-width of the uniform parameter initialisation.
    **options: the factory's own options (see each factory).

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
  raise NotImplementedError(f"head {name!r} is not implemented yet")
