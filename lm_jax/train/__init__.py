"""The training application: train state and per-device steps (:mod:`training`),
optimizers (:mod:`optimizers`), learning-rate schedules, orbax checkpoints, run logging
and plots, the flags (:mod:`config`), the loop (:mod:`trainer`), data parallelism across
devices and hosts (:mod:`parallel`) and fault handling (:mod:`faults`).

This is the part of lm_jax that loads optax, orbax, absl and matplotlib; ``import lm_jax``
does not import it until ``lm_jax.train`` (or one of its names) is used.
"""

from lm_jax.train import checkpointing
from lm_jax.train import config
from lm_jax.train import faults
from lm_jax.train import optimizers
from lm_jax.train import parallel
from lm_jax.train import run_logging
from lm_jax.train import schedules
from lm_jax.train import trainer
from lm_jax.train import training
from lm_jax.train.config import TrainConfig
from lm_jax.train.trainer import train_and_evaluate
from lm_jax.train.training import TrainState
from lm_jax.train.training import train_step
