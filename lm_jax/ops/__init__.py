"""Kernels: information theory, stable softmax, losses with closed-form gradients, and the
fused linear + cross-entropy that never builds ``[N, V]`` logits. JAX and NumPy only.

``allocator`` sits here beside them: the glibc malloc setting that keeps XLA:CPU's large
temporaries off fresh pages, which an application may choose explicitly (no kernel applies
it; importing lm_jax changes nothing in the process).
"""

from lm_jax.ops import allocator
from lm_jax.ops import fused
from lm_jax.ops import info_theory
from lm_jax.ops import losses
from lm_jax.ops import softmax as softmax_lib
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
