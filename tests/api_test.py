"""The public names and signatures the issues fix are part of the contract."""
import inspect

import pytest

import lm_jax

SIGNATURES = {
    "entropy": "(probs, axis=-1, *, base=2.0)",
    "cross_entropy": "(probs, q_probs, axis=-1, *, base=2.0)",
    "kl_divergence": "(probs, q_probs, axis=-1, *, base=2.0)",
    "perplexity": "(token_log_probs, where=None)",
    "bits_per_token": "(token_log_probs, where=None)",
    "softmax": "(logits, axis=-1, *, temperature=1.0, where=None)",
    "log_softmax": "(logits, axis=-1, *, temperature=1.0, where=None)",
    "softmax_cross_entropy_with_integer_labels": "(logits, labels, axis=-1, where=None)",
    "softmax_cross_entropy": "(logits, label_probs, axis=-1, where=None)",
    "sigmoid_binary_cross_entropy": "(logits, labels)",
    "nll": "(log_probs, labels, axis=-1, where=None)",
    "linear_softmax_cross_entropy":
        "(hidden_NxH, weight_VxH, labels_N, *, bias_V=None, where=None, reduction='none', "
        "label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None, return_lse=False, chunk_size=None)",
}


def _plain(fn):
  sig = inspect.signature(fn)
  params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
  return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_public_signature(name):
  assert _plain(getattr(lm_jax, name)).startswith(SIGNATURES[name][:-1])


def test_modules_and_components_are_reachable():
  for name in ("logsumexp", "loglinear", "Vocab", "make_language_model", "TrainState",
               "train_step", "OutputHead", "full_softmax", "scan_layer"):
    assert hasattr(lm_jax, name), name
  for name in ("log_probs", "nll", "fit", "expected_features", "empirical_features"):
    assert callable(getattr(lm_jax.loglinear, name)), name
