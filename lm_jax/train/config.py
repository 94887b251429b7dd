"""The flags of a training run, as one validated record (only the launcher passes it around)."""

from __future__ import annotations

import dataclasses

from lm_jax import heads
from lm_jax.train import parallel

CORPORA = ("synthetic", "ptb", "wikitext2", "text")
CELLS = ("elman", "rnn_tanh", "rnn_relu", "elman_direct", "gru", "lstm")
# The TrainConfig field behind each of heads.make_head's options.
HEAD_OPTION_FLAGS = {"num_classes": "head_classes", "binning": "head_binning",
                     "tree": "head_tree", "bands": "head_bands", "noise": "head_noise",
                     "noise_power": "head_noise_power", "num_samples": "head_samples",
                     "shared_samples": "head_shared_samples", "log_z": "head_log_z"}
# Which TrainConfig fields each output head reads, under the name its factory takes.
HEAD_OPTION_FIELDS = {head: {option: HEAD_OPTION_FLAGS[option] for option in options}
                      for head, options in heads.HEAD_OPTIONS.items()}
# Fingerprint entries of checkpoints written before these keys existed.
FINGERPRINT_DEFAULTS = {"head": "full", "head_options": {}, "tie_weights": False}


@dataclasses.dataclass
class TrainConfig:
  """Everything ``train_lm.py`` can be told. Defaults: the embedded synthetic run."""

  workdir: str = "runs/default"
  corpus: str = "synthetic"
  data_dir: str | None = None
  text_path: str | None = None
  level: str = "char"
  synthetic_vocab_size: int = 0
  synthetic_train_tokens: int = 1_000_000
  lowercase: bool = False
  letters_only: bool = False
  text_max_tokens: int = 0
  cell: str = "lstm"
  layers: int = 1
  hidden: int = 128
  embed: int = 64
  dropout: float = 0.0
  variational_dropout: bool = False
  tie_weights: bool = False
  init_scale: float = 0.1
  batch_size: int = 32
  bptt: int = 32
  batching: str = "sequential"
  optimizer: str = "adam"
  lr: float = 3e-3
  lr_schedule: str = "constant"
  lr_decay_start: int = 4
  lr_decay_factor: float = 2.0
  stop_when_stalled: bool = False
  clip: float = 5.0
  weight_decay: float = 0.01
  grad_reduction: str = "token_mean"
  epochs: int = 3
  steps: int = 0
  seed: int = 0
  checkpoint_every: int = 500
  eval_every: int = 0
  log_every: int = 100
  eval_batch_size: int = 10
  head: str = "full"
  head_classes: int = 0
  head_binning: str = "equal"
  head_tree: str = "huffman"
  head_samples: int = 64
  head_noise: str = "unigram"
  head_noise_power: float = 0.75
  head_shared_samples: bool = True
  head_bands: str = ""
  head_log_z: str = "learned"
  skip_nonfinite: bool = False
  keep_freed_memory: bool = True
  parallel: str = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1

  def head_options(self) -> dict:
    """The keyword options of ``heads.make_head`` that ``self.head`` uses, and only those."""
    fields = HEAD_OPTION_FIELDS.get(self.head, {})
    return {option: getattr(self, name) for option, name in fields.items()}

  def _head_problems(self) -> list[str]:
    if self.head not in heads.HEAD_NAMES:
      return [f"--head={self.head!r} is not one of {heads.HEAD_NAMES}"]
    problems = []
    used = set(HEAD_OPTION_FIELDS.get(self.head, {}).values())
    defaults = TrainConfig()
    for name in sorted({n for opts in HEAD_OPTION_FIELDS.values() for n in opts.values()}):
      if name not in used and getattr(self, name) != getattr(defaults, name):
        problems.append(f"--{name}={getattr(self, name)!r} has no effect with "
                        f"--head={self.head} (it only applies to --head="
                        + "|".join(h for h, o in HEAD_OPTION_FIELDS.items() if name in o.values())
                        + ")")
    if self.head_tree not in heads.TREE_KINDS:
      problems.append(f"--head_tree={self.head_tree!r} is not one of {heads.TREE_KINDS}")
    if self.head_noise not in heads.noise.NOISE_NAMES:
      problems.append(f"--head_noise={self.head_noise!r} is not one of "
                      f"{heads.noise.NOISE_NAMES}")
    if self.head_classes < 0:
      problems.append(f"--head_classes={self.head_classes} must be >= 0 (0: sqrt of the "
                      "vocabulary size)")
    if self.head_samples < 1:
      problems.append(f"--head_samples={self.head_samples} must be >= 1")
    return problems

  def _device_problems(self, num_devices: int, num_processes: int) -> list[str]:
    problems = []
    if num_processes > 1 and self.parallel in ("none", "pmap"):
      problems.append(f"--parallel={self.parallel} cannot span {num_processes} processes; use "
                      "--parallel=shard_map (or auto)")
    if self.parallel == "none" or (self.parallel == "auto" and num_devices == 1):
      return problems
    if self.batch_size % num_devices:
      where = (f"{num_processes} processes x {num_devices // num_processes} local devices"
               if num_processes > 1 else f"{num_devices} devices")
      problems.append(f"--batch_size={self.batch_size} is not divisible by the {where} = "
                      f"{num_devices} of --parallel={self.parallel}; use a multiple of "
                      f"{num_devices} or --parallel=none")
    return problems

  def validate(self, *, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Raises ValueError naming the flag(s) for anything inconsistent, before any work.

    With ``num_devices`` (all devices of all processes), also checks that the batches
    split evenly over the devices the run will use.
    """
    problems = self._head_problems()
    modes = ("auto",) + parallel.MODES
    if self.parallel not in modes:
      problems.append(f"--parallel={self.parallel!r} is not one of {modes}")
    if self.num_processes < 0:
      problems.append(f"--num_processes={self.num_processes} must be >= 0 (0: one process, "
                      "or as the JAX_* environment variables say)")
    if self.num_processes > 1 and not self.coordinator_address:
      problems.append(f"--num_processes={self.num_processes} needs --coordinator_address "
                      "(host:port of process 0)")
    if self.coordinator_address and not 0 <= self.process_id < max(self.num_processes, 1):
      problems.append(f"--process_id={self.process_id} must be in [0, --num_processes="
                      f"{self.num_processes}) with --coordinator_address")
    if num_devices is not None:
      problems += self._device_problems(num_devices, num_processes)
    if self.corpus not in CORPORA:
      problems.append(f"--corpus={self.corpus!r} is not one of {CORPORA}")
    if self.corpus == "text" and not self.text_path:
      problems.append("--corpus=text needs --text_path")
    if self.cell not in CELLS:
      problems.append(f"--cell={self.cell!r} is not one of {CELLS}")
    if self.weight_decay < 0:
      problems.append(f"--weight_decay={self.weight_decay} must be >= 0")
    if self.optimizer != "adamw" and self.weight_decay != TrainConfig.weight_decay:
      problems.append(f"--weight_decay={self.weight_decay} has no effect with --optimizer="
                      f"{self.optimizer} (it only applies to --optimizer=adamw)")
    if self.batching not in ("sequential", "random"):
      problems.append(f"--batching={self.batching!r} must be sequential or random")
    if self.lr_schedule not in ("constant", "zaremba", "plateau"):
      problems.append(f"--lr_schedule={self.lr_schedule!r} must be constant, zaremba or plateau")
    if self.grad_reduction not in ("token_mean", "sum_over_time"):
      problems.append(f"--grad_reduction={self.grad_reduction!r} must be token_mean or "
                      "sum_over_time")
    for name in ("layers", "hidden", "embed", "batch_size", "bptt", "checkpoint_every",
                 "log_every", "eval_batch_size"):
      if getattr(self, name) < 1:
        problems.append(f"--{name}={getattr(self, name)} must be >= 1")
    if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
      problems.append(f"--epochs={self.epochs} and --steps={self.steps}: one must be positive")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"--dropout={self.dropout} must be in [0, 1)")
    if self.variational_dropout and self.dropout == 0.0:
      problems.append("--variational_dropout has no effect without --dropout > 0")
    if self.cell == "elman_direct" and self.embed != self.hidden:
      problems.append(f"--cell=elman_direct adds the embedding to the hidden state, so it "
                      f"needs --embed == --hidden, got --embed={self.embed} "
                      f"--hidden={self.hidden}")
    if self.tie_weights and self.embed != self.hidden:
      problems.append(f"--tie_weights needs --embed == --hidden, got --embed={self.embed} "
                      f"and --hidden={self.hidden}")
    if self.tie_weights and self.head in ("class", "hsm", "dsoftmax"):
      problems.append(f"--tie_weights needs a head with a [V, H] output matrix, not "
                      f"--head={self.head}")
    if self.lr <= 0:
      problems.append(f"--lr={self.lr} must be positive")
    if self.clip < 0:
      problems.append(f"--clip={self.clip} must be >= 0 (0 disables clipping)")
    if problems:
      raise ValueError("bad flags:\n  " + "\n  ".join(problems))


def model_fingerprint(config: TrainConfig, vocab_size: int) -> dict:
  """What a checkpoint must agree on with the current run to be restorable: everything that
  changes the state tree (model shape, optimizer and clipping, whose states are leaves of
  the optimizer state) or the data order (``bptt``, ``seed``, ``batching``, batch size), and
  the optimizer's hyperparameters."""
  return {"vocab_size": vocab_size, "cell": config.cell, "layers": config.layers,
          "hidden": config.hidden, "embed": config.embed, "batch_size": config.batch_size,
          "optimizer": config.optimizer, "corpus": config.corpus, "head": config.head,
          "head_options": config.head_options(), "tie_weights": config.tie_weights,
          "clip": config.clip, "bptt": config.bptt, "seed": config.seed,
          "batching": config.batching, "lr": config.lr, "weight_decay": config.weight_decay}
