r"""A recurrent LM written in Flax NNX, with lm_jax's layers dropped in (no lm_jax trainer).

The model is what a Flax user writes (``nnx.Embed``, ``nnx.Dropout``), with
``lm_jax.nnx.RNNLayer`` for the recurrence and ``lm_jax.nnx.OutputLayer`` for any output
head (full softmax, class-based, hierarchical, NCE, ...). Training is truncated BPTT with
the hidden state carried across sequential batches, ``nnx.Optimizer`` over ``nnx.Param``
only (the heads' tables are not parameters), and exact perplexity from
``OutputLayer.log_prob`` at every epoch end. Defaults train on the embedded synthetic
corpus in about a minute; on PTB:

  python experiments/flax_nnx_lm.py --corpus=ptb --head=class --epochs=4 \
      --json_out=results/flax_nnx_ptb_class.json

The same model with lm_jax's functional trainer, for comparison (WORKSPACE_NOTES.md):

  python experiments/train_lm.py --corpus=ptb --head=class --cell=elman --layers=1 \
      --hidden=200 --embed=200 --batch_size=20 --bptt=35 --optimizer=adam --lr=0.002 \
      --clip=1 --dropout=0.3 --epochs=4 --eval_batch_size=10 --workdir=runs/fn_ptb_class
"""
import json
import os
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarking

from lm_jax import heads
from lm_jax import nnx as lm_nnx
from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.ops import allocator

_CORPUS = flags.DEFINE_enum("corpus", "synthetic", ["synthetic", "ptb", "wikitext2"], "corpus")
_HEAD = flags.DEFINE_enum("head", "full", list(heads.HEAD_NAMES), "output head (lm_jax.heads)")
_CELL = flags.DEFINE_string("cell", "elman", "elman, gru or lstm (lm_jax.nnx.RNNLayer)")
_EMBED = flags.DEFINE_integer("embed", 200, "embedding size")
_HIDDEN = flags.DEFINE_integer("hidden", 200, "hidden units")
_DROPOUT = flags.DEFINE_float("dropout", 0.3, "dropout on the embedding and before the head")
_BATCH = flags.DEFINE_integer("batch_size", 20, "rows per batch")
_BPTT = flags.DEFINE_integer("bptt", 35, "truncated BPTT length")
_LR = flags.DEFINE_float("lr", 2e-3, "Adam learning rate")
_CLIP = flags.DEFINE_float("clip", 1.0, "global-norm gradient clipping")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "epochs")
_STEPS = flags.DEFINE_integer("steps", 0, "stop after this many steps (0: --epochs)")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 10, "rows for evaluation")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_LOG_EVERY = flags.DEFINE_integer("log_every", 200, "steps between progress lines")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write the results here as JSON")
_KEEP_FREED = benchmarking.define_keep_freed_memory_flag()
_CACHED = flags.DEFINE_bool(
    "cached", True, "call the train step through nnx.cached_partial (Flax's remedy for "
    "nnx.jit's per-call graph traversal, 'Performance considerations'); --nocached: plain "
    "nnx.jit on every call")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "directory of ptb/ and wikitext-2/")


def uniform_init(scale=0.1):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale,
                                                                  scale)


