r"""What lm_jax runs on GPU and TPU, checked from a CPU host with ``jax.export``.

:func:`export_jobs` lists every head's ``loss`` + gradient, ``log_prob``, ``log_probs`` and
``sample``, the fused loss (per token and reduced) and the trainer's train step, as
``(name, function, fn, args)`` with abstract arguments (``jax.ShapeDtypeStruct``: nothing is
allocated). :func:`lm_jax.ops.platform.exported_trip_counts` exports one for a platform
and reads how many times each ``while`` loop would run there; on a GPU each trip is a host
round trip, so none may grow with the number of tokens (``tests/ops/platform_test.py``
asserts at most 128 at ``N = 16384``, ``V = 100k``; ``experiments/export_check.py`` prints
the table).
"""
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import heads as heads_lib
from lm_jax.models import language_model as lm_lib
from lm_jax.ops import fused
from lm_jax.train import optimizers
from lm_jax.train import training

HEAD_FUNCTIONS = ("loss+grad", "log_prob", "log_probs", "sample")
# Above this many elements, log_probs and sample are exported for 1024 rows (an [N, V]
# array past 2**31 elements is not what anyone evaluates at once).
_MAX_DENSE = 2**31


def zipf_counts(vocab_size: int) -> np.ndarray:
  """Zipfian training counts ``1e6 / r^1.1 + 1`` for ranks ``r = 1..V`` (int64)."""
  return (1e6 / np.arange(1, vocab_size + 1) ** 1.1).astype(np.int64) + 1


def head_jobs(name: str, head: heads_lib.OutputHead, *, vocab_size: int, tokens: int,
              hidden: int) -> Iterator[tuple[str, str, Callable, tuple]]:
  """The head's four functions over abstract ``[N, H]`` hidden states and ``[N]`` targets."""
  params = jax.eval_shape(lambda k: head.init(k, hidden), jax.random.key(0))
  hidden_NxH = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
  targets_N = jax.ShapeDtypeStruct((tokens,), jnp.int32)
  rows = tokens if tokens * vocab_size <= _MAX_DENSE else 1024
  dense_NxH = jax.ShapeDtypeStruct((rows, hidden), jnp.float32)
  key = jax.random.key(0)
  mean_loss = lambda p, t, h, y: head.loss(p, h, y, key=key, tables=t).mean()
  yield name, "loss+grad", jax.value_and_grad(mean_loss), (params, head.tables, hidden_NxH,
                                                           targets_N)
  yield name, "log_prob", (lambda p, t, h, y: head.log_prob(p, h, y, tables=t)), (
      params, head.tables, hidden_NxH, targets_N)
  yield name, "log_probs", (lambda p, t, h: head.log_probs(p, h, tables=t)), (
      params, head.tables, dense_NxH)
  yield name, "sample", (lambda p, t, h: head.sample(p, h, key, tables=t)), (
      params, head.tables, dense_NxH)


def fused_jobs(*, vocab_size: int, tokens: int, hidden: int
               ) -> Iterator[tuple[str, str, Callable, tuple]]:
  """The fused loss and its gradient for every reduction (the natural ``.mean()`` of the
  per-token losses for ``"none"``)."""
  args = (jax.ShapeDtypeStruct((tokens, hidden), jnp.float32),
          jax.ShapeDtypeStruct((vocab_size, hidden), jnp.float32),
          jax.ShapeDtypeStruct((tokens,), jnp.int32))
  for reduction in fused.REDUCTIONS:
    objective = lambda h, w, y, r=reduction: jnp.mean(fused.linear_softmax_cross_entropy(
        h, w, y, reduction=r))
    yield "fused", f"{reduction}+grad", jax.value_and_grad(objective, argnums=(0, 1)), args


def train_step_job(head: heads_lib.OutputHead, *, vocab_size: int, tokens: int, hidden: int,
                   steps: int = 32) -> tuple[str, str, Callable, tuple]:
  """The trainer's train step (an LSTM LM over ``tokens / steps`` rows of ``steps`` time
  steps, Adam) with ``head``; its time scan runs ``steps`` times, by design."""
  model = lm_lib.make_language_model(vocab_size=vocab_size, embed_size=hidden,
                                     hidden_size=hidden, head=head)
  optimizer = optimizers.make_optimizer("adam", 1e-3, clip=1.0)
  rows = max(1, tokens // steps)
  state = jax.eval_shape(lambda: training.create_train_state(model, optimizer, seed=0,
                                                             batch_size=rows))
  batch = {"inputs_BxT": jax.ShapeDtypeStruct((rows, steps), jnp.int32),
           "targets_BxT": jax.ShapeDtypeStruct((rows, steps), jnp.int32),
           "mask_BxT": jax.ShapeDtypeStruct((rows, steps), jnp.bool_),
           "reset": jax.ShapeDtypeStruct((), jnp.bool_)}
  step = lambda s, b, t: training.train_step(s, b, t, model=model, optimizer=optimizer)
  return "train_step", "step", step, (state, batch, head.tables)


def export_jobs(*, vocab_size: int, tokens: int, hidden: int,
                head_names: Sequence[str] = heads_lib.HEAD_NAMES,
                train_heads: Sequence[str] = ("full",), **head_options
                ) -> Iterator[tuple[str, str, Callable, tuple]]:
  """Every head's functions, the fused loss, and the train step with each of ``train_heads``,
  at ``V = vocab_size``, ``N = tokens``, ``H = hidden`` (Zipfian counts)."""
  counts = zipf_counts(vocab_size)
  make = lambda name: heads_lib.make_head(name, vocab_size=vocab_size, counts=counts,
                                          **head_options.get(name, {}))
  for name in head_names:
    yield from head_jobs(name, make(name), vocab_size=vocab_size, tokens=tokens, hidden=hidden)
  yield from fused_jobs(vocab_size=vocab_size, tokens=tokens, hidden=hidden)
  for name in train_heads:
    job = train_step_job(make(name), vocab_size=vocab_size, tokens=tokens, hidden=hidden)
    yield (f"train_step[{name}]",) + job[1:]
