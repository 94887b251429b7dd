r"""Sampling text from a trained recurrent LM, with the lecture's softmax temperature.

Each next token is drawn from :math:`\mathrm{softmax}(z / T)`: :math:`T < 1` sharpens
the distribution (peaky, repetitive text), :math:`T > 1` flattens it (towards uniform),
and :math:`T = 0` is greedy decoding (argmax).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm_jax import checkpointing
from lm_jax import language_model as lm_lib
from lm_jax import text
from lm_jax import training
from lm_jax.config import TrainConfig, model_fingerprint


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
  return np.asarray(_generate(model, params, jnp.asarray(prompt_ids)[None, :], key,
                              num_tokens, float(temperature)))


@jax.jit(static_argnums=(0, 4, 5))
def _generate(model, params, prompt_1xT, key, num_tokens, temperature):
  hidden_1xTxH, state = model.hidden(params, prompt_1xT, model.initial_state(1))

  def step(carry, step_key):
    h_1xH, state = carry
    token_1 = model.head.sample(model.head_params(params), h_1xH, step_key, temperature=temperature)
    hidden, state = model.hidden(params, token_1[:, None].astype(jnp.int32), state)
    return (hidden[:, -1], state), token_1[0]

  _, tokens = lax.scan(step, (hidden_1xTxH[:, -1], state), jax.random.split(key, num_tokens))
  return tokens


def load_trained(workdir: str) -> tuple[TrainConfig, text.Vocab, lm_lib.LanguageModel, Any]:
  """Config, vocabulary, model and the newest checkpoint's parameters of a workdir."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a train_lm.py workdir?")
  with open(config_path) as f:
    config = TrainConfig(**json.load(f))
  vocab = text.Vocab.load(os.path.join(workdir, "vocab.json"))
  from lm_jax.trainer import COUNTS_FILE, build_model  # pylint: disable=g-import-not-at-top
  counts = None
  counts_path = os.path.join(workdir, COUNTS_FILE)
  if os.path.exists(counts_path):  # workdirs from before the heads issue have none (full only)
    with open(counts_path) as f:
      counts = json.load(f)
  elif config.head != "full":
    raise FileNotFoundError(f"{counts_path} not found: head {config.head!r} is built from the "
                            "training counts train_lm.py saves there")
  model = build_model(config, len(vocab), counts)
  optimizer = training.make_optimizer(config.optimizer, config.lr, clip=config.clip or None,
                                      weight_decay=config.weight_decay)
  abstract = jax.eval_shape(lambda: training.create_train_state(
      model, optimizer, seed=config.seed, batch_size=config.batch_size))
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  restored = checkpointing.restore_latest(manager, abstract,
                                          model_fingerprint(config, len(vocab)))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  return config, vocab, model, restored[1].params


def detokenize(tokens: list[str], level: str) -> str:
  joined = "".join(tokens) if level == "char" else " ".join(tokens)
  return joined.replace(" <eos> ", "\n").replace("<eos>", "\n")