class RNNLM(nnx.Module):
  """Embedding -> dropout -> RNN -> dropout -> output head."""

  def __init__(self, vocab_size: int, head: heads.OutputHead, *, cell: str, embed: int,
               hidden: int, dropout: float, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, embed, embedding_init=uniform_init(), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.rnn = lm_nnx.RNNLayer(cell, embed, hidden, rngs=rngs)
    self.output = lm_nnx.OutputLayer(head, hidden, rngs=rngs)
    self.noise = nnx.Rngs(noise=rngs.params())  # the sampled heads' noise draws

  def hidden(self, inputs_BxT, carry):
    x = self.dropout(self.embed(inputs_BxT))
    h, carry = self.rnn(x, carry)
    return self.dropout(h), carry

  def __call__(self, inputs_BxT, targets_BxT, carry):
    """Per-token training loss ``[B, T]`` and the carry for the next batch."""
    h, carry = self.hidden(inputs_BxT, carry)
    return self.output(h, targets_BxT, rngs=self.noise.noise), carry

  def log_prob(self, inputs_BxT, targets_BxT, carry):
    h, carry = self.hidden(inputs_BxT, carry)
    return self.output.log_prob(h, targets_BxT), carry


@nnx.jit
def train_step(model, optimizer, inputs, targets, carry):
  def loss_fn(model):
    loss_BxT, new_carry = model(inputs, targets, carry)
    return jnp.mean(loss_BxT), new_carry

  (loss, carry), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, jax.lax.stop_gradient(carry)


@nnx.jit
def eval_step(model, inputs, targets, mask, carry):
  logp_BxT, carry = model.log_prob(inputs, targets, carry)
  return -jnp.sum(jnp.where(mask, logp_BxT, 0.0)), jnp.sum(mask), carry


def evaluate(model, tokens) -> float:
  """Exact perplexity over a split: every target once, state carried (dropout off)."""
  model.eval()
  carry, nll, count = model.rnn.initial_carry(_EVAL_BATCH.value), 0.0, 0.0
  for batch in batching.eval_batches(tokens, batch_size=_EVAL_BATCH.value, bptt=_BPTT.value):
    total, n, carry = eval_step(model, batch.inputs_BxT, batch.targets_BxT, batch.mask_BxT, carry)
    nll, count = nll + float(total), count + float(n)
  model.train()
  return float(np.exp(nll / count))


def main(argv):
  del argv
  if _KEEP_FREED.value:
    allocator.keep_freed_memory_on_cpu()
  kwargs = {} if _CORPUS.value != "synthetic" else {"num_train": 200_000, "num_valid": 20_000,
                                                     "num_test": 20_000}
  corpus = corpora.load_corpus(_CORPUS.value, _DATA_DIR.value, **kwargs)
  vocab_size = len(corpus.vocab)
  counts = np.bincount(corpus.train, minlength=vocab_size)
  head = heads.make_head(_HEAD.value, vocab_size=vocab_size, counts=counts)
  model = RNNLM(vocab_size, head, cell=_CELL.value, embed=_EMBED.value, hidden=_HIDDEN.value,
                dropout=_DROPOUT.value, rngs=nnx.Rngs(params=_SEED.value, dropout=_SEED.value + 1))
  tx = optax.chain(optax.clip_by_global_norm(_CLIP.value), optax.adam(_LR.value))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  steps_per_epoch = batching.num_batches(len(corpus.train), _BATCH.value, _BPTT.value,
                                         "sequential")
  total = _STEPS.value or _EPOCHS.value * steps_per_epoch
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"{corpus.name}: V={vocab_size}, {len(corpus.train)} train tokens; head {_HEAD.value}, "
        f"{n_params} trainable parameters; {steps_per_epoch} steps per epoch")
  step_fn = (nnx.cached_partial(train_step, model, optimizer) if _CACHED.value
             else lambda *args: train_step(model, optimizer, *args))
  carry, step, rates, history = model.rnn.initial_carry(_BATCH.value), 0, [], []
  train_seconds, window_start, window_steps = 0.0, time.perf_counter(), 0
  t_start = time.perf_counter()
  while step < total:
    epoch, index = divmod(step, steps_per_epoch)
    batch = batching.get_batch(corpus.train, batching.BatchPosition(epoch, index),
                               batch_size=_BATCH.value, bptt=_BPTT.value,
                               strategy="sequential", seed=_SEED.value)
    if batch.reset:
      carry = model.rnn.initial_carry(_BATCH.value)
    loss, carry = step_fn(batch.inputs_BxT, batch.targets_BxT, carry)
    step, window_steps = step + 1, window_steps + 1
    if step % _LOG_EVERY.value == 0 or step % steps_per_epoch == 0 or step == total:
      loss = float(loss)  # waits for the step
      seconds = time.perf_counter() - window_start
      rate = window_steps * _BATCH.value * _BPTT.value / seconds
      if step > _LOG_EVERY.value:  # the first window includes compilation
        rates.append(rate)
      train_seconds += seconds
      print(f"step {step}/{total} epoch {epoch + 1} | loss {loss:.4f} | {rate:,.0f} tokens/s")
      if step % steps_per_epoch == 0 or step == total:
        valid = evaluate(model, corpus.valid)
        history.append({"step": step, "valid_perplexity": valid,
                        "train_seconds": train_seconds})
        print(f"epoch {epoch + 1}: valid perplexity {valid:.2f}")
      window_start, window_steps = time.perf_counter(), 0
  results = {"corpus": corpus.name, "head": _HEAD.value, "cell": _CELL.value, "steps": step,
             "valid_perplexity": history[-1]["valid_perplexity"],
             "test_perplexity": evaluate(model, corpus.test) if corpus.test is not None else None,
             "train_tokens_per_sec_median": float(np.median(rates)) if rates else None,
             "wall_seconds": time.perf_counter() - t_start, "history": history,
             "flags": {f: flags.FLAGS[f].value for f in (
                 "corpus", "head", "cell", "embed", "hidden", "dropout", "batch_size", "bptt",
                 "lr", "clip", "epochs", "steps", "seed", "cached")}}
  print(json.dumps({k: v for k, v in results.items() if k not in ("history", "flags")}))
  if _JSON_OUT.value:
    os.makedirs(os.path.dirname(_JSON_OUT.value) or ".", exist_ok=True)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
