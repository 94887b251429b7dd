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

Several devices: the batch rows are split over all of them (--parallel=auto). Several
processes (hosts): start the same command in each with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the JAX_* environment variables).
"""

import dataclasses
import sys

from absl import app
from absl import flags
from absl import logging

from lm_jax.train import run_logging
from lm_jax.train.config import TrainConfig
from lm_jax.train.trainer import TrainingInterrupted, train_and_evaluate

_D = TrainConfig()
_HELP = {
    "workdir": "where checkpoints, metrics.jsonl, plots and results.json go",
    "corpus": "synthetic (embedded default), ptb, wikitext2 or text (--text_path)",
    "data_dir": "directory of ptb/ and wikitext-2/ (default: $LM_JAX_DATA_DIR or ../shared/data)",
    "text_path": "plain text file for --corpus=text (split 90/10 into train/valid)",
    "level": "char or word, for --corpus=text",
    "lowercase": "lower-case the text (--corpus=text)",
    "letters_only": "map every non-letter to a space, as D2L's Time Machine (--corpus=text)",
    "text_max_tokens": "--corpus=text: keep only the first this many tokens before splitting "
                       "(D2L 0.17's Time Machine: 10000); 0: all",
    "synthetic_vocab_size": "synthetic corpus: language size (0: the library default)",
    "synthetic_train_tokens": "synthetic corpus: train tokens (valid and test get a tenth each)",
    "cell": "elman (= rnn_tanh), rnn_relu, elman_direct (tanh without W_xh, the embedding "
            "added directly: Mikolov's RNNLM; needs --embed == --hidden), gru or lstm",
    "layers": "recurrent layers",
    "hidden": "hidden units per layer",
    "embed": "embedding size",
    "dropout": "dropout on non-recurrent connections (Zaremba et al. 2014)",
    "variational_dropout": "one dropout mask per sequence, reused at every time step (Gal & "
                           "Ghahramani 2016; locked dropout); T times fewer random numbers",
    "init_scale": "parameters start uniform in [-init_scale, init_scale]",
    "batch_size": "rows per batch (global, over all devices)",
    "bptt": "unrolled time steps per batch (truncated BPTT length)",
    "batching": "sequential (state carried across batches) or random (state reset)",
    "optimizer": "sgd, adam, adamw or lazy_adam (Adam moving only the rows a gradient "
                 "touches, as TensorFlow's LazyAdam)",
    "lr": "learning rate",
    "lr_schedule": "constant; zaremba (divide by --lr_decay_factor each epoch after "
                   "--lr_decay_start); plateau (Mikolov: halve once validation stalls)",
    "lr_decay_start": "epochs at the initial rate before zaremba decay starts",
    "lr_decay_factor": "zaremba decay divisor per epoch",
    "stop_when_stalled": "plateau schedule: stop when halving no longer improves validation",
    "clip": "clip gradients to this global norm (0: off)",
    "weight_decay": "--optimizer=adamw only: decoupled weight decay (optax.adamw) of every "
                    "matrix except the input embedding; biases and vectors are not decayed",
    "grad_reduction": "token_mean, or sum_over_time (sum over T, mean over rows: Zaremba/TF PTB)",
    "epochs": "epochs to train (ignored if --steps > 0)",
    "steps": "total training steps (overrides --epochs)",
    "seed": "seed for parameters, batches and dropout",
    "checkpoint_every": "save a checkpoint every this many steps (and at each epoch end)",
    "eval_every": "also evaluate on validation every this many steps (0: epoch ends only)",
    "log_every": "report train metrics every this many steps",
    "eval_batch_size": "rows for evaluation (each row a contiguous stream, state carried)",
    "tie_weights": "share the embedding matrix with the output layer (needs --embed == "
                   "--hidden and a head with a [V, H] weight: full, nce, neg, sampled)",
    "head": "output layer: full, class, hsm, dsoftmax, nce, neg or sampled",
    "head_classes": "class/hsm heads: number of classes (0: sqrt of the vocabulary size)",
    "head_binning": "class head binning: equal (V/C words a class by frequency: the "
                    "smallest largest class, fastest), sqrt (equal shares of sqrt-frequency "
                    "mass) or mass (Mikolov: equal unigram mass)",
    "head_tree": "hsm head: huffman, balanced or class (two-level) tree",
    "head_samples": "nce/neg/sampled heads: noise samples per step",
    "head_noise": "nce/neg/sampled heads: noise distribution unigram, log_uniform or uniform",
    "head_noise_power": "nce/neg/sampled heads: unigram counts raised to this power",
    "head_shared_samples": "nce/neg/sampled heads: one noise sample set shared by the batch",
    "head_bands": "dsoftmax head: frequency bands as words:dims,... (most frequent first)",
    "head_log_z": "nce head: the log normaliser, learned or a fixed number",
    "skip_nonfinite": "skip an update whose loss or gradient is NaN/Inf (counted in "
                      "metrics.jsonl) instead of stopping the run",
    "keep_freed_memory": "on the CPU backend only, let glibc malloc keep freed blocks for "
                         "reuse (lm_jax.ops.allocator): no page faults on each step's large "
                         "temporaries; the process keeps its peak memory. Ignored on GPU/TPU",
    "parallel": "auto (shard_map over all devices when there are several, else none), none, "
                "shard_map or pmap (one process)",
    "coordinator_address": "host:port of process 0 for a multi-process run "
                           "(or $JAX_COORDINATOR_ADDRESS)",
    "num_processes": "processes in a multi-process run (0: one, or $JAX_NUM_PROCESSES / "
                     "the cluster's)",
    "process_id": "this process's index in [0, num_processes) (-1: $JAX_PROCESS_ID or the "
                  "cluster's)",
}

for field in dataclasses.fields(TrainConfig):
  default = getattr(_D, field.name)
  if isinstance(default, bool):
    flags.DEFINE_bool(field.name, default, _HELP[field.name])
  elif isinstance(default, int):
    flags.DEFINE_integer(field.name, default, _HELP[field.name])
  elif isinstance(default, float):
    flags.DEFINE_float(field.name, default, _HELP[field.name])
  else:
    flags.DEFINE_string(field.name, default, _HELP[field.name])

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off; progress comes below
  run_logging.configure_console()
  config = TrainConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)})
  try:
    train_and_evaluate(config)
  except TrainingInterrupted as e:
    run_logging.logger.error("%s", e)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  app.run(main)
