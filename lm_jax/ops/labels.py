r"""Integer labels (token ids) in ``[0, V)``: the one check that every kernel and head uses.

The rule, everywhere in lm_jax: a label whose example is not counted (``where`` False) may be
anything (``-1`` padding is PyTorch's ``ignore_index``); a counted label outside ``[0, V)``
is an error. When the labels can be read without a device-to-host transfer (NumPy data,
Python lists, arrays on a CPU device) :func:`check_in_range` raises ``ValueError`` naming
the label, its index and ``V``. Under ``jit`` (tracers), and for arrays that live on a GPU or
TPU, it reads nothing: reading would block the host on the device at every call. There the
callers make the result NaN (the loss and the gradients it reaches), so a NaN guard sees a
bad label. Ask for the eager check on any device with :func:`validate_labels`.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def in_range_int32(labels: jax.Array, num_classes: int) -> jax.Array:
  """int32 labels with every out-of-range label (of any integer dtype, no wrap-around) as -1."""
  valid = labels >= 0
  if jnp.iinfo(labels.dtype).max >= num_classes:
    valid &= labels < jnp.asarray(num_classes, labels.dtype)
  return jnp.where(valid, labels, -1).astype(jnp.int32)


def readable_on_host(*xs) -> bool:
  """True when none of ``xs`` is a tracer and every JAX array among them is on a CPU device
  (reading it is no device-to-host transfer); ``None`` entries are ignored."""
  for x in xs:
    if isinstance(x, jax.core.Tracer):
      return False
    if isinstance(x, jax.Array) and _platforms(x) != {"cpu"}:
      return False
  return True


def _platforms(x: jax.Array) -> set[str]:
  return {device.platform for device in x.devices()}


def check_in_range(labels, num_classes: int, counted=None, *, what: str = "label",
                   hint: str = "", always: bool = False) -> None:
  """Raises ``ValueError`` for the first counted label outside ``[0, num_classes)``.

  Args:
    labels: integer labels, any shape.
    num_classes: ``V``.
    counted: optional bool mask of ``labels``' shape: only these labels are checked.
    what: the word for a label in the message (``"label"``, ``"target"``).
    hint: appended inside the message's parentheses.
    always: read the labels even on an accelerator (a blocking transfer); else only when
      :func:`readable_on_host`.

  >>> check_in_range(np.array([2, -1, 0]), 3, np.array([True, False, True]))
  >>> check_in_range(np.array([2, 3]), 3)
  Traceback (most recent call last):
  ...
  ValueError: label 3 at index 1 is out of range for vocabulary size V=3 (labels must lie in [0, 3))
  """
  if any(isinstance(x, jax.core.Tracer) for x in (labels, counted)):
    return
  if not always and not readable_on_host(labels, counted):
    return
  labels_np = np.asarray(labels)
  bad = ~((labels_np >= 0) & (labels_np < num_classes))  # exact for every int dtype
  if counted is not None:
    bad &= np.asarray(counted, bool)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where_text = index[0] if len(index) == 1 else index
    raise ValueError(f"{what} {int(labels_np[index])} at index {where_text} is out of range for "
                     f"vocabulary size V={num_classes} ({what}s must lie in [0, {num_classes})"
                     f"{hint})")


def validate_labels(labels: jax.typing.ArrayLike, num_classes: int,
                    where: Optional[jax.typing.ArrayLike] = None) -> None:
  """The eager check, asked for: reads ``labels`` (and ``where``) wherever they live, blocking
  until they are computed, and raises ``ValueError`` naming the first counted label outside
  ``[0, num_classes)``. A no-op under ``jit``."""
  check_in_range(labels, num_classes, where, always=True)
