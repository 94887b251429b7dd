r"""Noise distributions over the vocabulary for NCE, negative sampling and sampled softmax.

A :class:`NoiseDistribution` holds the exact ``[V]`` log-probabilities :math:`\log q` and
two pure, jit-able functions: ``sample(key, shape)`` draws ids in O(1) each, and
``log_prob(ids)`` gathers :math:`\log q`. Three factories:

* :func:`unigram_noise`: :math:`q(w) \propto c(w)^{\alpha}` (word2vec's ``alpha = 0.75``),
  sampled with Walker's alias method, whose table :func:`alias_table` builds on the host
  with Vose's O(V) algorithm. Zero-count ids get :math:`q = 0` (``log q = -inf``) and are
  never drawn; the heads floor :math:`\log q` where they use it (see
  :mod:`lm_jax.heads.sampled`).
* :func:`log_uniform_noise`: TensorFlow's ``log_uniform_candidate_sampler`` (Zipfian),
  :math:`q(k) = \log\frac{k+2}{k+1} / \log(V+1)`, sampled in closed form.
* :func:`uniform_noise`: :math:`q = 1/V`.

References:
  Walker, "An efficient method for generating discrete random variables with general
  distributions", ACM TOMS 1977; Vose, "A linear algorithm for generating random numbers
  with a given distribution", IEEE TSE 1991.
  Mikolov et al., "Distributed representations of words and phrases and their
  compositionality", NeurIPS 2013, Section 2.2 (the 3/4 power).
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

NOISE_NAMES = ("unigram", "log_uniform", "uniform")


class NoiseDistribution(NamedTuple):
  """``vocab_size``; ``log_probs_V`` (exact :math:`\\log q`, ``-inf`` where ``q = 0``);
  ``sample(key, shape, tables=None) -> int32 ids``; ``log_prob(ids, tables=None) -> log
  q(ids)`` (float32); ``tables``: the arrays both read (``log_probs_V``, and the alias
  table for unigram noise), to pass as arguments under ``jit`` (``None``: these)."""
  vocab_size: int
  log_probs_V: jax.Array
  sample: Callable[..., jax.Array]
  log_prob: Callable[..., jax.Array]
  tables: Optional[dict] = None  # None: sample(key, shape) and log_prob(ids) take no tables


def _distribution(vocab_size, log_probs_V, draw, **extra_tables):
  """A :class:`NoiseDistribution` whose ``draw(key, shape, tables)`` and gather of
  ``log_probs_V`` read their arrays from ``tables`` (the distribution's own by default)."""
  own = {"log_probs_V": log_probs_V, **extra_tables}

  def sample(key, shape, tables=None):
    return draw(key, shape, own if tables is None else tables)

  def log_prob(ids, tables=None):
    return (own if tables is None else tables)["log_probs_V"][jnp.asarray(ids)]

  return NoiseDistribution(vocab_size, log_probs_V, sample, log_prob, own)


def alias_table(probs: Any) -> tuple[np.ndarray, np.ndarray]:
  r"""Walker's alias table of a distribution, built with Vose's O(V) algorithm (NumPy, host).

  Draw a column :math:`i` uniformly, keep it with probability ``prob_V[i]``, else take
  ``alias_V[i]``; the implied distribution is

  .. math::
    p(w) = \frac{1}{V}\Big(\mathrm{prob}_w + \sum_{i:\, \mathrm{alias}_i = w} (1 - \mathrm{prob}_i)\Big).

  Args:
    probs: ``[V]`` non-negative weights (normalised here; need not sum to 1).

  Returns:
    ``(prob_V, alias_V)``: float64 keep-probabilities in [0, 1] and int32 alias ids.
    Zero-weight ids have ``prob = 0`` and are never anyone's alias, so they are never drawn.

  >>> prob_V, alias_V = alias_table([0.1, 0.2, 0.3, 0.4])
  >>> prob_V.round(4).tolist(), alias_V.tolist()  # p(3) = (0.8 + 0.6 + 0.2) / 4
  ([0.4, 0.8, 1.0, 0.8], [3, 3, 2, 2])
  """
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 1 or probs.size == 0:
    raise ValueError(f"probs must be a non-empty [V] vector, got shape {probs.shape}")
  if not np.all(np.isfinite(probs)) or np.any(probs < 0) or probs.sum() <= 0:
    raise ValueError("probs must be finite, non-negative and not all zero, got "
                     f"min {probs.min()}, sum {probs.sum()}")
  v = probs.size
  scaled = probs * (v / probs.sum())
  prob_V = np.zeros(v, np.float64)
  alias_V = np.arange(v, dtype=np.int32)
  small = [int(i) for i in np.flatnonzero(scaled < 1.0)]
  large = [int(i) for i in np.flatnonzero(scaled >= 1.0)]
  while small and large:
    less, more = small.pop(), large.pop()
    prob_V[less] = scaled[less]
    alias_V[less] = more
    scaled[more] = (scaled[more] + scaled[less]) - 1.0
    (small if scaled[more] < 1.0 else large).append(more)
  # What is left is 1 up to rounding; a zero-weight id keeps probability 0 whatever happens.
  for i in small + large:
    prob_V[i] = 1.0 if probs[i] > 0 else 0.0
  return prob_V, alias_V


def unigram_noise(counts: Any, power: float = 0.75) -> NoiseDistribution:
  r"""Unigram noise raised to a power, :math:`q(w) = c(w)^\alpha / \sum_v c(v)^\alpha`.

  Sampling uses the alias method: one uniform int, one uniform float and a select per draw.

  Args:
    counts: ``[V]`` non-negative training counts per id (zeros allowed: never drawn).
    power: :math:`\alpha \ge 0` (0 gives uniform over the seen ids, 1 the unigram).

  Returns:
    A :class:`NoiseDistribution`; ``log_probs_V`` is ``-inf`` at zero-count ids.

  >>> noise = unigram_noise([9, 1, 0, 0], power=0.5)
  >>> print(np.round(np.exp(np.asarray(noise.log_probs_V)), 4))
  [0.75 0.25 0.   0.  ]
  """
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"counts must be a non-empty [V] vector, got shape {counts.shape}")
  if np.any(counts < 0) or not np.any(counts > 0):
    raise ValueError(f"counts must be non-negative with at least one positive count, got "
                     f"min {counts.min()}, max {counts.max()}")
  if not power >= 0:
    raise ValueError(f"power must be >= 0, got {power}")
  weights = np.where(counts > 0, np.power(counts.astype(np.float64), power), 0.0)
  probs = weights / weights.sum()
  prob_V, alias_V = alias_table(probs)
  keep_V, alias_V = jnp.asarray(prob_V, jnp.float32), jnp.asarray(alias_V)
  with np.errstate(divide="ignore"):
    log_probs_V = jnp.asarray(np.log(probs), jnp.float32)
  v = counts.size

  def draw(key, shape, tables):
    k_column, k_keep = jax.random.split(key)
    column = jax.random.randint(k_column, shape, 0, v, jnp.int32)
    keep = jax.random.uniform(k_keep, shape) < tables["keep_V"][column]
    return jnp.where(keep, column, tables["alias_V"][column])

  return _distribution(v, log_probs_V, draw, keep_V=keep_V, alias_V=alias_V)


