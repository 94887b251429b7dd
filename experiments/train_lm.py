r"""Train a recurrent language model with truncated BPTT; evaluate perplexity; resume on rerun.

With no flags it trains on the embedded synthetic language (no files needed) and reports
validation cross-entropy beside the language's true entropy rate. Examples:

  python experiments/train_lm.py
  python experiments/train_lm.py --corpus=ptb --cell=lstm --layers=2 --hidden=200 \
      --embed=200 --batch_size=20 --bptt=20 --optimizer=sgd --lr=1 --lr_schedule=zaremba \
      --lr_decay_start=4 --clip=5 --grad_reduction=sum_over_time --epochs=13 \
      --workdir=runs/ptb_lstm

Rerunning the same command with the same --workdir resumes from the latest checkpoint.
SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits with 143 / 130.
A NaN/Inf loss or gradient (a diverging run) stops it with exit code 1, naming the step and
the last good checkpoint (--skip_nonfinite skips such updates instead).

Several devices: the batch rows are split over all of them (--parallel=auto). Several
processes (hosts): start the same command in each with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the JAX_* environment variables).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from lm_jax.train import run_logging
from lm_jax.train.config import TrainConfig
from lm_jax.train.trainer import NonFiniteLossError, TrainingInterrupted, train_and_evaluate

# One flag per TrainConfig field, with the default and help text declared there.
for _group, _field in TrainConfig.flag_fields():
  _define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
             float: flags.DEFINE_float}.get(type(_field.default), flags.DEFINE_string)
  _define(_field.name, _field.default, f"[{_group}] {_field.metadata['help']}")

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off; progress comes below
  run_logging.configure_console()
  config = TrainConfig.from_flags(**{f.name: FLAGS[f.name].value
                                     for _, f in TrainConfig.flag_fields()})
  try:
    train_and_evaluate(config)
  except TrainingInterrupted as e:
    run_logging.logger.error("%s", e)
    sys.exit(e.exit_code)
  except NonFiniteLossError as e:  # diverged: the last good checkpoint and metrics are kept
    run_logging.logger.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
