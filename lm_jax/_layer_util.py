"""Plumbing shared by the Flax layers (:mod:`lm_jax.nnx`, :mod:`lm_jax.linen`); JAX only."""

from __future__ import annotations

from typing import Any, Callable, Optional
import warnings

import jax
import jax.numpy as jnp

from lm_jax.ops.precision import cast_floating  # pylint: disable=unused-import  (re-exported)


def leaf_name(path) -> str:
  """``"band_weights/0"`` for the key path ``('band_weights', 0)`` of a params pytree."""
  parts = []
  for key in path:
    for field in ("key", "idx", "name"):
      if hasattr(key, field):
        parts.append(str(getattr(key, field)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def shape_axes(name: str, ndim: int) -> Optional[tuple[str, ...]]:
  """The shape letters in a leaf's name: ``weight_VxH`` -> ``("V", "H")``; None if it has none."""
  suffix = name.rsplit("/", 1)[-1].rsplit("_", 1)[-1]
  letters = tuple(suffix.split("x"))
  if len(letters) == ndim and all(len(a) == 1 and a.isupper() for a in letters):
    return letters
  return None


def fan_in_axis(name: str, ndim: int) -> int:
  """The axis of a weight leaf that its matmul contracts with the input (its fan-in).

  The axis lettered ``H`` (hidden) or ``E`` (embedding) in the leaf's name
  (``weight_VxH`` -> 1, ``W_hh_HxG`` -> 0, ``W_xh_ExG`` -> 0); otherwise the last axis, as
  the heads store their other matrices ``[out, in]`` (``weight_WxR``: ``R``;
  ``band_weights/0``: the band's slice of ``H``).
  """
  axes = shape_axes(name, ndim) or ()
  for letter in ("H", "E"):
    if letter in axes:
      return axes.index(letter)
  return ndim - 1


def init_leaf(initializer: Callable[..., jax.Array], key, name: str, shape, dtype) -> jax.Array:
  """``initializer(key, shape, dtype)`` for the leaf ``name`` with its true fan-in.

  A ``jax.nn.initializers`` function sees the shape as Flax's ``Dense`` kernel has it,
  ``[..., in, out]`` (fan-in second to last, :func:`fan_in_axis`); the result is moved
  back to the leaf's own layout (``weight_VxH``: drawn ``[H, V]``, stored transposed).
  Vectors and scalars get ``initializer(key, shape, dtype)`` as they are.
  """
  shape = tuple(shape)
  if len(shape) < 2:  # a bias: no fan-in to place
    return initializer(key, shape, dtype)
  in_axis = fan_in_axis(name, len(shape))
  rest = [axis for axis in range(len(shape)) if axis != in_axis]
  order = rest[:-1] + [in_axis, rest[-1]]
  drawn = initializer(key, tuple(shape[axis] for axis in order), dtype)
  return jnp.transpose(drawn, tuple(order.index(axis) for axis in range(len(shape))))


def leaf_initializer(ndim: int, kernel_init, bias_init):
  """``kernel_init`` for matrices, ``bias_init`` for vectors; None (the head's or cell's own
  init) for scalars such as NCE's ``log_z``, or where that initializer is None."""
  return kernel_init if ndim >= 2 else bias_init if ndim == 1 else None


def initialize_leaves(params: Any, key, kernel_init, bias_init, dtype) -> Any:
  """``params`` with each leaf that :func:`leaf_initializer` assigns an initializer redrawn
  by :func:`init_leaf` (key: ``key`` folded with the leaf's index); the others kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for index, (path, leaf) in enumerate(leaves):
    initializer = leaf_initializer(jnp.ndim(leaf), kernel_init, bias_init)
    out.append(leaf if initializer is None else
               init_leaf(initializer, jax.random.fold_in(key, index), leaf_name(path),
                         jnp.shape(leaf), dtype))
  return jax.tree.unflatten(treedef, out)


def resolve_param_init(param_init, kernel_init, bias_init):
  """``(kernel_init, bias_init)``, with the deprecated ``param_init`` standing in for both
  where they are None (and a ``DeprecationWarning``)."""
  if param_init is None:
    return kernel_init, bias_init
  warnings.warn("param_init is deprecated: use kernel_init (matrices, drawn with their true "
                "fan-in) and bias_init (vectors)", DeprecationWarning, stacklevel=3)
  return kernel_init or param_init, bias_init or param_init


def flatten_hidden(hidden_xH: Any, in_features: int, dtype) -> tuple[jax.Array, tuple]:
  """``(hidden_NxH, lead)``: ``[..., H]`` hidden states cast to ``dtype`` and flattened for a
  head, and the leading shape to give its per-token results back."""
  hidden_xH = cast_floating(jnp.asarray(hidden_xH), dtype)
  if hidden_xH.ndim < 1 or hidden_xH.shape[-1] != in_features:
    raise ValueError(f"hidden states have shape {hidden_xH.shape}; this layer takes "
                     f"[..., in_features={in_features}]")
  return hidden_xH.reshape(-1, in_features), hidden_xH.shape[:-1]
