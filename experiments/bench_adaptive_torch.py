r"""lm_jax's adaptive softmax against PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss``, side by side.

Both get the same parameters (PyTorch's module initialises them; :func:`lm_jax.heads.
params_from_torch` moves them across), the same ``[N, H]`` hidden states and the same
Zipfian targets (ids are frequency ranks, as PyTorch requires). Timed: one forward and
backward of the mean loss with respect to every parameter and the hidden states:

* ``lm_jax``: ``jax.jit(jax.value_and_grad(lambda p, h: head.loss(p, h, t).mean(),
  argnums=(0, 1)))``, the documented call (``heads.adaptive_softmax(V, cutoffs,
  div_value=4.0)``), nothing else set up;
* ``torch``: ``module(h, t).loss.backward()`` with ``h.requires_grad``, PyTorch's own
  threads set to the cores this process may use, gradients zeroed (set to None) each call.

The two run in alternating interleaved rounds in one process; medians are reported as
microseconds per token and as a ratio. The losses of the two are checked to agree first.
PyTorch is a benchmark-only dependency (``pip install torch``), never lm_jax's.

  python experiments/bench_adaptive_torch.py      # V = 100k, H = 256, N = 2048, [2000, 10000, 50000], div 4
"""
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarking

from lm_jax import heads

_VOCAB = flags.DEFINE_integer("vocab_size", 100_000, "V")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "H")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "N, tokens per call")
_CUTOFFS = flags.DEFINE_list("cutoffs", ["2000", "10000", "50000"], "cutoffs")
_DIV = flags.DEFINE_float("div_value", 4.0, "div_value")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed rounds (medians reported)")
_JSON_OUT = flags.DEFINE_string("json_out", "results/bench_adaptive_torch.json", "output JSON")


def zipf_targets(vocab_size, num_tokens, seed=0):
  """Ids drawn with probability proportional to 1 / (id + 1)."""
  p = 1.0 / np.arange(1, vocab_size + 1)
  return np.random.default_rng(seed).choice(vocab_size, num_tokens, p=p / p.sum())


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top  (benchmark-only dependency)
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  torch.manual_seed(0)
  vocab_size, hidden, num_tokens = _VOCAB.value, _HIDDEN.value, _TOKENS.value
  cutoffs = [int(c) for c in _CUTOFFS.value]
  module = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab_size, cutoffs,
                                               div_value=_DIV.value)
  targets = zipf_targets(vocab_size, num_tokens)
  hidden_np = np.random.default_rng(1).normal(0.0, 1.0, (num_tokens, hidden)).astype(np.float32)

  head = heads.adaptive_softmax(vocab_size, cutoffs, div_value=_DIV.value)
  params = heads.params_from_torch(module.state_dict())
  hidden_NxH, targets_N = jnp.asarray(hidden_np), jnp.asarray(targets, jnp.int32)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, h: jnp.mean(head.loss(p, h, targets_N)), argnums=(0, 1)))

  hidden_t = torch.from_numpy(hidden_np).requires_grad_(True)
  targets_t = torch.from_numpy(targets.astype(np.int64))

  def torch_step():
    module.zero_grad(set_to_none=True)
    hidden_t.grad = None
    loss = module(hidden_t, targets_t).loss
    loss.backward()
    return loss.item()

  jax_loss = float(grad_fn(params, hidden_NxH)[0])
  torch_loss = torch_step()
  print(f"mean loss: lm_jax {jax_loss:.6f}, torch {torch_loss:.6f}")
  np.testing.assert_allclose(jax_loss, torch_loss, rtol=1e-4)
  (_, (grads, grad_hidden)) = grad_fn(params, hidden_NxH)
  np.testing.assert_allclose(np.asarray(grad_hidden), hidden_t.grad.numpy(), rtol=2e-3,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["tail"][0]["weight_WxR"]),
                             module.tail[0][1].weight.grad.numpy(), rtol=2e-3, atol=1e-6)

  start = time.time()
  samples = benchmarking.time_interleaved(
      {"lm_jax": lambda: grad_fn(params, hidden_NxH), "torch": torch_step}, (),
      repeats=_REPEATS.value, warmup=2)
  rows = [{"impl": name, "ms_per_call": 1e3 * float(np.median(s)),
           "us_per_token": 1e6 * float(np.median(s)) / num_tokens,
           "min_ms": 1e3 * float(np.min(s))} for name, s in samples.items()]
  torch_us = next(r["us_per_token"] for r in rows if r["impl"] == "torch")
  for row in rows:
    row["speedup_vs_torch"] = torch_us / row["us_per_token"]
  print(f"V={vocab_size} H={hidden} N={num_tokens} cutoffs={cutoffs} div={_DIV.value}; "
        f"{cores} core(s), torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"jax {jax.__version__}; {_REPEATS.value} interleaved rounds in {time.time() - start:.0f} s")
  benchmarking.print_table(rows, ["impl", "ms_per_call", "us_per_token", "min_ms",
                                  "speedup_vs_torch"])
  benchmarking.write_json(_JSON_OUT.value, {
      "benchmark": "bench_adaptive_torch", "rows": rows,
      "loss": {"lm_jax": jax_loss, "torch": torch_loss},
      "versions": {"torch": torch.__version__, "jax": jax.__version__},
      "cores": cores, "torch_threads": torch.get_num_threads(),
      "flags": {k: flags.FLAGS[k].value for k in (
          "vocab_size", "hidden", "tokens", "cutoffs", "div_value", "repeats")}})
  print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
