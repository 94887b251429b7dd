r"""Sampling-based output heads: NCE, negative sampling and sampled softmax.

Each head scores the target and ``K`` ids drawn from a :class:`~lm_jax.heads.noise.NoiseDistribution`
with :math:`s(w, h) = h \cdot W_w + b_w`, so its training loss reads ``N + K`` rows of
``weight_VxH`` (shared draws) or ``N (K + 1)`` (per-token draws), O(H K) per token, not
O(H V). Evaluation is exact: ``log_prob``, ``log_probs`` and ``sample`` are those of
:func:`~lm_jax.heads.base.full_softmax` on the same ``weight_VxH`` and ``bias_V`` (for
negative sampling with the noise's :math:`\log q(w)` added to each score, the distribution
its optimum estimates; see :func:`negative_sampling`).

* ``shared_samples=True``: one set of ``K`` draws for the batch; the ``[N, K]`` noise
  scores are one ``[N, H] x [H, K]`` matmul. ``False``: ``K`` draws per token (a gathered
  ``[N, K, H]`` block and a batched dot).
* ``key=None`` in ``loss`` (or ``sparse.gather``) uses the fixed key ``PRNGKey(0)``, so the
  loss is deterministic as the :class:`~lm_jax.heads.base.OutputHead` contract requires;
  training must pass a fresh key each step.
* Zero-probability ids (zero-count ids under unigram noise, e.g. ``<pad>``) have
  :math:`\log q = -\infty`; wherever a head uses :math:`\log q` it floors it at
  :data:`MIN_LOG_NOISE` (``q >= e^{-50}``), so such a target gives a finite loss (NCE:
  ~0, the classifier is sure noise never makes it) and never a NaN.

References:
  Gutmann and Hyvarinen, "Noise-contrastive estimation", AISTATS 2010; Mnih and Teh,
  "A fast and simple algorithm for training neural probabilistic language models", ICML
  2012, Section 3; Mikolov et al., NeurIPS 2013, Section 2.2 (negative sampling); Jean et
  al., "On using very large target vocabulary for neural machine translation", ACL 2015,
  Section 3 (sampled softmax); TensorFlow ``tf.nn.sampled_softmax_loss``; Chen, Grangier
  and Auli, ACL 2016, Sections 3.4-3.5.
"""
import functools
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.heads import base
from lm_jax.heads.noise import NoiseDistribution

# Floor of log q(w) where a head uses it: q = 0 ids would otherwise give inf - inf = NaN.
MIN_LOG_NOISE = -50.0


def _check_noise(noise):
  if not isinstance(noise, NoiseDistribution):
    raise ValueError(f"noise must be a NoiseDistribution, got {type(noise).__name__}")


def _check_args(noise, num_samples):
  _check_noise(noise)
  if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
    raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")


class _Sampler(NamedTuple):
  """What the sampled loss draws and how it scores: the noise, ``K``, shared draws or not."""
  noise: NoiseDistribution
  num_samples: int
  shared_samples: bool
  scores_to_loss: Callable


def _init(full, bias_offset_V, learned_log_z, init_log_z, dtype, key, hidden_size):
  params = full.init(key, hidden_size)
  params["bias_V"] = params["bias_V"] + bias_offset_V.astype(dtype)
  if learned_log_z:
    params["log_z"] = jnp.asarray(init_log_z, dtype)
  return params


def _noise_call(noise, f, *args, tables):
  return f(*args) if noise.tables is None else f(*args, tables["noise"])


def _gather(sampler, params, targets_N, key, *, tables):
  noise, k = sampler.noise, sampler.num_samples
  targets_N = jnp.asarray(targets_N)
  n = targets_N.shape[0]
  key = jax.random.PRNGKey(0) if key is None else key
  samples = _noise_call(noise, noise.sample, key, (k,) if sampler.shared_samples else (n, k),
                        tables=tables)
  ids = jnp.concatenate([targets_N.astype(jnp.int32), samples.reshape(-1)])
  rows = {"weight_VxH": params["weight_VxH"][ids], "bias_V": params["bias_V"][ids]}
  index = {"weight_VxH": ids, "bias_V": ids}
  if "log_z" in params:
    rows["log_z"], index["log_z"] = params["log_z"], None
  # log of the expected count k q(w) of each scored id among the draws.
  log_kq = lambda ids: np.log(k) + jnp.maximum(
      _noise_call(noise, noise.log_prob, ids, tables=tables), MIN_LOG_NOISE)
  return rows, index, (targets_N, samples, log_kq(targets_N), log_kq(samples))


