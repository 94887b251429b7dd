"""``lm-jax-train`` (``experiments/train_lm.py``): train a recurrent LM, evaluate, resume.

Every field of :class:`~lm_jax.train.config.TrainConfig` is a flag (``--helpfull``). With no
flags it trains on the embedded synthetic language; ``--text_path=my.txt`` trains on your
file. Rerunning the same command with the same ``--workdir`` resumes. SIGTERM or Ctrl-C
finishes the current step, saves a checkpoint and exits with 143 / 130; a NaN/Inf loss stops
with exit status 1 naming the step and the last good checkpoint; a mistake in the flags or
files prints one ``error:`` line and exits with 2.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from lm_jax.commands import cli
from lm_jax.train import run_logging
from lm_jax.train.config import TrainConfig
from lm_jax.train.trainer import NonFiniteLossError
from lm_jax.train.trainer import TrainingInterrupted
from lm_jax.train.trainer import train_and_evaluate


def define_flags() -> None:
  """One absl flag per config field, with its group and help (once per process)."""
  for group, field in TrainConfig.flag_fields():
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
              float: flags.DEFINE_float}.get(type(field.default), flags.DEFINE_string)
    define(field.name, field.default, f"[{group}] {field.metadata['help']}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off; progress comes below
  run_logging.configure_console()
  values = {f.name: flags.FLAGS[f.name].value for _, f in TrainConfig.flag_fields()}
  config = TrainConfig.from_flags(**values)
  try:
    train_and_evaluate(config)
  except TrainingInterrupted as e:
    run_logging.logger.error("%s", e)
    sys.exit(e.exit_code)
  except NonFiniteLossError as e:  # diverged: the last good checkpoint and metrics are kept
    run_logging.logger.error("%s", e)
    sys.exit(1)


def run() -> None:
  define_flags()
  cli.run(main)
