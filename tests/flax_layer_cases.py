"""Heads, sizes and inputs shared by the Flax layer tests (nnx_test.py, linen_test.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import heads

N, H, V, E, B, T = 6, 4, 9, 3, 2, 5
COUNTS_V = np.array([0, 3, 1, 9, 5, 2, 7, 4, 6])
HEADS = {
    "full": lambda: heads.full_softmax(V, init_scale=0.5),
    "class": lambda: heads.make_head("class", vocab_size=V, counts=COUNTS_V),
    "hsm": lambda: heads.make_head("hsm", vocab_size=V, counts=COUNTS_V),
    "dsoftmax": lambda: heads.make_head("dsoftmax", vocab_size=V, counts=COUNTS_V,
                                        bands="3:3,6:1"),
    "nce": lambda: heads.make_head("nce", vocab_size=V, counts=COUNTS_V, num_samples=3),
    "neg": lambda: heads.make_head("neg", vocab_size=V, counts=COUNTS_V, num_samples=3),
    "sampled": lambda: heads.make_head("sampled", vocab_size=V, counts=COUNTS_V, num_samples=3),
}
FAST = ("full", "class", "hsm")


def head_names(names):
  """``names`` as parametrize values, those outside FAST marked slow."""
  return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def data(seed=0):
  """``(hidden_NxH, targets_N)``."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(0, 1.5, (N, H)), jnp.float32),
          jnp.asarray(rng.integers(0, V, (N,)), jnp.int32))
