r"""Time of one truncated-BPTT train step with the fused output layer vs an unfused one.

The unfused head computes ``hidden @ weight.T + bias`` and optax's integer-label
cross-entropy; the "fused" row is ``lm_jax.heads.full_softmax``, which calls
``linear_softmax_cross_entropy`` when ``N * V > 2**24`` and otherwise materialises the
logits and uses lm_jax's closed-form CE kernel. Same model, same batch, interleaved rounds.
The "fused, bfloat16" row is the fused model under ``--dtype=bfloat16`` mixed precision
(``make_language_model(dtype=jnp.bfloat16)``: float32 params, bfloat16 matmuls); on a CPU,
XLA emulates bfloat16 arithmetic, so expect it slower there and faster on GPU/TPU.

  python experiments/bench_train_step.py                      # PTB sizes: 2x200 LSTM, V=10002
  python experiments/bench_train_step.py --cell=elman --layers=1 --bptt=35
"""
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarking

from lm_jax import heads
from lm_jax.models import language_model
from lm_jax.train import optimizers
from lm_jax.train import training

_VOCAB = flags.DEFINE_integer("vocab_size", 10002, "V")
_HIDDEN = flags.DEFINE_integer("hidden", 200, "H (= E)")
_LAYERS = flags.DEFINE_integer("layers", 2, "recurrent layers")
_CELL = flags.DEFINE_string("cell", "lstm", "cell name")
_BATCH = flags.DEFINE_integer("batch_size", 20, "B")
_BPTT = flags.DEFINE_integer("bptt", 20, "T")
_REPEATS = flags.DEFINE_integer("repeats", 15, "timed rounds (medians reported)")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_train_step.json", "output JSON")


def unfused_head(vocab_size):
  """``full_softmax`` with its loss replaced by logits + optax (the [N, V] baseline)."""
  base = heads.full_softmax(vocab_size)

  def loss(params, hidden_NxH, targets_N, *, key=None, where=None):
    del key
    logits_NxV = hidden_NxH @ params["weight_VxH"].T + params["bias_V"]
    loss_N = optax.softmax_cross_entropy_with_integer_labels(logits_NxV, targets_N)
    return loss_N if where is None else jnp.where(where, loss_N, 0.0)

  return base._replace(loss=loss)


def main(argv):
  del argv
  v, b, t = _VOCAB.value, _BATCH.value, _BPTT.value
  kwargs = dict(embed_size=_HIDDEN.value, hidden_size=_HIDDEN.value, num_layers=_LAYERS.value,
                cell=_CELL.value)
  models = {"fused": language_model.make_language_model(vocab_size=v, **kwargs),
            "unfused": language_model.make_language_model(vocab_size=v, head=unfused_head(v),
                                                          **kwargs),
            "no head (V=2)": language_model.make_language_model(vocab_size=2, **kwargs),
            "fused, bfloat16": language_model.make_language_model(vocab_size=v, **kwargs,
                                                                  dtype=jnp.bfloat16)}
  tokens = np.random.default_rng(0).integers(0, 2, size=(b, t + 1)).astype(np.int32)
  batch = {"inputs_BxT": jnp.asarray(tokens[:, :-1]), "targets_BxT": jnp.asarray(tokens[:, 1:]),
           "mask_BxT": jnp.ones((b, t), bool), "reset": jnp.asarray(False)}
  opt = optimizers.make_optimizer("sgd", 0.0, clip=5.0)
  fns, states = {}, {}
  for name, model in models.items():
    states[name] = training.create_train_state(model, opt, seed=0, batch_size=b)
    step = jax.jit(functools.partial(training.train_step, model=model, optimizer=opt,
                                     grad_reduction="sum_over_time"))
    fns[name] = functools.partial(lambda f, s: f(s, batch)[1], step, states[name])
  samples = benchmarking.time_interleaved({k: (lambda f=f: f()) for k, f in fns.items()}, (),
                                          repeats=_REPEATS.value, warmup=2)
  rows = []
  for name, secs in samples.items():
    ms = 1e3 * float(np.median(secs))
    rows.append({"model": name, "ms_per_step": ms, "tokens_per_sec": b * t / ms * 1e3})
  for row in rows:
    row["vs_unfused"] = row["ms_per_step"] / rows[1]["ms_per_step"]
    row["vs_fused_float32"] = row["ms_per_step"] / rows[0]["ms_per_step"]
  facts = benchmarking.machine_facts()
  where = (facts["cpu_model"] if facts["backend"] == "cpu"
           else f"{facts['device']} (host CPU {facts['cpu_model']})")
  print(f"B={b} T={t} H={_HIDDEN.value} layers={_LAYERS.value} cell={_CELL.value} V={v} "
        f"on {where}")
  benchmarking.print_table(rows, ["model", "ms_per_step", "tokens_per_sec", "vs_unfused",
                                  "vs_fused_float32"])
  benchmarking.write_json(_JSON_OUT.value, {"benchmark": "bench_train_step", "rows": rows,
                                            "machine": facts,
                                            "flags": {k: flags.FLAGS[k].value for k in (
                                                "vocab_size", "hidden", "layers", "cell",
                                                "batch_size", "bptt", "repeats")}})


if __name__ == "__main__":
  app.run(main)
