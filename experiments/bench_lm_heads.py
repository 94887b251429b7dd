r"""Train-step throughput of a recurrent LM with each output head, side by side.

The same model (cell, layers, sizes, dropout, optimizer) is built once per head from a real
corpus's training counts (trees, classes and noise as ``train_lm.py`` builds them) and its
jitted train step timed on real token batches, interleaved, median of ``--repeats`` rounds.
Reported per head: ms per step, training tokens/s, seconds per epoch (steps per epoch x ms
per step, evaluation excluded), speed-up over the full softmax in the same run, and the
ratio to faster-rnnlm's 148k words/s (sigmoid RNN 200 + hierarchical softmax, one thread,
measured on this machine; the issue's anchor).

XLA uses every core by default; for a one-thread figure comparable with faster-rnnlm's, run
with ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
taskset -c 0``.

  python experiments/bench_lm_heads.py                                  # PTB Elman 200, B 20 x T 35
  python experiments/bench_lm_heads.py --cell=lstm --layers=2 --bptt=20 \
      --optimizer=sgd --json_out=results/bench_lm_heads_lstm.json
  python experiments/bench_lm_heads.py --cell=elman,elman_direct --heads=class,hsm   # cells side by side
  python experiments/bench_lm_heads.py --cell=elman_direct --variational_dropout=false,true \
      --heads=class,hsm --batch_size=128        # per-token vs per-sequence dropout masks
"""
import functools
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarking

from lm_jax import heads
from lm_jax.data import batching
from lm_jax.ops import allocator
from lm_jax.train import config as config_lib
from lm_jax.train import optimizers
from lm_jax.train import trainer
from lm_jax.train import training

FASTER_RNNLM_WORDS_PER_SEC = 148_000.0

_CORPUS = flags.DEFINE_string("corpus", "ptb", "corpus whose counts and tokens are used")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "data root (default: ../shared/data)")
_HEADS = flags.DEFINE_list("heads", list(heads.HEAD_NAMES),
                           "heads to time; hsm_autodiff: hsm differentiated by autodiff of "
                           "the plain walk instead of its chunked backward")
_CELL = flags.DEFINE_list("cell", ["elman"], "recurrent cell(s); several: timed interleaved "
                           "in one run, with a speed-up column against the first cell")
_LAYERS = flags.DEFINE_integer("layers", 1, "recurrent layers")
_HIDDEN = flags.DEFINE_integer("hidden", 200, "H (= E)")
_BATCH = flags.DEFINE_list("batch_size", ["20"], "B (several: one table row block each)")
_BPTT = flags.DEFINE_integer("bptt", 35, "T")
_DROPOUT = flags.DEFINE_float("dropout", 0.3, "dropout rate")
_VARIATIONAL = flags.DEFINE_list(
    "variational_dropout", ["false"],
    "dropout masks shared over time (train_lm's --variational_dropout); 'false,true' times both "
    "side by side")
_BINNING = flags.DEFINE_string("head_binning", "equal", "class head binning (as train_lm.py)")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "optimizer (optimizers.OPTIMIZERS)")
_KEEP_FREED = benchmarking.define_keep_freed_memory_flag()
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed rounds (medians reported)")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_lm_heads.json", "output JSON")


def _str_bool(value):
  if value.lower() not in ("true", "false"):
    raise ValueError(f"--variational_dropout takes true/false values, got {value!r}")
  return value.lower() == "true"


def model_variants(cells, variational):
  """``{label: (cell, variational_dropout)}``: each cell, with '+variational' where shared masks."""
  return {f"{c}+variational" if v else c: (c, v) for c in cells for v in variational}


