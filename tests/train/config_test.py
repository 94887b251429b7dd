"""Tests for lm_jax.train.config: grouped flags, one declaration each, flat round trip."""
import dataclasses
import os
import subprocess
import sys

import pytest

from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.models import rnn
from lm_jax.train import checkpointing
from lm_jax.train import config as config_lib
from lm_jax.train import optimizers
from lm_jax.train import schedules
from lm_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flags_are_grouped_each_with_help_and_round_trip_flat():
  groups = {g.name for g in dataclasses.fields(TrainConfig)}
  assert groups == {"data", "model", "optimization", "run"}
  names = [f.name for _, f in TrainConfig.flag_fields()]
  assert len(names) == len(set(names)) >= 50
  assert all(f.metadata["help"].strip() for _, f in TrainConfig.flag_fields())
  config = TrainConfig.from_flags(hidden=17, corpus="ptb", lr=0.5, seed=3)
  assert (config.model.hidden, config.data.corpus, config.optimization.lr, config.run.seed) == (
      17, "ptb", 0.5, 3)
  assert TrainConfig.from_flags(**config.flags()) == config
  assert config.replace(seed=4).run.seed == 4 and config.run.seed == 3
  with pytest.raises(ValueError, match=r"unknown flag\(s\) \['hiden'\]"):
    TrainConfig.from_flags(hiden=3)


def test_choices_come_from_the_modules_that_own_them():
  for flag_name, choices in (("cell", rnn.CELL_NAMES), ("optimizer", optimizers.OPTIMIZERS),
                             ("lr_schedule", schedules.SCHEDULES),
                             ("batching", batching.STRATEGIES)):
    with pytest.raises(ValueError, match=f"--{flag_name}='bogus' is not one of"):
      TrainConfig.from_flags(**{flag_name: "bogus"}).validate()
    for choice in choices:
      problems = ""
      try:
        TrainConfig.from_flags(**{flag_name: choice}).validate()
      except ValueError as e:
        problems = str(e)
      assert f"--{flag_name}={choice!r} is not one of" not in problems, problems


def test_train_lm_defines_exactly_the_config_flags_with_their_help():
  out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train_lm.py"),
                        "--helpfull"], capture_output=True, text=True, timeout=120)
  for group, field in TrainConfig.flag_fields():
    assert f"--{field.name}:" in out.stdout or f"--[no]{field.name}:" in out.stdout, field.name
  assert "[model] output layer: full, class" in out.stdout and "--head_cutoffs" in out.stdout


# Issue 22: every flag is either in the resume fingerprint or deliberately not, with a reason.
FINGERPRINTED = {
    "corpus", "level", "lowercase", "letters_only", "text_max_tokens", "valid_fraction",
    "test_fraction", "tokenizer", "max_vocab", "min_count", "bpe_vocab_size",
    "synthetic_vocab_size",
    "synthetic_train_tokens", "batch_size", "bptt", "batching", "eval_batch_size",
    "cell", "layers", "hidden", "embed", "dropout", "variational_dropout", "tie_weights",
    "init_scale", "head", "head_classes", "head_binning", "head_tree", "head_samples",
    "head_noise", "head_noise_power", "head_shared_samples", "head_bands", "head_log_z",
    "head_cutoffs", "head_div_value", "head_levels",
    "optimizer", "lr", "lr_schedule", "lr_decay_start", "lr_decay_factor", "clip",
    "weight_decay", "grad_reduction", "seed"}
NOT_FINGERPRINTED = {
    "data_dir": "location", "text_path": "location", "workdir": "location",  # data_sha256 decides
    "valid_path": "location", "test_path": "location",
    "epochs": "length", "steps": "length", "time_budget": "length",
    "stop_when_stalled": "length",
    "checkpoint_every": "reporting", "eval_every": "reporting",
    "eval_every_seconds": "reporting", "log_every": "reporting", "tensorboard": "reporting",
    "skip_nonfinite": "recovery",  # resuming a run stopped by a NaN with it is the remedy
    "keep_freed_memory": "memory",
    # The state is float32 either way: a bfloat16 run may resume or be evaluated in float32.
    "dtype": "precision",
    "parallel": "devices", "coordinator_address": "devices", "num_processes": "devices",
    "process_id": "devices",
}
# A different valid value for each fingerprinted string flag (bool: not; int: +1; float:
# x2 + 1; other strings and None: "elsewhere").
OTHER_STRING = {"corpus": "ptb", "dtype": "bfloat16", "batching": "random", "cell": "gru", "head": "hsm",
                "optimizer": "sgd", "lr_schedule": "zaremba", "grad_reduction": "sum_over_time",
                "level": "word", "tokenizer": "words", "head_binning": "mass", "head_tree": "balanced",
                "head_noise": "uniform", "head_bands": "2:4", "head_log_z": "0.0",
                "head_cutoffs": "4,8"}


