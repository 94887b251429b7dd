"""Plumbing shared by the Flax layers (:mod:`lm_jax.nnx`, :mod:`lm_jax.linen`); JAX only."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


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


def cast_floating(tree: Any, dtype) -> Any:
  """Floating leaves of ``tree`` cast to ``dtype`` (None: unchanged); integer leaves kept."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def flatten_hidden(hidden_xH: Any, in_features: int, dtype) -> tuple[jax.Array, tuple]:
  """``(hidden_NxH, lead)``: ``[..., H]`` hidden states cast to ``dtype`` and flattened for a
  head, and the leading shape to give its per-token results back."""
  hidden_xH = cast_floating(jnp.asarray(hidden_xH), dtype)
  if hidden_xH.ndim < 1 or hidden_xH.shape[-1] != in_features:
    raise ValueError(f"hidden states have shape {hidden_xH.shape}; this layer takes "
                     f"[..., in_features={in_features}]")
  return hidden_xH.reshape(-1, in_features), hidden_xH.shape[:-1]