def head_steps(corpus, variants, head_names, batch_size):
  """{(variant label, head): zero-argument function running one train step} on the corpus's
  first tokens; ``variants`` from :func:`model_variants`."""
  t = _BPTT.value
  counts = np.bincount(corpus.train, minlength=len(corpus.vocab))
  x = np.asarray(corpus.train[:batch_size * t + 1], np.int32)
  batch = {"inputs_BxT": jnp.asarray(x[:-1].reshape(batch_size, t)),
           "targets_BxT": jnp.asarray(x[1:].reshape(batch_size, t)),
           "mask_BxT": jnp.ones((batch_size, t), bool), "reset": jnp.asarray(False)}
  opt = optimizers.make_optimizer(_OPTIMIZER.value, 1e-3, clip=1.0)
  fns = {}
  for (label, (cell, variational)), name in ((v, h) for v in variants.items()
                                             for h in head_names):
    head, base_name = None, name
    if name == "hsm_autodiff":  # train_lm's hsm (Huffman tree), differentiated by autodiff.
      head = heads.hierarchical_softmax(heads.huffman_tree(counts), backward="autodiff")
      base_name = "hsm"
    config = config_lib.TrainConfig.from_flags(
        corpus=_CORPUS.value, head=base_name, cell=cell, layers=_LAYERS.value,
        hidden=_HIDDEN.value, embed=_HIDDEN.value, dropout=_DROPOUT.value,
        variational_dropout=variational, batch_size=batch_size, bptt=t,
        head_binning=_BINNING.value)
    model = trainer.build_model(config, len(corpus.vocab), counts, head=head)
    state = training.create_train_state(model, opt, seed=0, batch_size=batch_size)
    step = jax.jit(functools.partial(training.train_step, model=model, optimizer=opt))
    fns[label, name] = functools.partial(lambda f, s: f(s, batch)[1], step, state)
  return fns


def main(argv):
  del argv
  applied = _KEEP_FREED.value and allocator.keep_freed_memory_on_cpu()
  base = config_lib.TrainConfig.from_flags(corpus=_CORPUS.value, data_dir=_DATA_DIR.value)
  corpus = trainer.load_corpus(base)
  threads = os.environ.get("XLA_FLAGS", "")
  one_thread = "intra_op_parallelism_threads=1" in threads
  variants = model_variants(list(dict.fromkeys(_CELL.value)),
                            list(dict.fromkeys(_str_bool(v) for v in _VARIATIONAL.value)))
  cells = list(variants)  # Labels; the first is the speed-up reference when there are several.
  rows = []
  for b in [int(v) for v in _BATCH.value]:
    t = _BPTT.value
    steps_per_epoch = batching.num_batches(len(corpus.train), b, t, "sequential")
    fns = head_steps(corpus, variants, _HEADS.value, b)
    samples = benchmarking.time_interleaved(
        {f"{c}/{h}": (lambda f=f: f()) for (c, h), f in fns.items()}, (),
        repeats=_REPEATS.value, warmup=2)
    block = []
    for cell, name in fns:
      secs = samples[f"{cell}/{name}"]
      ms = 1e3 * float(np.median(secs))
      tok_s = b * t / ms * 1e3
      block.append({"cell": cell, "variational_dropout": variants[cell][1], "head": name,
                    "batch_size": b, "ms_per_step": ms,
                    "tokens_per_sec": tok_s, "sec_per_epoch": steps_per_epoch * ms / 1e3,
                    "vs_faster_rnnlm": tok_s / FASTER_RNNLM_WORDS_PER_SEC})
    ms_of = {(r["cell"], r["head"]): r["ms_per_step"] for r in block}
    for r in block:  # None where the reference was not timed
      full_ms = ms_of.get((r["cell"], "full"))
      r["speedup_vs_full"] = full_ms / r["ms_per_step"] if full_ms else None
      if len(cells) > 1:
        r[f"speedup_vs_{cells[0]}"] = ms_of[cells[0], r["head"]] / r["ms_per_step"]
    rows += block
  print(f"{corpus.name}: V={len(corpus.vocab)}, {len(corpus.train)} train tokens; "
        f"{','.join(cells)} x{_LAYERS.value} H={_HIDDEN.value} T={_BPTT.value} "
        f"dropout={_DROPOUT.value} {_OPTIMIZER.value}; "
        f"{'one XLA thread' if one_thread else f'{os.cpu_count()} cores'}")
  benchmarking.print_table(rows, ["cell", "head", "batch_size", "ms_per_step", "tokens_per_sec",
                                  "sec_per_epoch", "speedup_vs_full", "vs_faster_rnnlm"]
                           + ([f"speedup_vs_{cells[0]}"] if len(cells) > 1 else []))
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_lm_heads", "rows": rows, "xla_flags": threads,
      "one_thread": one_thread, "corpus": corpus.name, "vocab_size": len(corpus.vocab),
      "faster_rnnlm_words_per_sec": FASTER_RNNLM_WORDS_PER_SEC,
      "flags": {k: flags.FLAGS[k].value for k in (
          "heads", "cell", "layers", "hidden", "batch_size", "bptt", "dropout",
          "variational_dropout", "head_binning",
          "optimizer", "repeats", "keep_freed_memory")},
      "keep_freed_memory_applied": applied})


if __name__ == "__main__":
  app.run(main)
