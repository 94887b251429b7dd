"""The flags of a training run, as one validated record (only the launcher passes it around)."""

from __future__ import annotations

import dataclasses

CORPORA = ("synthetic", "ptb", "wikitext2", "text")
CELLS = ("elman", "rnn_tanh", "rnn_relu", "gru", "lstm")


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
  cell: str = "lstm"
  layers: int = 1
  hidden: int = 128
  embed: int = 64
  dropout: float = 0.0
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
  grad_reduction: str = "token_mean"
  epochs: int = 3
  steps: int = 0
  seed: int = 0
  checkpoint_every: int = 500
  eval_every: int = 0
  log_every: int = 100
  eval_batch_size: int = 10

  def validate(self) -> None:
    """Raises ValueError naming the flag(s) for anything inconsistent, before any work."""
    problems = []
    if self.corpus not in CORPORA:
      problems.append(f"--corpus={self.corpus!r} is not one of {CORPORA}")
    if self.corpus == "text" and not self.text_path:
      problems.append("--corpus=text needs --text_path")
    if self.cell not in CELLS:
      problems.append(f"--cell={self.cell!r} is not one of {CELLS}")
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
    if self.lr <= 0:
      problems.append(f"--lr={self.lr} must be positive")
    if self.clip < 0:
      problems.append(f"--clip={self.clip} must be >= 0 (0 disables clipping)")
    if problems:
      raise ValueError("bad flags:\n  " + "\n  ".join(problems))


def model_fingerprint(config: TrainConfig, vocab_size: int) -> dict:
  """What a checkpoint must agree on with the current run to be restorable."""
  return {"vocab_size": vocab_size, "cell": config.cell, "layers": config.layers,
          "hidden": config.hidden, "embed": config.embed, "batch_size": config.batch_size,
          "optimizer": config.optimizer, "corpus": config.corpus}