def log_uniform_noise(vocab_size: int) -> NoiseDistribution:
  r"""TensorFlow's log-uniform (Zipfian) candidate sampler over ids ``0..V-1``.

  .. math::
    q(k) = \frac{\log(k + 2) - \log(k + 1)}{\log(V + 1)}, \qquad
    k = \lfloor \exp(u \log(V + 1)) \rfloor - 1,\ u \sim U[0, 1).

  It suits ids sorted by decreasing frequency. ``u`` is assembled from 23 + 24 random bits
  so that, in float32, tail ids of a large vocabulary are not skipped; float32 rounding of
  :math:`\exp` still moves the bin edges by a relative ~1e-7.

  Args:
    vocab_size: ``V``.

  Returns:
    A :class:`NoiseDistribution`.

  References:
    TensorFlow, ``tf.random.log_uniform_candidate_sampler``.

  >>> print(np.round(np.exp(np.asarray(log_uniform_noise(3).log_probs_V)), 4))
  [0.5    0.2925 0.2075]
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  k = np.arange(vocab_size, dtype=np.float64)
  log_range = np.log(vocab_size + 1.0)
  log_probs_V = jnp.asarray(np.log(np.log1p(1.0 / (k + 1.0))) - np.log(log_range), jnp.float32)

  def draw(key, shape, tables):
    del tables  # closed form
    k_high, k_low = jax.random.split(key)
    u_high = jax.random.randint(k_high, shape, 0, 2**23, jnp.int32).astype(jnp.float32) * 2.0**-23
    u_low = jax.random.uniform(k_low, shape) * 2.0**-23
    x = jnp.exp(u_high * log_range) * jnp.exp(u_low * log_range)
    return jnp.clip(jnp.floor(x).astype(jnp.int32) - 1, 0, vocab_size - 1)

  return _distribution(vocab_size, log_probs_V, draw)


def uniform_noise(vocab_size: int) -> NoiseDistribution:
  """Uniform noise, :math:`q = 1/V`.

  >>> noise = uniform_noise(4)
  >>> print(np.round(float(noise.log_prob(2)), 4))
  -1.3863
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  log_probs_V = jnp.full((vocab_size,), -np.log(vocab_size), jnp.float32)

  def draw(key, shape, tables):
    del tables
    return jax.random.randint(key, shape, 0, vocab_size, jnp.int32)

  return _distribution(vocab_size, log_probs_V, draw)


def make_noise(name: str, *, vocab_size: int, counts: Optional[Any] = None,
               power: float = 0.75) -> NoiseDistribution:
  """The noise distribution called ``name``: ``unigram`` (needs ``counts``), ``log_uniform``
  or ``uniform``."""
  if name not in NOISE_NAMES:
    raise ValueError(f"unknown noise {name!r}; expected one of {NOISE_NAMES}")
  if name == "unigram":
    if counts is None:
      raise ValueError("unigram noise needs the training counts of each token id (counts=[V])")
    if np.shape(counts) != (vocab_size,):
      raise ValueError(f"counts has shape {np.shape(counts)}, expected [V] = ({vocab_size},)")
    return unigram_noise(counts, power=power)
  if name == "log_uniform":
    return log_uniform_noise(vocab_size)
  return uniform_noise(vocab_size)
