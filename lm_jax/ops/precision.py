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

(each accumulated in float32, returned in the operand's dtype). For float32 (or wider)
operands it is ``jnp.matmul`` with ``preferred_element_type``, autodiff unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_matmul(a_NxK, b_KxM, dtype):
  return jnp.matmul(a_NxK, b_KxM, preferred_element_type=dtype)


def _narrow_fwd(a_NxK, b_KxM, dtype):
  return _narrow_matmul(a_NxK, b_KxM, dtype), (a_NxK, b_KxM)


def _narrow_bwd(dtype, residuals, ct_NxM):
  a_NxK, b_KxM = residuals
  ct_NxM = ct_NxM.astype(jnp.promote_types(a_NxK.dtype, b_KxM.dtype))
  da_NxK = jnp.matmul(ct_NxM, b_KxM.T, preferred_element_type=dtype).astype(a_NxK.dtype)
  db_KxM = jnp.matmul(a_NxK.T, ct_NxM, preferred_element_type=dtype).astype(b_KxM.dtype)
  return da_NxK, db_KxM


_narrow_matmul.defvjp(_narrow_fwd, _narrow_bwd)


def matmul(a_NxK: jax.typing.ArrayLike, b_KxM: jax.typing.ArrayLike) -> jax.Array:
  """``a @ b`` of two matrices, accumulated and returned in ``result_type(float32, a, b)``;
  with bfloat16 (or float16) operands the gradient matmuls take that dtype too (module
  docstring).

  >>> a = jnp.ones((2, 3), jnp.bfloat16)
  >>> matmul(a, a.T).dtype, jax.grad(lambda a: matmul(a, a.T).sum())(a).dtype
  (dtype('float32'), dtype(bfloat16))
  """
  a_NxK, b_KxM = jnp.asarray(a_NxK), jnp.asarray(b_KxM)
  if a_NxK.ndim != 2 or b_KxM.ndim != 2:
    raise ValueError(f"matmul takes two matrices, got shapes {a_NxK.shape} and {b_KxM.shape}")
  dtype = jnp.result_type(jnp.float32, a_NxK, b_KxM)
  if jnp.promote_types(a_NxK.dtype, b_KxM.dtype) == dtype:
    return jnp.matmul(a_NxK, b_KxM, preferred_element_type=dtype)
  return _narrow_matmul(a_NxK, b_KxM, dtype)