def _sparse_loss(sampler, rows, hidden_NxH, aux, *, where=None):
  targets_N, samples, log_kq_target_N, log_kq_samples = aux
  hidden_NxH = jnp.asarray(hidden_NxH)
  n, k = hidden_NxH.shape[0], sampler.num_samples
  ctype = jnp.result_type(jnp.float32, hidden_NxH, rows["weight_VxH"])
  h_NxH = hidden_NxH.astype(ctype)
  w_MxH, b_M = rows["weight_VxH"].astype(ctype), rows["bias_V"].astype(ctype)
  s_target_N = jnp.sum(h_NxH * w_MxH[:n], axis=-1) + b_M[:n]
  if sampler.shared_samples:
    s_noise_NxK = jnp.matmul(h_NxH, w_MxH[n:].T) + b_M[n:]
    hit_NxK = samples[None, :] == targets_N[:, None]
  else:
    w_NxKxH = w_MxH[n:].reshape(n, k, -1)
    s_noise_NxK = jnp.einsum("nh,nkh->nk", h_NxH, w_NxKxH) + b_M[n:].reshape(n, k)
    hit_NxK = samples == targets_N[:, None]
  log_kq_target_N = log_kq_target_N.astype(ctype)
  log_kq_noise_NxK = jnp.broadcast_to(log_kq_samples.astype(ctype), s_noise_NxK.shape)
  log_z = rows["log_z"].astype(ctype) if "log_z" in rows else None
  loss_N = sampler.scores_to_loss(s_target_N, s_noise_NxK, log_kq_target_N, log_kq_noise_NxK,
                                  hit_NxK, log_z)
  return loss_N if where is None else jnp.where(jnp.asarray(where), loss_N, 0.0)


def _shifted(params, tables):
  """Evaluation params: the full softmax of the scores plus ``eval_offset_V``."""
  if "eval_offset_V" not in tables:
    return params
  offset_V = tables["eval_offset_V"].astype(params["bias_V"].dtype)
  return {**params, "bias_V": params["bias_V"] + offset_V}


def _log_prob(full, params, hidden_NxH, targets_N, *, tables):
  return full.log_prob(_shifted(params, tables), hidden_NxH, targets_N)


def _log_probs(full, params, hidden_NxH, *, tables):
  return full.log_probs(_shifted(params, tables), hidden_NxH)


def _sample(full, params, hidden_NxH, key, *, temperature=1.0, tables):
  return full.sample(_shifted(params, tables), hidden_NxH, key, temperature=temperature)


def _sampled_head(noise, num_samples, shared_samples, init_scale, dtype, learned_log_z,
                  scores_to_loss, eval_offset_V=None, init_bias_V=0.0, init_log_z=0.0):
  r"""An :class:`OutputHead` whose loss is ``scores_to_loss(s_target_N, s_noise_NxK,
  log_kq_target_N, log_kq_noise_NxK, hit_NxK, log_z)`` on sampled rows; evaluation is the
  full softmax of the scores plus ``eval_offset_V`` ([V] constants, None for 0).

  ``init_bias_V`` (added to the random bias) and ``init_log_z`` place the initial model
  where its own loss is smallest for the uniform distribution :math:`p(w|x) = 1/V`. Scores
  near 0 would instead claim :math:`\hat p = 1` for every word under NCE: its first
  updates then push the words drawn as noise (the frequent ones) far down and leave the
  rarely drawn rare words on top, an exact perplexity in the millions."""
  _check_args(noise, num_samples)
  vocab_size = noise.vocab_size
  full = base.full_softmax(vocab_size, init_scale=init_scale, dtype=dtype)
  bias_offset_V = jnp.asarray(np.broadcast_to(init_bias_V, (vocab_size,)), jnp.float32)
  tables = {"noise": {} if noise.tables is None else noise.tables}
  if eval_offset_V is not None:
    tables["eval_offset_V"] = jnp.asarray(eval_offset_V, jnp.float32)
  sampler = _Sampler(noise, int(num_samples), shared_samples, scores_to_loss)
  partial = functools.partial
  sparse = base.RowSparse(partial(_gather, sampler), partial(_sparse_loss, sampler))
  init = partial(_init, full, bias_offset_V, learned_log_z, init_log_z, dtype)
  return base.with_target_contract(
      base.OutputHead(init, base.loss_from_sparse(sparse), partial(_log_prob, full),
                      partial(_log_probs, full), partial(_sample, full), sparse, tables),
      vocab_size)


