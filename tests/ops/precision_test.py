"""Tests for lm_jax.ops.precision.matmul: bfloat16 both ways, float32 accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lm_jax.ops import precision


def _operands(dtype):
  a = jax.random.normal(jax.random.PRNGKey(0), (5, 7)).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (7, 3)).astype(dtype)
  return a, b


def test_bfloat16_forward_and_backward_matmuls_are_bfloat16(dot_dtypes):
  a, b = _operands(jnp.bfloat16)
  out = precision.matmul(a, b)
  assert out.dtype == jnp.float32
  # Forward: exact products of the bfloat16 operands, summed in float32.
  np.testing.assert_allclose(out, np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                             rtol=1e-6, atol=1e-6)
  ct = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
  loss = lambda a, b: jnp.sum(precision.matmul(a, b) * ct)  # (vdot would be a dot too)
  assert dot_dtypes(jax.grad(loss, argnums=(0, 1)), a, b) == [("bfloat16", "bfloat16")] * 3
  da, db = jax.grad(loss, argnums=(0, 1))(a, b)
  assert da.dtype == db.dtype == jnp.bfloat16
  # The cotangent rounded to bfloat16 (8-bit mantissa), then exact products in float32.
  ct16 = np.asarray(ct.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(da, np.float64), ct16 @ np.asarray(b, np.float64).T,
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(db, np.float64), np.asarray(a, np.float64).T @ ct16,
                             rtol=1e-2, atol=1e-2)
  # Plain autodiff of preferred_element_type would multiply a float32 cotangent by bfloat16.
  plain = lambda a, b: jnp.sum(jnp.matmul(a, b, preferred_element_type=jnp.float32) * ct)
  assert ("float32", "bfloat16") in dot_dtypes(jax.grad(plain, argnums=(0, 1)), a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_other_dtypes_are_jnp_matmul(dtype, dot_dtypes):
  a, b = _operands(dtype)
  np.testing.assert_array_equal(precision.matmul(a, b),
                                jnp.matmul(a, b, preferred_element_type=jnp.float32))
  if dtype == jnp.float32:
    check_grads(precision.matmul, (a, b), order=2, modes=("fwd", "rev"))
  else:  # float16: autodiff's float32 cotangent is kept (no flush of small gradients)
    dots = dot_dtypes(jax.grad(lambda a: precision.matmul(a, b).sum()), a)
    assert ("float32", "float16") in dots or ("float16", "float32") in dots, dots


def test_bfloat16_under_vmap_and_jit():
  a, b = _operands(jnp.bfloat16)
  batched = jax.jit(jax.vmap(precision.matmul, in_axes=(0, None)))(jnp.stack([a, a]), b)
  np.testing.assert_array_equal(batched[1], precision.matmul(a, b))
  grads = jax.vmap(jax.grad(lambda a: precision.matmul(a, b).sum()))(jnp.stack([a, a]))
  assert grads.shape == (2, 5, 7) and grads.dtype == jnp.bfloat16


def test_matrices_only():
  with pytest.raises(ValueError, match="two matrices"):
    precision.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))
