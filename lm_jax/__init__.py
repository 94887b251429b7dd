r"""lm_jax: JAX kernels, large-vocabulary output layers and recurrent language models.

Shape letters used in array names throughout the package (``logits_NxV`` is an
array of shape ``[N, V]``):

====  ==========================================================
B     batch (rows of a minibatch)
T     time (unrolled steps of truncated BPTT)
N     tokens, usually ``B * T`` flattened
V     vocabulary size
E     embedding size
H     hidden size
G     gate pre-activations (``H`` for Elman, ``3H`` GRU, ``4H`` LSTM)
C     word classes (class-based softmax)
D     tree depth (hierarchical softmax)
K     noise samples (NCE, negative sampling, sampled softmax)
F     features (log-linear models)
Y     candidate outputs of a log-linear model
P     devices
S     adaptive softmax head: shortlist words + one logit per cluster
R     adaptive softmax cluster projection size (``H // div_value**(i+1)``)
W     words of one adaptive softmax cluster
Q     nodes of one level of a class hierarchy (``classtree``)
====  ==========================================================

Logarithms are natural (nats) unless a function says ``bits`` or takes ``base``.

Where things live (each subpackage imports only the ones above it in this list):

=================  =======================================================================
``lm_jax.ops``     kernels: information theory, softmax, losses, fused linear + CE
``lm_jax.heads``   output layers over a vocabulary (full, class, hsm, dsoftmax, NCE, ...)
``lm_jax.models``  recurrent cells as a ``lax.scan``, the language model, generation
``lm_jax.data``    tokenization, vocabulary, corpora, synthetic language, Zipf, batching
``lm_jax.maxent``  log-linear (MaxEnt) models and n-gram features
``lm_jax.train``   train state and steps, optimizers, checkpoints, the loop, parallelism
``lm_jax.nnx``     Flax NNX layers over the heads and cells (``OutputLayer``, ``RNNLayer``)
``lm_jax.linen``   the same as Flax Linen modules
=================  =======================================================================

``import lm_jax`` loads JAX and NumPy only: ``maxent``, ``train``, ``nnx`` and ``linen``
(which need flax, optax, orbax or absl) and the names they own (``TrainState``,
``train_step``) load on first use.
"""

import importlib as _importlib

from lm_jax import data
from lm_jax import heads
from lm_jax import models
from lm_jax import ops
from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import synthetic
from lm_jax.data import text
from lm_jax.data import zipf
from lm_jax.data.text import Vocab
from lm_jax.heads import full_softmax
from lm_jax.heads import OutputHead
from lm_jax.models import language_model
from lm_jax.models import rnn
from lm_jax.models.language_model import LanguageModel
from lm_jax.models.language_model import make_language_model
from lm_jax.models.rnn import elman_cell
from lm_jax.models.rnn import gru_cell
from lm_jax.models.rnn import lstm_cell
from lm_jax.models.rnn import scan_layer
from lm_jax.ops import allocator
from lm_jax.ops.fused import linear_softmax_cross_entropy
from lm_jax.ops.info_theory import bits_per_token
from lm_jax.ops.info_theory import cross_entropy
from lm_jax.ops.info_theory import entropy
from lm_jax.ops.info_theory import perplexity
from lm_jax.ops.info_theory import relative_entropy
from lm_jax.ops.losses import nll
from lm_jax.ops.losses import sigmoid_binary_cross_entropy
from lm_jax.ops.losses import softmax_cross_entropy
from lm_jax.ops.losses import softmax_cross_entropy_with_integer_labels
from lm_jax.ops.softmax import log_softmax
from lm_jax.ops.softmax import logsumexp
from lm_jax.ops.softmax import softmax

# Loaded on first use (PEP 562), so that ``import lm_jax`` pulls in neither flax, optax,
# orbax, absl nor matplotlib: name -> (module, attribute or None for the module itself).
_LAZY = {
    "maxent": ("lm_jax.maxent", None),
    "loglinear": ("lm_jax.maxent.loglinear", None),
    "ngram": ("lm_jax.maxent.ngram", None),
    "train": ("lm_jax.train", None),
    "training": ("lm_jax.train.training", None),
    "TrainState": ("lm_jax.train.training", "TrainState"),
    "train_step": ("lm_jax.train.training", "train_step"),
    "nnx": ("lm_jax.nnx", None),
    "linen": ("lm_jax.linen", None),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'lm_jax' has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = _importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))



__version__ = "0.1.0"