def _every_field(cls, prefix=""):
  """Leaf fields of a (nested) config dataclass, as dotted paths."""
  for field in dataclasses.fields(cls):
    kind = field.type if dataclasses.is_dataclass(field.type) else (
        field.default_factory if field.default_factory is not dataclasses.MISSING else None)
    if kind is not None and dataclasses.is_dataclass(kind):
      yield from _every_field(kind, f"{prefix}{field.name}.")
    else:
      yield prefix + field.name


def _changed(value, name):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1 if isinstance(value, int) else value * 2 + 1
  return OTHER_STRING.get(name, "elsewhere")


def _context(name):
  """Flags under which ``name`` is read: the head or the corpus that uses it."""
  for head, options in config_lib.HEAD_OPTION_FIELDS.items():
    if name in options.values():
      return {"head": head}
  for corpus, names in config_lib.DATA_OPTION_FIELDS.items():
    if name in names:
      return {"corpus": corpus, "text_path": "t.txt"}
  return {}


def test_every_flag_is_fingerprinted_or_deliberately_not():
  """A new flag fails here until it is classified; each fingerprinted one changes it."""
  paths = list(_every_field(TrainConfig))
  names = [p.split(".")[-1] for p in paths]
  assert len(names) == len(set(names)) == len(TrainConfig.flag_fields()) >= 50
  unclassified = set(names) - FINGERPRINTED - set(NOT_FINGERPRINTED)
  assert not unclassified, f"classify {sorted(unclassified)} in FINGERPRINTED or NOT_FINGERPRINTED"
  assert not FINGERPRINTED & set(NOT_FINGERPRINTED)
  assert FINGERPRINTED | set(NOT_FINGERPRINTED) == set(names)
  base_flags = TrainConfig().flags()
  for name in sorted(FINGERPRINTED):
    context = _context(name)
    base = TrainConfig.from_flags(**context)
    changed = base.replace(**{name: _changed(base_flags[name], name)})
    assert (config_lib.model_fingerprint(base, 10)
            != config_lib.model_fingerprint(changed, 10)), f"--{name} is not fingerprinted"
  for name, reason in NOT_FINGERPRINTED.items():
    changed = TrainConfig().replace(**{name: _changed(base_flags[name], name)})
    assert (config_lib.model_fingerprint(TrainConfig(), 10)
            == config_lib.model_fingerprint(changed, 10)), (name, reason)


def test_data_content_is_fingerprinted_and_old_checkpoints_are_not_refused(caplog):
  config = TrainConfig()
  with_data = config_lib.model_fingerprint(config, 10, data_sha256="ab" * 32)
  other = config_lib.model_fingerprint(config, 10, data_sha256="cd" * 32)
  assert checkpointing.config_differences(with_data, other) == [
      f"data_sha256: checkpoint has {'ab' * 32!r}, this run has {'cd' * 32!r}"]
  # A reader without the corpus (load_trained) does not compare the data.
  assert checkpointing.config_differences(with_data, config_lib.model_fingerprint(config, 10)) == []
  # A checkpoint from before issue 22 lacks the new keys: not a mismatch, but said.
  old_keys = ("vocab_size", "head_options", "cell", "layers", "hidden", "embed", "batch_size",
              "optimizer", "corpus", "head", "tie_weights", "clip", "bptt", "seed", "batching",
              "lr", "weight_decay")
  old = {k: v for k, v in with_data.items() if k in old_keys}
  assert checkpointing.config_differences(old, with_data) == []
  assert "predates fingerprint fields" in caplog.text and "'data_sha256'" in caplog.text
  assert "'grad_reduction'" in caplog.text and "'lr_schedule'" in caplog.text


def test_corpus_content_hash_names_the_data_not_its_path(tmp_path):
  text = "the cat sat on the mat. " * 20
  (tmp_path / "a.txt").write_text(text)
  (tmp_path / "b.txt").write_text(text)
  (tmp_path / "c.txt").write_text(text.replace("cat", "act"))  # same length and vocabulary
  hashes = [corpora.content_sha256(corpora.load_text(tmp_path / f"{n}.txt"))
            for n in ("a", "b", "c")]
  assert hashes[0] == hashes[1] != hashes[2] and len(hashes[0]) == 64


def test_old_text_checkpoints_have_their_tokenizer_from_their_level(caplog):
  """A text checkpoint from before --tokenizer: its --level says which it was."""
  for level, other in (("word", "words"), ("char", "whitespace")):
    current = config_lib.model_fingerprint(
        TrainConfig.from_flags(text_path="t.txt", level=level), 10)
    old = {k: v for k, v in current.items()
           if k not in ("tokenizer", "max_vocab", "min_count", "bpe_vocab_size")}
    caplog.clear()
    assert checkpointing.config_differences(old, current) == []
    assert "predates" not in caplog.text
    changed = config_lib.model_fingerprint(
        TrainConfig.from_flags(text_path="t.txt", tokenizer=other), 10)
    assert any(d.startswith("tokenizer:") for d in checkpointing.config_differences(old, changed))
