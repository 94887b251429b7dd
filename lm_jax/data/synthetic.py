r"""A synthetic language with a known entropy rate: the embedded default corpus.

The language is a Markov chain of order 1 or 2 over ``V`` ordinary tokens. Each
transition row (one per context, ``S = V ** order`` contexts) mixes a shared Zipf
background with a sparse random component on ``k`` successors:

.. math::

   P(x_t = j \mid c) = (1 - \mu)\, z_j + \mu\, w_{c j}, \qquad
   z_j = \frac{j^{-\alpha}}{\sum_{m=1}^{V} m^{-\alpha}},

where ``w_c`` puts Dirichlet weights on ``k`` successors drawn without replacement
with probabilities ``z``. Drawing successors by ``z`` keeps the stationary unigram
distribution close to Zipf(alpha), and the background keeps every row of full support,
so the chain is ergodic and mixes at rate ``mu``. The entropy rate is exact:

.. math::

   H = -\sum_{c} \pi_c \sum_j P_{cj} \log_2 P_{cj},

with ``pi`` the stationary distribution over contexts (power iteration in float64).
A model's cross-entropy on a long sample cannot go below ``H`` (up to sampling noise),
so ``H`` is the target a trained language model should approach.

Defaults, chosen so that a small recurrent LM trained for about two minutes on two
CPU cores (1-2 M tokens seen) can get within 5% of ``H``: ``V = 256``, ``mu = 0.7``,
``k = 16``, alpha = 1 give ``H`` = 4.84-4.86 bits (perplexity ~29) against a unigram
entropy of 6.6 bits, so a model must learn the transitions, not just the frequencies;
the ``V * k`` = 4 096 successor weights are learnable from 1 M tokens (a bigram count
model with add-0.1 smoothing reaches ``H`` + 1%); the softmax stays small (260 ids
with the reserved tokens); the unigram curve fits alpha ~1.15 over ranks 10-256.

>>> lang = make_language(16, seed=0, num_successors=4)
>>> round(lang.entropy_rate_bits, 4), lang.transitions.shape
(2.6573, (16, 16))
>>> sample(lang, 12, seed=0).tolist()
[2, 15, 13, 0, 4, 6, 0, 2, 0, 6, 0, 0]

References:
  Cover & Thomas, Elements of Information Theory, 2nd ed., Theorem 4.2.4 (entropy
  rate of a stationary Markov chain); the lecture's cross-entropy bound (eq. 8.4).
"""
from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_VOCAB_SIZE = 256
DEFAULT_MIX = 0.7
DEFAULT_NUM_SUCCESSORS = 16
_MAX_TABLE = 1 << 22  # entries of the dense [V ** order, V] table (32 MiB of float64)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticLanguage:
  """A Markov language; contexts ``c`` index the last ``order`` tokens in base ``V``.

  Attributes:
    vocab_size: ``V``, ordinary tokens ``0..V-1`` (token ``j`` has Zipf rank ``j + 1``).
    order: Markov order (1 or 2).
    mix: ``mu``, the weight of the sparse component.
    background_V: the Zipf background ``z``.
    successors_SxK: the ``k`` successor tokens of every context.
    successor_probs_SxK: their Dirichlet weights (rows sum to 1).
    transitions_SxV: the dense transition table ``P`` (float64, rows sum to 1).
    stationary_S: the stationary distribution over contexts.
    unigram_V: the stationary distribution of single tokens.
    entropy_rate_bits: ``H`` in bits per token.
  """
  vocab_size: int
  order: int
  mix: float
  background_V: np.ndarray
  successors_SxK: np.ndarray
  successor_probs_SxK: np.ndarray
  transitions_SxV: np.ndarray
  stationary_S: np.ndarray
  unigram_V: np.ndarray
  entropy_rate_bits: float

  @property
  def transitions(self) -> np.ndarray:
    return self.transitions_SxV

  @property
  def stationary(self) -> np.ndarray:
    return self.stationary_S


def zipf_distribution(vocab_size: int, alpha: float = 1.0) -> np.ndarray:
  """``z_j`` proportional to ``(j + 1) ** -alpha``, float64 ``[V]``."""
  weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(alpha)
  return weights / weights.sum()


