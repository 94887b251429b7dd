"""vmap-safety of every head: ``jax.vmap`` of a head's gradient over B problems (an ensemble,
per-example gradients) needs about B times one problem's temporary memory.

A ``lax.cond`` under ``vmap`` becomes a select over both branches' outputs; a CPU-tuned scan
whose cond returned its whole ``[V, H]`` carry made every item copy it (the class head's
scan backward needed 2.8x B before its cond returned only the item's window)."""
import jax
import jax.numpy as jnp
import pytest

from lm_jax import heads
from lm_jax.ops import fused
from lm_jax.train import portability

V, N, H, B = 2000, 256, 32, 4
SLACK = 1.25  # "about B times": what the batching itself may add
CASES = [(name, "auto") for name in heads.HEAD_NAMES] + [
    (name, "accelerator") for name in heads.HEAD_NAMES
    if "implementation" in heads.HEAD_OPTIONS[name] and name != "full"]


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name,implementation", CASES)
def test_vmap_of_the_gradient_needs_about_b_times_the_memory_of_one_problem(name,
                                                                            implementation):
  options = {} if implementation == "auto" else {"implementation": implementation}
  head = heads.make_head(name, vocab_size=V, counts=portability.zipf_counts(V), **options)
  params = jax.eval_shape(lambda k: head.init(k, H), jax.random.key(0))
  key = jax.random.key(0)
  grad = jax.grad(lambda p, t, h, y: head.loss(p, h, y, key=key, tables=t).mean())
  one = (params, head.tables, jax.ShapeDtypeStruct((N, H), jnp.float32),
         jax.ShapeDtypeStruct((N,), jnp.int32))
  batched = lambda x: jax.ShapeDtypeStruct((B,) + x.shape, x.dtype)
  many = (jax.tree.map(batched, params), head.tables, batched(one[2]), batched(one[3]))
  single = _temp_bytes(grad, *one)
  vmapped = _temp_bytes(jax.vmap(grad, in_axes=(0, None, 0, 0)), *many)
  assert single > 0
  assert vmapped <= SLACK * B * single, (
      f"{name} ({implementation}): vmap over {B} problems needs {vmapped / 1e6:.2f} MB of "
      f"temporaries, {vmapped / single / B:.2f}x B times one problem's {single / 1e6:.2f} MB")


@pytest.mark.parametrize("implementation", ["cpu", "accelerator"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_vmap_of_the_fused_loss_gradient_needs_about_b_times_one_problem(reduction,
                                                                         implementation):
  """The fused loss (``.mean()`` of its per-token losses, and ``reduction="sum"``) at a size
  where it streams. Its backward's cond takes an unbatched predicate under vmap
  (``fused._one_number``); with a batched one the adaptive head's accelerator case above
  needed 1.63x B (here the select's extra buffers are only 3%)."""
  n, v = 1024, 8192
  loss = lambda h, w, y: jnp.mean(fused.linear_softmax_cross_entropy(
      h, w, y, reduction=reduction, implementation=implementation))
  grad = jax.grad(loss, argnums=(0, 1))
  one = (jax.ShapeDtypeStruct((n, H), jnp.float32), jax.ShapeDtypeStruct((v, H), jnp.float32),
         jax.ShapeDtypeStruct((n,), jnp.int32))
  many = tuple(jax.ShapeDtypeStruct((B,) + x.shape, x.dtype) for x in one)
  single, vmapped = _temp_bytes(grad, *one), _temp_bytes(jax.vmap(grad), *many)
  assert 0 < vmapped <= SLACK * B * single, (vmapped / single / B)