def noise_log_prior(noise: NoiseDistribution) -> np.ndarray:
  r"""``[V]`` :math:`\log q(w)`, with ``q = 0`` ids floored at the smallest positive ``q``.

  Negative sampling's evaluation offset: a zero-count id keeps the probability of the
  rarest seen word rather than :math:`e^{-50}`, so an unseen test word costs what a rare
  one does, not 50 nats.
  """
  _check_noise(noise)
  log_q_V = np.asarray(noise.log_probs_V, np.float64)
  finite = np.isfinite(log_q_V)
  if not finite.any():
    raise ValueError("the noise distribution gives every id probability 0")
  return np.where(finite, log_q_V, log_q_V[finite].min())


def nce(noise: NoiseDistribution, num_samples: int, *, log_z: Union[str, float] = 0.0,
        shared_samples: bool = True, init_scale: float = 0.1, dtype=jnp.float32) -> base.OutputHead:
  r"""Noise-contrastive estimation (the lecture's NCE), self-normalised or with a learned log Z.

  The unnormalised model :math:`\hat p(w \mid x) = \exp(s(w, x) - \log Z)` is trained to
  tell the target from :math:`k` = ``num_samples`` noise draws :math:`w_j \sim q`:

  .. math::
    \hat p(D = 1 \mid w, x) = \frac{\hat p(w \mid x)}{\hat p(w \mid x) + k\, q(w)}
      = \sigma\big(s(w, x) - \log Z - \log(k\, q(w))\big), \\
    \ell = -\log \sigma(\mathrm{logit}(y)) - \sum_{j=1}^{k} \log \sigma(-\mathrm{logit}(w_j)).

  Args:
    noise: the noise distribution :math:`q`.
    num_samples: :math:`k`.
    log_z: a float (fixed; the default 0.0 is self-normalisation) or ``"learned"`` (a scalar
      param ``"log_z"``, initialised to :math:`\log V`; a fixed :math:`z` starts the biases
      at :math:`z - \log V`: either way the initial model is the uniform distribution).
    shared_samples: one set of draws for the batch (True) or per token (False).
    init_scale: half-width of the uniform initialisation of ``weight_VxH`` and ``bias_V``.
    dtype: parameter dtype.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead` with ``sparse`` rows; ``loss`` is ``[N]``.

  >>> from lm_jax.heads import noise as noise_lib
  >>> head = nce(noise_lib.uniform_noise(2), 2)  # k q = 1: every logit is s = 0
  >>> params = {"weight_VxH": jnp.zeros((2, 1)), "bias_V": jnp.zeros(2)}
  >>> print(jnp.round(head.loss(params, jnp.zeros((1, 1)), jnp.array([0])), 4))  # 3 log 2
  [2.0794]
  """
  if isinstance(log_z, str):
    if log_z != "learned":
      raise ValueError(f"log_z must be a float or 'learned', got {log_z!r}")
    learned, fixed_log_z = True, None
  else:
    learned, fixed_log_z = False, float(log_z)

  def scores_to_loss(s_target_N, s_noise_NxK, log_kq_target_N, log_kq_noise_NxK, hit_NxK, log_z):
    del hit_NxK  # NCE keeps accidental hits: they are genuine noise draws.
    z = log_z if learned else fixed_log_z
    logit_target_N = s_target_N - z - log_kq_target_N
    logit_noise_NxK = s_noise_NxK - z - log_kq_noise_NxK
    return (-jax.nn.log_sigmoid(logit_target_N)
            - jnp.sum(jax.nn.log_sigmoid(-logit_noise_NxK), axis=-1))

  # Uniform start: s - log Z = -log V (learned: log Z = log V; fixed: biases at z - log V).
  _check_args(noise, num_samples)
  log_v = float(np.log(noise.vocab_size))
  return _sampled_head(noise, num_samples, shared_samples, init_scale, dtype, learned,
                       scores_to_loss, init_bias_V=0.0 if learned else fixed_log_z - log_v,
                       init_log_z=log_v)


