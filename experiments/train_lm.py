r"""Train a recurrent language model with truncated BPTT; evaluate perplexity; resume on rerun.

With no flags it trains on the embedded synthetic language (no files needed) and reports
validation cross-entropy beside the language's true entropy rate. Examples:

  python experiments/train_lm.py
  python experiments/train_lm.py --corpus=ptb --cell=lstm --layers=2 --hidden=200 \
      --embed=200 --batch_size=20 --bptt=20 --optimizer=sgd --lr=1 --lr_schedule=zaremba \
      --lr_decay_start=4 --clip=5 --grad_reduction=sum_over_time --epochs=13 \
      --workdir=runs/ptb_lstm

The same program is the ``lm-jax-train`` command of the installed package. Rerunning the
same command with the same --workdir resumes from the latest checkpoint. A mistake in the
flags or files prints one ``error:`` line and exits with status 2.
SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits with 143 / 130.
A NaN/Inf loss or gradient (a diverging run) stops it with exit code 1, naming the step and
the last good checkpoint (--skip_nonfinite skips such updates instead).

Several devices: the batch rows are split over all of them (--parallel=auto). Several
processes (hosts): start the same command in each with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the JAX_* environment variables).
"""

from lm_jax.commands import train

if __name__ == "__main__":
  train.run()
