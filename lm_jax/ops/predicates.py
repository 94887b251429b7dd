"""Scalar predicates that stay one scalar under ``vmap``, so that a ``lax.cond`` on them stays
a conditional: with a batched predicate ``vmap`` turns the cond into a select that runs both
branches for every problem (and keeps both branches' outputs: a ``[V, H]`` carry per item
in a scan). Under ``vmap`` they reduce over the problems instead."""
import jax
import jax.numpy as jnp
from jax import custom_batching


def _batched_rule(reduce):
  def rule(axis_size, in_batched, pred):
    del axis_size
    return (reduce(pred) if in_batched[0] else pred), False
  return rule


@custom_batching.custom_vmap
def any_problem(pred: jax.Array) -> jax.Array:
  """``pred`` (a bool scalar); under ``vmap`` one unbatched ``any`` over the problems."""
  return pred


@custom_batching.custom_vmap
def every_problem(pred: jax.Array) -> jax.Array:
  """``pred`` (a bool scalar); under ``vmap`` one unbatched ``all`` over the problems."""
  return pred


any_problem.def_vmap(_batched_rule(jnp.any))
every_problem.def_vmap(_batched_rule(jnp.all))