def negative_sampling(noise: NoiseDistribution, num_samples: int, *, shared_samples: bool = True,
                      init_scale: float = 0.1, dtype=jnp.float32) -> base.OutputHead:
  r"""Negative sampling (word2vec's simplification of NCE: no :math:`k\,q(w)`, no log Z).

  .. math::
    \ell = -\log \sigma(s(y, x)) - \sum_{j=1}^{k} \log \sigma(-s(w_j, x)), \quad w_j \sim q.

  Its expected loss in a context :math:`x`, :math:`\sum_w p(w|x)\,(-\log\sigma(s_w))
  + k\,q(w)\,(-\log\sigma(-s_w))`, is smallest at :math:`\sigma(s_w)/(1-\sigma(s_w))
  = p(w|x)/(k\,q(w))`, i.e. :math:`s_w = \log p(w|x) - \log(k\,q(w))`: the scores
  estimate a log ratio to the noise, not :math:`\log p`. So evaluation (``log_prob``,
  ``log_probs``, ``sample``) is the exactly normalised
  :math:`p(w|x) = \mathrm{softmax}_w(s_w + \log q(w))` (:func:`noise_log_prior`;
  :math:`\log k` cancels). A plain softmax of :math:`s` would favour each word by
  :math:`1/q(w)`, rare words most.

  Args: as :func:`nce` (without ``log_z``).

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead` with ``sparse`` rows; ``loss`` is ``[N]``.

  >>> from lm_jax.heads import noise as noise_lib
  >>> head = negative_sampling(noise_lib.uniform_noise(2), 3)
  >>> params = {"weight_VxH": jnp.zeros((2, 1)), "bias_V": jnp.zeros(2)}
  >>> print(jnp.round(head.loss(params, jnp.zeros((1, 1)), jnp.array([0])), 4))  # 4 log 2
  [2.7726]
  """
  def scores_to_loss(s_target_N, s_noise_NxK, log_kq_target_N, log_kq_noise_NxK, hit_NxK, log_z):
    del log_kq_target_N, log_kq_noise_NxK, hit_NxK, log_z
    return -jax.nn.log_sigmoid(s_target_N) - jnp.sum(jax.nn.log_sigmoid(-s_noise_NxK), axis=-1)

  _check_args(noise, num_samples)
  log_q_V = noise_log_prior(noise)
  # Uniform start: the minimiser for p = 1/V, s_w = -log V - log k - log q(w).
  return _sampled_head(noise, num_samples, shared_samples, init_scale, dtype, False,
                       scores_to_loss, eval_offset_V=log_q_V,
                       init_bias_V=-np.log(noise.vocab_size) - np.log(num_samples) - log_q_V)


def sampled_softmax(noise: NoiseDistribution, num_samples: int, *,
                    remove_accidental_hits: bool = True, shared_samples: bool = True,
                    init_scale: float = 0.1, dtype=jnp.float32) -> base.OutputHead:
  r"""Sampled softmax with the log-Q correction (TensorFlow's ``sampled_softmax_loss``).

  Cross-entropy against position 0 over the target and :math:`k` draws (with replacement,
  expected count :math:`k\,q(w)`), each logit corrected by its log expected count:

  .. math::
    o_0 = s(y, x) - \log(k\, q(y)), \quad o_j = s(w_j, x) - \log(k\, q(w_j)), \\
    \ell = \log \sum_{j=0}^{k} \exp(o_j) - o_0,

  where, with ``remove_accidental_hits``, draws equal to the target get
  :math:`o_j = ` the most negative float (excluded).

  Args: as :func:`nce` (without ``log_z``), plus ``remove_accidental_hits``.

  Returns:
    An :class:`~lm_jax.heads.base.OutputHead` with ``sparse`` rows; ``loss`` is ``[N]``.

  References:
    Jean et al., ACL 2015, Section 3; TensorFlow, ``tf.nn.sampled_softmax_loss``.

  >>> from lm_jax.heads import noise as noise_lib
  >>> head = sampled_softmax(noise_lib.uniform_noise(2), 3, remove_accidental_hits=False)
  >>> params = {"weight_VxH": jnp.zeros((2, 1)), "bias_V": jnp.zeros(2)}
  >>> print(jnp.round(head.loss(params, jnp.zeros((1, 1)), jnp.array([0])), 4))  # log 4
  [1.3863]
  """

  def scores_to_loss(s_target_N, s_noise_NxK, log_kq_target_N, log_kq_noise_NxK, hit_NxK, log_z):
    del log_z
    o_target_N = s_target_N - log_kq_target_N
    o_noise_NxK = s_noise_NxK - log_kq_noise_NxK
    if remove_accidental_hits:
      o_noise_NxK = jnp.where(hit_NxK, jnp.finfo(o_noise_NxK.dtype).min, o_noise_NxK)
    logits_NxK1 = jnp.concatenate([o_target_N[:, None], o_noise_NxK], axis=-1)
    return jax.nn.logsumexp(logits_NxK1, axis=-1) - o_target_N

  return _sampled_head(noise, num_samples, shared_samples, init_scale, dtype, False,
                       scores_to_loss)
