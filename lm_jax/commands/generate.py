"""``lm-jax-generate`` (``experiments/generate.py``): sample text from a trained workdir.

  lm-jax-generate --workdir=runs/book --prompt="The " --num_tokens=200 --temperature=0.8

Temperature T divides the logits: T < 1 peaky, T > 1 flat, T = 0 greedy (argmax). The prompt
is tokenized as the training text was; a prompt that maps to ``<unk>`` gets a warning.
"""
import sys

import jax
from absl import flags
from absl import logging

from lm_jax.commands import cli
from lm_jax.models import generation
from lm_jax.train import evaluation
from lm_jax.train import trainer


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/default", "a lm-jax-train (train_lm.py) workdir")
  flags.DEFINE_string("prompt", "", "text to continue (tokenized like the corpus); empty "
                      "starts from a line break (<eos> where the text has none)")
  flags.DEFINE_integer("num_tokens", 100, "tokens to generate")
  flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy")
  flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off
  args = flags.FLAGS
  config, vocab, model, params = trainer.load_trained(args.workdir)
  tokenizer = evaluation.load_tokenizer(args.workdir, config)
  prompt_tokens, detokenize = evaluation.prompt_tokens(config, args.prompt, tokenizer=tokenizer)
  if not args.prompt and not all(t in vocab for t in prompt_tokens):
    prompt_tokens = ["<eos>"]  # the text had no line break to start from
  prompt_ids = vocab.to_ids(prompt_tokens)
  rate = evaluation.unk_rate(prompt_tokens, prompt_ids, vocab)
  if rate > 0:
    print(f"warning: {rate:.0%} of the prompt's {len(prompt_tokens)} tokens are not in the "
          "vocabulary and read as <unk>", file=sys.stderr)
  ids = generation.generate(model, params, prompt_ids, num_tokens=args.num_tokens,
                            key=jax.random.PRNGKey(args.seed), temperature=args.temperature)
  shown = prompt_tokens if args.prompt else []  # no prompt: the line break it starts from
  print(detokenize(shown + vocab.to_tokens(ids)))


def run() -> None:
  define_flags()
  cli.run(main)