def stationary_distribution(transitions_SxV: np.ndarray, order: int, *,
                            tol: float = 1e-15, max_iters: int = 10_000) -> np.ndarray:
  """The stationary distribution over contexts, by power iteration in float64."""
  num_contexts, vocab_size = transitions_SxV.shape
  if num_contexts != vocab_size ** order:
    raise ValueError(f"transitions shape {transitions_SxV.shape} does not match order={order}")
  table = transitions_SxV.astype(np.float64).reshape(-1, vocab_size, vocab_size)
  pi = np.full((num_contexts // vocab_size, vocab_size), 1.0 / num_contexts)
  for _ in range(max_iters):
    # pi'[i, j] = sum_h pi[h, i] P[(h, i), j]; for order 1 h is a dummy axis of size 1.
    new = np.einsum("hi,hij->ij", pi, table)
    if order == 1:
      new = new.sum(0, keepdims=True)
    new /= new.sum()
    if np.abs(new - pi).sum() < tol:
      return new.reshape(-1)
    pi = new
  raise ValueError(f"power iteration did not converge in {max_iters} iterations "
                   "(is the chain ergodic? mix must be < 1)")


def entropy_rate_bits(transitions_SxV: np.ndarray, stationary_S: np.ndarray) -> float:
  r"""``-sum_c pi_c sum_j P_cj log2 P_cj`` with ``0 log 0 = 0``."""
  p = np.asarray(transitions_SxV, np.float64)
  plogp = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
  return float(-np.dot(stationary_S, plogp.sum(1)))


def make_language(vocab_size: int = DEFAULT_VOCAB_SIZE, *, seed: int, order: int = 1,
                  alpha: float = 1.0, mix: float = DEFAULT_MIX,
                  num_successors: int = DEFAULT_NUM_SUCCESSORS,
                  concentration: float = 1.0) -> SyntheticLanguage:
  r"""Draws a Markov language from a seed (see the module docstring for the model).

  Args:
    vocab_size: ``V`` ordinary tokens, >= 2.
    seed: the language is a deterministic function of the seed and the settings.
    order: 1 (bigram chain) or 2 (each token depends on the two before it);
      ``V ** (order + 1)`` must be at most 2 ** 22 (the dense table is kept).
    alpha: Zipf exponent of the background.
    mix: ``mu`` in [0, 1), the weight of the sparse component; 0 gives i.i.d. Zipf.
    num_successors: ``k``, sparse successors per context, in [1, V].
    concentration: Dirichlet concentration of the successor weights (smaller:
      peakier rows, lower entropy).

  Returns:
    A ``SyntheticLanguage`` with its exact ``entropy_rate_bits``.
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
  if vocab_size ** (order + 1) > _MAX_TABLE:
    raise ValueError(f"vocab_size={vocab_size} with order={order} needs a dense table of "
                     f"{vocab_size ** (order + 1)} entries > {_MAX_TABLE}")
  if not 0.0 <= mix < 1.0:
    raise ValueError(f"mix must be in [0, 1), got {mix}")
  if not 1 <= num_successors <= vocab_size:
    raise ValueError(f"num_successors must be in [1, vocab_size={vocab_size}], "
                     f"got {num_successors}")
  if alpha < 0 or concentration <= 0:
    raise ValueError(f"need alpha >= 0 and concentration > 0, got {alpha}, {concentration}")
  rng = np.random.default_rng([seed, order, vocab_size])
  num_contexts = vocab_size ** order
  z = zipf_distribution(vocab_size, alpha)
  # Gumbel top-k draws k successors without replacement with probabilities z, per context.
  keys = np.log(z) - np.log(-np.log(rng.random((num_contexts, vocab_size))))
  successors = np.argsort(-keys, axis=1, kind="stable")[:, :num_successors]
  weights = rng.dirichlet(np.full(num_successors, float(concentration)), size=num_contexts)
  table = np.broadcast_to((1.0 - mix) * z, (num_contexts, vocab_size)).copy()
  np.add.at(table, (np.arange(num_contexts)[:, None], successors), mix * weights)
  pi = stationary_distribution(table, order)
  unigram = pi.reshape(-1, vocab_size).sum(0)
  return SyntheticLanguage(
      vocab_size=vocab_size, order=order, mix=float(mix), background_V=z,
      successors_SxK=successors.astype(np.int64), successor_probs_SxK=weights,
      transitions_SxV=table, stationary_S=pi, unigram_V=unigram,
      entropy_rate_bits=entropy_rate_bits(table, pi))


def _inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
  return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def sample(lang: SyntheticLanguage, num_tokens: int, *, seed: int,
           num_chains: int | None = None) -> np.ndarray:
  r"""Samples ``num_tokens`` tokens, ``np.int32 [num_tokens]``.

  ``num_chains`` (default ``ceil(num_tokens / 2048)``) independent chains, each started
  from the stationary distribution, run in parallel (a Python loop over positions,
  vectorised over chains: each step draws the background by inverse CDF and the sparse
  component from the ``k``-entry successor table) and are concatenated. Every token is
  an exact draw from the chain except the first of each later chain, which is drawn
  from the stationary distribution instead of the transition row: about 1 token in
  2048. With ``num_chains=1`` the sample is one exact stationary chain.
  """
  if num_tokens < 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
  if num_tokens == 0:
    return np.zeros((0,), np.int32)
  v, order = lang.vocab_size, lang.order
  chains = num_chains if num_chains is not None else -(-num_tokens // 2048)
  if chains < 1:
    raise ValueError(f"num_chains must be >= 1, got {chains}")
  length = max(-(-num_tokens // chains), order)
  rng = np.random.default_rng([seed, 1])
  u_mix, u_bg, u_sparse = rng.random((3, length, chains))
  out_LxC = _inverse_cdf(np.cumsum(lang.background_V), u_bg)  # background draws
  use_sparse_LxC = u_mix < lang.mix
  context_C = _inverse_cdf(np.cumsum(lang.stationary_S), rng.random(chains))
  for i in range(order):  # the first `order` tokens spell the starting context
    out_LxC[i] = context_C // v ** (order - 1 - i) % v
  # Row c's successor CDF shifted by c: one sorted array, one searchsorted per step.
  cdf_SxK = np.cumsum(lang.successor_probs_SxK, axis=1)
  cdf_SxK[:, -1] = 1.0
  flat_cdf = (cdf_SxK + np.arange(len(cdf_SxK))[:, None]).reshape(-1)
  flat_successors = lang.successors_SxK.reshape(-1)
  num_contexts = v ** order
  for t in range(order, length):
    k_C = _inverse_cdf(flat_cdf, context_C + u_sparse[t])
    tok_C = np.where(use_sparse_LxC[t], flat_successors[k_C], out_LxC[t])
    out_LxC[t] = tok_C
    context_C = (context_C * v + tok_C) % num_contexts
  return out_LxC.T.reshape(-1)[:num_tokens].astype(np.int32)
