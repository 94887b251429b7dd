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
====  ==========================================================

Logarithms are natural (nats) unless a function says ``bits`` or takes ``base``.
"""

from lm_jax import allocator
from lm_jax import batching
from lm_jax import corpora
from lm_jax import heads
from lm_jax import language_model
from lm_jax import loglinear
from lm_jax import rnn
from lm_jax import synthetic
from lm_jax import text
from lm_jax import training
from lm_jax import zipf
from lm_jax.fused import linear_softmax_cross_entropy
from lm_jax.heads import OutputHead
from lm_jax.heads import full_softmax
from lm_jax.info_theory import bits_per_token
from lm_jax.info_theory import cross_entropy
from lm_jax.info_theory import entropy
from lm_jax.info_theory import kl_divergence
from lm_jax.info_theory import perplexity
from lm_jax.language_model import LanguageModel
from lm_jax.language_model import make_language_model
from lm_jax.losses import nll
from lm_jax.losses import sigmoid_binary_cross_entropy
from lm_jax.losses import softmax_cross_entropy
from lm_jax.losses import softmax_cross_entropy_with_integer_labels
from lm_jax.rnn import elman_cell
from lm_jax.rnn import gru_cell
from lm_jax.rnn import lstm_cell
from lm_jax.rnn import scan_layer
from lm_jax.softmax import log_softmax
from lm_jax.softmax import logsumexp
from lm_jax.softmax import softmax
from lm_jax.text import Vocab
from lm_jax.training import TrainState
from lm_jax.training import train_step

allocator.apply_at_import()  # CPU-only JAX on glibc: see lm_jax.allocator (opt-out env var)

__version__ = "0.1.0"
