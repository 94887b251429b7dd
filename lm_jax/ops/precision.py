r"""Mixed precision: a matmul of narrow (bfloat16) operands that accumulates in float32 both ways.

``jnp.matmul(a, b, preferred_element_type=float32)`` of bfloat16 ``a, b`` accumulates in
float32 and returns float32, as losses want; but its autodiff transpose multiplies the
float32 cotangent by a bfloat16 operand, which XLA promotes: the two gradient matmuls run in
float32, 2-4x slower on accelerators' bfloat16 units. :func:`matmul` rounds the cotangent to
the operands' dtype first, so the backward's matmuls are bfloat16 too (accumulating in
float32):

.. math::
  C = A B \text{ (float32)}, \qquad
  \bar A = \mathrm{bf16}(\bar C)\, B^\top, \quad \bar B = A^\top \mathrm{bf16}(\bar C)

(each accumulated in float32, returned in the operand's dtype). For any other operands
(float32, float64, float16, mixed) it is ``jnp.matmul`` with ``preferred_element_type``,
autodiff unchanged.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def cast_floating(tree: Any, dtype, *, matrices_only: bool = False) -> Any:
  """Floating leaves of ``tree`` cast to ``dtype`` (None: unchanged); integer leaves kept.
  ``matrices_only``: only leaves of rank >= 2 (mixed precision keeps biases and scalars as
  they are: they are added, not multiplied, and their gradients are sums)."""
  if dtype is None:
    return tree

  def cast(x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating) or (
        matrices_only and jnp.ndim(x) < 2):
      return x
    return jnp.asarray(x).astype(dtype)

  return jax.tree.map(cast, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_matmul(a, b, dtype):
  return jnp.matmul(a, b, preferred_element_type=dtype)


def _narrow_fwd(a, b, dtype):
  return _narrow_matmul(a, b, dtype), (a, b)


def _narrow_bwd(dtype, residuals, ct):
  a, b = residuals
  ct = ct.astype(jnp.promote_types(a.dtype, b.dtype))
  da = jnp.matmul(ct, b.T, preferred_element_type=dtype).astype(a.dtype)
  db = jnp.matmul(a.T, ct, preferred_element_type=dtype).astype(b.dtype)
  return da, db


_narrow_matmul.defvjp(_narrow_fwd, _narrow_bwd)


def matmul(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> jax.Array:
  """``a @ b`` of two matrices (``[n, k]`` and ``[k, m]``), accumulated and returned in
  ``result_type(float32, a, b)``; with bfloat16 operands the gradient matmuls take bfloat16
  too (module docstring). float16 operands keep autodiff's float32 cotangent: float16's
  exponent range would flush a mean's small gradients to zero (bfloat16 has float32's).

  >>> a = jnp.ones((2, 3), jnp.bfloat16)
  >>> matmul(a, a.T).dtype, jax.grad(lambda a: matmul(a, a.T).sum())(a).dtype
  (dtype('float32'), dtype(bfloat16))
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"matmul takes two matrices, got shapes {a.shape} and {b.shape}")
  dtype = jnp.result_type(jnp.float32, a, b)
  if jnp.promote_types(a.dtype, b.dtype) != jnp.bfloat16:
    return jnp.matmul(a, b, preferred_element_type=dtype)
  return _narrow_matmul(a, b, dtype)
