"""Tests for lm_jax.ops.labels: the one label check of the kernels, the fused loss and the heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import heads
from lm_jax.ops import fused
from lm_jax.ops import labels
from lm_jax.ops import losses


def test_messages_name_the_label_its_index_and_v():
  with pytest.raises(ValueError, match=r"^label 3 at index 1 is out of range for vocabulary "
                                       r"size V=3 \(labels must lie in \[0, 3\)\)$"):
    labels.check_in_range(np.array([2, 3, 0]), 3)
  with pytest.raises(ValueError, match=r"^target -1 at index \(1, 0\) .*\[0, 4\); pad\)$"):
    labels.check_in_range(np.array([[0, 1], [-1, 9]]), 4, what="target", hint="; pad")
  labels.check_in_range(np.array([2, -1, 7]), 3, np.array([True, False, False]))  # uncounted
  labels.check_in_range([0, 1], 2)  # lists too
  # Any integer dtype, no wrap-around: 2**40 is out of range, 255 of uint8 too.
  with pytest.raises(ValueError, match=f"label {2**40} at index 0"):
    labels.check_in_range(np.array([2**40], np.int64), 5)
  with pytest.raises(ValueError, match="label 255 at index 0"):
    labels.check_in_range(np.array([255], np.uint8), 5)


def test_in_range_int32_marks_every_out_of_range_label():
  got = labels.in_range_int32(jnp.array([0, 4, -3, 5], jnp.int32), 5)
  assert got.tolist() == [0, 4, -1, -1]
  assert labels.in_range_int32(jnp.array([7, 255], jnp.uint8), 300).tolist() == [7, 255]


def test_nothing_is_read_under_jit():
  @jax.jit
  def f(y):
    labels.check_in_range(y, 2)  # a tracer: no error, no read
    labels.validate_labels(y, 2)
    return y
  assert f(jnp.array([5])).tolist() == [5]


def _on_an_accelerator(monkeypatch):
  """Arrays now look as if they lived on a GPU (this host has none)."""
  monkeypatch.setattr(labels, "_platforms", lambda x: {"gpu"})


def test_arrays_on_an_accelerator_are_not_read_unless_asked(monkeypatch):
  _on_an_accelerator(monkeypatch)
  bad = jnp.array([0, 7])
  assert not labels.readable_on_host(bad) and labels.readable_on_host(np.asarray(bad))
  labels.check_in_range(bad, 3)  # no blocking device-to-host read, no error
  with pytest.raises(ValueError, match="label 7 at index 1"):
    labels.check_in_range(np.asarray(bad), 3)  # host data costs no transfer: checked
  with pytest.raises(ValueError, match="label 7 at index 1"):
    labels.validate_labels(bad, 3)  # asked for: read wherever it lives


def test_every_caller_uses_the_rule(monkeypatch):
  """The CE kernel, the fused loss and a head: on the host a ValueError; for arrays on an
  accelerator nothing is read eagerly and the bad label makes the loss NaN instead."""
  logits = jnp.zeros((2, 3))
  hidden, weight = jnp.ones((2, 4)), jnp.ones((3, 4))
  head = heads.full_softmax(3)
  params = head.init(jax.random.key(0), 4)
  calls = {
      "losses": lambda y: losses.softmax_cross_entropy_with_integer_labels(logits, y),
      "fused": lambda y: fused.linear_softmax_cross_entropy(hidden, weight, y),
      "head": lambda y: head.loss(params, hidden, y),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match=r"(label|target) 3 at index 1 is out of range"):
      call(jnp.array([0, 3]))
  _on_an_accelerator(monkeypatch)
  for name, call in calls.items():
    loss = np.asarray(call(jnp.array([0, 3])))
    assert np.isfinite(loss[0]) and np.isnan(loss[1]), name
