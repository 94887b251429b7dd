"""optax's own classification tests, run with lm_jax's functions in place of optax's.

lm_jax borrows four of optax's names (``softmax_cross_entropy``,
``softmax_cross_entropy_with_integer_labels``, ``sigmoid_binary_cross_entropy``); a
borrowed name promises optax's behaviour. optax ships its test file
(``optax/losses/_classification_test.py``): each test below replaces the optax function
of that name, ``optax.losses._classification.<name>``, by lm_jax's and runs optax's
``TestCase`` classes that exercise it, directly (``SoftmaxCrossEntropyTest``, ...) or
through an optax loss built on it (``PolyLossTest`` calls ``softmax_cross_entropy(logits=,
labels=, axis=, where=)``, ``SigmoidFocalLossTest`` calls
``sigmoid_binary_cross_entropy``). What they check: values on tiny arrays (jitted),
``check_grads`` in forward and reverse mode, finite gradients under a per-example
``where``, zero loss for rows whose per-logit ``where`` is all False, ``where`` equal to
dropping the masked entries, class axes 0/1/2 and tuples of (negative, unordered) axes,
keyword calls (``labels=``, ``where=``) and positional ``axis``; float64 numpy inputs.
"""
import contextlib
import importlib
import os
import unittest

import pytest

import lm_jax
from lm_jax.ops import losses

optax = pytest.importorskip("optax")
pytest.importorskip("absl.testing.parameterized",
                    reason="optax's test file needs absl-py (absl.testing.parameterized)")

_TEST_FILE = os.path.join(os.path.dirname(optax.__file__), "losses", "_classification_test.py")
if not os.path.exists(_TEST_FILE):
  pytest.skip(f"this optax build does not ship its tests ({_TEST_FILE} is missing)",
              allow_module_level=True)
optax_tests = importlib.import_module("optax.losses._classification_test")
_classification = importlib.import_module("optax.losses._classification")

# lm_jax's function under each of optax's names -> optax's test classes that exercise it.
BORROWED = {
    "softmax_cross_entropy": (
        "SoftmaxCrossEntropyTest", "SafeSoftmaxCrossEntropyTest", "PolyLossTest",
        "SoftmaxCrossEntropyWithIntegerLabelsTest"),
    "softmax_cross_entropy_with_integer_labels": ("SoftmaxCrossEntropyWithIntegerLabelsTest",),
    "sigmoid_binary_cross_entropy": ("SigmoidCrossEntropyTest", "SigmoidFocalLossTest"),
}


def test_every_optax_name_in_lm_jax_is_covered():
  optax_names = {n for n in dir(optax.losses) if not n.startswith("_")}
  borrowed = {n for n in dir(lm_jax) if n in optax_names and callable(getattr(lm_jax, n))}
  borrowed |= {n for n in dir(lm_jax.ops) if n in optax_names and callable(getattr(lm_jax.ops, n))}
  assert borrowed == set(BORROWED)
  for name in BORROWED:
    assert getattr(lm_jax, name) is getattr(losses, name)


@contextlib.contextmanager
def _swapped(names):
  """optax's ``_classification.<name>`` replaced by lm_jax's for every name in ``names``."""
  saved = {name: getattr(_classification, name) for name in names}
  try:
    for name in names:
      setattr(_classification, name, getattr(losses, name))
    yield
  finally:
    for name, fn in saved.items():
      setattr(_classification, name, fn)


def _run(test_classes):
  suite = unittest.TestSuite(
      unittest.defaultTestLoader.loadTestsFromTestCase(getattr(optax_tests, name))
      for name in test_classes)
  result = unittest.TestResult()
  suite.run(result)
  problems = [f"{test.id()}:\n{trace}" for test, trace in result.failures + result.errors]
  return result.testsRun, problems


@pytest.mark.parametrize("name", sorted(BORROWED))
def test_optax_classification_tests_pass_with_lm_jax_function(name):
  with _swapped([name]):
    runs, problems = _run(BORROWED[name])
  assert runs >= 5, runs
  assert not problems, "\n\n".join(problems)

