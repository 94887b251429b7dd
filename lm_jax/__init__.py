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
