r"""Sample text from a train_lm.py workdir's latest checkpoint.

  python experiments/generate.py --workdir=runs/default --prompt="the" --temperature=0.8
  python experiments/generate.py --workdir=runs/timemachine --prompt="time traveller" \
      --num_tokens=200 --temperature=0     # greedy

Temperature T divides the logits: T < 1 peaky, T > 1 flat, T = 0 greedy (argmax).
"""

import jax
from absl import app
from absl import flags
from absl import logging

from lm_jax.data import text
from lm_jax.models import generation
from lm_jax.train import trainer

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "a train_lm.py workdir")
_PROMPT = flags.DEFINE_string("prompt", "", "text to continue (tokenized like the corpus); "
                              "empty starts from <eos>")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 100, "tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off
  config, vocab, model, params = trainer.load_trained(_WORKDIR.value)
  level = config.data.level if config.data.corpus == "text" else "word"
  prompt_tokens = text.tokenize(_PROMPT.value.lower() if config.data.lowercase else _PROMPT.value,
                                level) or ["<eos>"]
  ids = generation.generate(model, params, vocab.to_ids(prompt_tokens),
                            num_tokens=_NUM_TOKENS.value, key=jax.random.PRNGKey(_SEED.value),
                            temperature=_TEMPERATURE.value)
  print(generation.detokenize(prompt_tokens + vocab.to_tokens(ids), level))


if __name__ == "__main__":
  app.run(main)
