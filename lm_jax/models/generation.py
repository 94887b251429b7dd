r"""Sampling text from a trained recurrent LM, with the lecture's softmax temperature.

Each next token is drawn from :math:`\mathrm{softmax}(z / T)`: :math:`T < 1` sharpens
the distribution (peaky, repetitive text), :math:`T > 1` flattens it (towards uniform),
and :math:`T = 0` is greedy decoding (argmax).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm_jax.models import language_model as lm_lib


def generate(model: lm_lib.LanguageModel, params: Any, prompt_ids: np.ndarray, *,
             num_tokens: int, key: jax.Array, temperature: float = 1.0) -> np.ndarray:
  """Continues ``prompt_ids`` ([T0] ints, T0 >= 1) with ``num_tokens`` sampled ids.

  The prompt is run through the model in one scan to build the hidden state; then a
  ``lax.scan`` alternates sampling from the head and one recurrent step.
  """
  prompt_ids = np.asarray(prompt_ids, np.int32)
  if prompt_ids.ndim != 1 or prompt_ids.size == 0:
    raise ValueError(f"prompt_ids must be a non-empty 1-D array, got shape {prompt_ids.shape}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  tokens = np.asarray(_generate(model, params, jnp.asarray(prompt_ids)[None, :], key,
                                num_tokens, float(temperature)))
  bad = np.flatnonzero(tokens < 0)  # heads.INVALID_SAMPLE: a non-finite hidden state
  if bad.size:
    raise ValueError(f"the model's hidden state became non-finite (NaN or Inf) at generated "
                     f"token {int(bad[0])}: nothing can be sampled from it (are the params "
                     "finite?)")
  return tokens


@jax.jit(static_argnums=(0, 4, 5))
def _generate(model, params, prompt_1xT, key, num_tokens, temperature):
  hidden_1xTxH, state = model.hidden(params, prompt_1xT, model.initial_state(1))

  def step(carry, step_key):
    h_1xH, state = carry
    token_1 = model.head.sample(model.head_params(params), h_1xH, step_key, temperature=temperature)
    # -1 (a non-finite row) is fed back as id 0 and reported after the scan.
    hidden, state = model.hidden(params, jnp.maximum(token_1, 0)[:, None].astype(jnp.int32), state)
    return (hidden[:, -1], state), token_1[0]

  _, tokens = lax.scan(step, (hidden_1xTxH[:, -1], state), jax.random.split(key, num_tokens))
  return tokens


def detokenize(tokens: list[str], level: str) -> str:
  """Text for tokens of the older levels: ``char`` joined, ``word`` spaced; ``<eos>`` is a
  line break (``lm_jax.data.tokenizers.TextTokenizer.detokenize`` covers all four)."""
  joined = "".join(tokens) if level == "char" else " ".join(tokens)
  return joined.replace(" <eos> ", "\n").replace("<eos>", "\n")
