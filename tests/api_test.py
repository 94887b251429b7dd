"""The public names and signatures the issues fix are part of the contract."""
import ast
import inspect
import os
import subprocess
import sys

import pytest

import lm_jax

SIGNATURES = {
    "entropy": "(probs, axis=-1, *, base=2.0)",
    "cross_entropy": "(probs, q_probs, axis=-1, *, base=2.0)",
    "relative_entropy": "(probs, q_probs, axis=-1, *, base=2.0)",
    "perplexity": "(token_log_probs, where=None)",
    "bits_per_token": "(token_log_probs, where=None)",
    "softmax": "(logits, axis=-1, *, temperature=1.0, where=None)",
    "log_softmax": "(logits, axis=-1, *, temperature=1.0, where=None)",
    "softmax_cross_entropy_with_integer_labels": "(logits, labels, axis=-1, where=None)",
    "softmax_cross_entropy": "(logits, labels, axis=-1, where=None)",
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
    assert callable(getattr(lm_jax.maxent.loglinear, name)), name


# --- Layout: subpackages by purpose, imports only downward, a light `import lm_jax`. ---

PACKAGE = os.path.dirname(os.path.abspath(lm_jax.__file__))
# Each room may import from itself and the rooms listed for it, never from a later one.
ALLOWED = {
    "ops": {"ops"},
    "data": {"data"},
    "heads": {"heads", "ops"},
    "models": {"models", "heads", "ops"},
    "maxent": {"maxent", "ops"},
    "train": {"train", "models", "heads", "ops", "data"},
    "nnx": {"heads", "models", "ops", "_layer_util"},
    "linen": {"heads", "models", "ops", "_layer_util"},
    "_layer_util": {"ops"},
    "commands": {"commands", "train", "models", "heads", "ops", "data"},
}


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py") and root != PACKAGE or name in ("nnx.py", "linen.py",
                                                               "_layer_util.py"):
        path = os.path.join(root, name)
        room = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
        yield room, path


def _lm_jax_imports(tree):
  """(room imported, line, at module level?) for every import of lm_jax in a module."""
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm_jax"):
      parts = node.module.split(".")
      names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name.split(".")[1] for a in node.names
               if a.name.startswith("lm_jax.") and a.name.count(".") >= 1]
    for name in names:
      yield name, node.lineno, id(node) in top


def test_subpackages_import_only_downward_and_nothing_lazily():
  problems = []
  for room, path in _modules():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for target, line, top_level in _lm_jax_imports(tree):
      where = f"{os.path.relpath(path, PACKAGE)}:{line}"
      if target not in ALLOWED[room]:
        problems.append(f"{where} ({room}) imports lm_jax.{target}")
      if not top_level:
        problems.append(f"{where} imports lm_jax.{target} inside a function")
  assert not problems, "\n".join(problems)


def test_no_control_characters_in_sources():
  """A stray form feed (``"\\frac"`` in a non-raw docstring) printed as ``rac``."""
  for _, path in _modules():
    with open(path, encoding="utf-8") as f:
      bad = [i + 1 for i, line in enumerate(f) if any(ord(c) < 32 and c not in "\n\t"
                                                      for c in line)]
    assert not bad, f"{path}: control characters on lines {bad}"


def _code_lines(function):
  """Lines of a function without its docstring."""
  lines = function.end_lineno - function.lineno + 1
  first = function.body[0]
  if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
      and isinstance(first.value.value, str):
    lines -= first.end_lineno - first.lineno + 1
  return lines


def test_no_function_in_heads_or_ops_is_longer_than_60_lines():
  """Heads and kernels are module-level functions over (params, tables, ...), each short
  enough to read at once (issue 23); docstrings, where the maths lives, are not counted."""
  long = []
  for room, path in _modules():
    if room not in ("heads", "ops"):
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    long += [f"{os.path.relpath(path, PACKAGE)}:{node.lineno} {node.name} ({_code_lines(node)})"
             for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef) and _code_lines(node) > 60]
  assert not long, "\n".join(long)


def test_import_lm_jax_is_light():
  code = ("import sys, lm_jax, lm_jax.ops, lm_jax.heads, lm_jax.models, lm_jax.data\n"
          "print(sorted({k.split('.')[0] for k in sys.modules} & "
          "{'orbax', 'matplotlib', 'absl', 'flax', 'optax'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(PACKAGE), check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_names_load_on_first_use():
  code = ("import sys, lm_jax\nassert 'lm_jax.train' not in sys.modules\n"
          "state = lm_jax.TrainState\nimport lm_jax.train.training as t\n"
          "assert state is t.TrainState and lm_jax.train_step is t.train_step\n"
          "assert lm_jax.loglinear is lm_jax.maxent.loglinear\n"
          "assert 'train' in dir(lm_jax)\nprint('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(PACKAGE))
  assert out.stdout.strip() == "ok", out.stderr[-2000:]
  with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
    getattr(lm_jax, "not_a_name")
