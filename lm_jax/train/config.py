"""The flags of a training run, grouped by what they control, each declared once with its help.

``TrainConfig`` holds four groups, ``data``, ``model``, ``optimization`` and ``run``; every
field of a group is one ``train_lm.py`` flag of the same name, declared with :func:`flag`,
which keeps its default and its help text together (``train_lm.py`` defines its flags from
these). ``TrainConfig.from_flags(**flat)`` and ``config.flags()`` convert to and from the
flat ``{flag: value}`` form that ``config.json`` keeps (older workdirs' files read as before).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from lm_jax import heads
from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import text
from lm_jax.data import tokenizers
from lm_jax.models import rnn
from lm_jax.train import optimizers
from lm_jax.train import parallel
from lm_jax.train import schedules
from lm_jax.train import training

# The TrainConfig field behind each of heads.make_head's options.
HEAD_OPTION_FLAGS = {"num_classes": "head_classes", "binning": "head_binning",
                     "tree": "head_tree", "bands": "head_bands", "noise": "head_noise",
                     "noise_power": "head_noise_power", "num_samples": "head_samples",
                     "shared_samples": "head_shared_samples", "log_z": "head_log_z",
                     "cutoffs": "head_cutoffs", "div_value": "head_div_value",
                     "levels": "head_levels"}
# Which TrainConfig fields each output head reads, under the name its factory takes. The
# heads' ``implementation`` is not a flag: the trainer keeps "auto" (each platform's own
# form, the same maths), so a checkpoint resumes on any backend.
HEAD_OPTION_FIELDS = {head: {option: HEAD_OPTION_FLAGS[option] for option in options
                             if option != "implementation"}
                      for head, options in heads.HEAD_OPTIONS.items()}
DTYPES = ("float32", "bfloat16")  # --dtype: the compute dtype (params stay float32)
# Fingerprint entries of checkpoints written before these keys existed.
FINGERPRINT_DEFAULTS = {"head": "full", "head_options": {}, "tie_weights": False,
                        "max_vocab": 0, "min_count": 1, "bpe_vocab_size": 1024}
# The flags a resume must keep (model_fingerprint), besides head and data options.
FINGERPRINT_FLAGS = (
    "corpus", "batch_size", "bptt", "batching", "eval_batch_size",
    "cell", "layers", "hidden", "embed", "dropout", "variational_dropout", "tie_weights",
    "init_scale", "head",
    "optimizer", "lr", "lr_schedule", "lr_decay_start", "lr_decay_factor", "clip",
    "weight_decay", "grad_reduction", "seed")
# The data flags each corpus's loader reads (Trainer's load_corpus), fingerprinted with it.
# ``level`` and ``tokenizer`` enter resolved (DataConfig.text_tokenizer).
DATA_OPTION_FIELDS = {"text": ("level", "tokenizer", "lowercase", "letters_only",
                               "text_max_tokens", "valid_fraction", "test_fraction",
                               "max_vocab", "min_count", "bpe_vocab_size"),
                      "synthetic": ("synthetic_vocab_size", "synthetic_train_tokens")}


class FlagError(ValueError):
  """Flags that are wrong or inconsistent; ``problems`` names each (flag, value and fix)."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("bad flags:\n  " + "\n  ".join(self.problems))


def flag(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A config field that is also a ``train_lm.py`` flag: its default and help in one place."""
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class DataConfig:
  """What the model reads and how batches are cut from it."""

  corpus: str | None = flag(
      None,
      'synthetic (the embedded default), ptb, wikitext2, or text (selected by --text_path '
      'alone)')
  data_dir: str | None = flag(
      None,
      'directory of ptb/ and wikitext-2/ (default: $LM_JAX_DATA_DIR or ../shared/data)')
  text_path: str | None = flag(
      None,
      'your own plain UTF-8 text file to train on (selects --corpus=text); split '
      'contiguously into train, valid and test by --valid_fraction and --test_fraction '
      'unless --valid_path / --test_path give those splits')
  valid_path: str | None = flag(
      None, 'with --text_path: a separate validation file (else the --valid_fraction split)')
  test_path: str | None = flag(
      None, 'with --text_path: a separate test file (else the --test_fraction split)')
  valid_fraction: float = flag(
      0.1, 'with --text_path and no --valid_path: the share of the file held out for '
      'validation (after the training part)')
  test_fraction: float = flag(
      0.1, 'with --text_path and no --test_path: the share of the file held out for test '
      '(its end); 0: no test split')
  tokenizer: str | None = flag(
      None,
      'with --text_path: char (default), whitespace (str.split), words (punctuation-aware '
      'words, <eos> per line) or bpe (byte-level BPE learned on the training split, never '
      "<unk>; pip install 'lm_jax[tokenizers]'). Saved in the workdir: lm-jax-evaluate and "
      'lm-jax-generate read text the same way')
  level: str | None = flag(
      None, 'the older name of --tokenizer: char = --tokenizer=char, word = '
      '--tokenizer=whitespace')
  max_vocab: int = flag(
      0, 'with --text_path, not bpe: keep this many token types at most, the 4 reserved '
      '(<unk> <pad> <bos> <eos>) included; rarer tokens read as <unk> (0: no cap)')
  min_count: int = flag(
      1, 'with --text_path, not bpe: tokens seen fewer times in the training split read as '
      '<unk>')
  bpe_vocab_size: int = flag(
      1024, '--tokenizer=bpe: BPE tokens including the 256 bytes (the model has 4 more: '
      'the reserved tokens)')
  lowercase: bool = flag(False, 'lower-case the text (--corpus=text)')
  letters_only: bool = flag(
      False,
      "map every non-letter to a space, as D2L's Time Machine (--corpus=text)")
  text_max_tokens: int = flag(
      0,
      "--corpus=text: keep only the first this many tokens before splitting (D2L 0.17's"
      ' Time Machine: 10000); 0: all')
  synthetic_vocab_size: int = flag(0, 'synthetic corpus: language size (0: the library default)')
  synthetic_train_tokens: int = flag(
      1_000_000,
      'synthetic corpus: train tokens (valid and test get a tenth each)')
  batch_size: int = flag(32, 'rows per batch (global, over all devices)')
  bptt: int = flag(32, 'unrolled time steps per batch (truncated BPTT length)')
  batching: str = flag(
      "sequential",
      'sequential (state carried across batches) or random (state reset)')
  eval_batch_size: int = flag(
      10,
      'rows for evaluation (each row a contiguous stream, state carried)')

  def __post_init__(self):
    # --text_path alone selects the text corpus; no --corpus and no --text_path is the
    # embedded synthetic one. An explicit --corpus other than text with --text_path is an
    # error (validate), never a silent choice.
    if self.corpus is None:
      self.corpus = "text" if self.text_path else "synthetic"

  def text_tokenizer(self) -> str:
    """The tokenizer of a text corpus: --tokenizer, else --level's, else char."""
    return self.tokenizer or corpora.LEVEL_TOKENIZERS.get(self.level or "char", "char")


@dataclasses.dataclass
class ModelConfig:
  """The network: cells, sizes, dropout and the output head."""

  cell: str = flag(
      "lstm",
      'elman (= rnn_tanh), rnn_relu, elman_direct (tanh without W_xh, the embedding '
      "added directly: Mikolov's RNNLM; needs --embed == --hidden), gru or lstm")
  layers: int = flag(1, 'recurrent layers')
  hidden: int = flag(128, 'hidden units per layer')
  embed: int = flag(64, 'embedding size')
  dropout: float = flag(0.0, 'dropout on non-recurrent connections (Zaremba et al. 2014)')
  variational_dropout: bool = flag(
      False,
      'one dropout mask per sequence, reused at every time step (Gal & Ghahramani 2016;'
      ' locked dropout); T times fewer random numbers')
  tie_weights: bool = flag(
      False,
      'share the embedding matrix with the output layer (needs --embed == --hidden and '
      'a head with a [V, H] weight: full, nce, neg, sampled)')
  init_scale: float = flag(0.1, 'parameters start uniform in [-init_scale, init_scale]')
  dtype: str = flag(
      "float32",
      'compute dtype: float32, or bfloat16 for mixed precision (embeddings, activations and '
      'matmuls, forward and backward, in bfloat16 with float32 accumulation; params, '
      'optimizer state, the recurrent carry and the losses in float32; the class, classtree, '
      'hsm, nce, neg, sampled and adaptive heads compute from the bfloat16 hidden state in '
      'float32). Faster on GPU/TPU; on CPU XLA emulates bfloat16 (slower for small '
      'models). Not part of the checkpoint: a run may resume in the other dtype')
  head: str = flag(
      "full",
      'output layer: full, class, hsm, dsoftmax, nce, neg, sampled, adaptive or classtree')
  head_classes: int = flag(0, 'class/hsm heads: number of classes (0: sqrt of the vocabulary size)')
  head_binning: str = flag(
      "equal",
      'class head binning: equal (V/C words a class by frequency: the smallest largest '
      'class, fastest), sqrt (equal shares of sqrt-frequency mass) or mass (Mikolov: '
      'equal unigram mass)')
  head_tree: str = flag("huffman", 'hsm head: huffman, balanced or class (two-level) tree')
  head_samples: int = flag(64, 'nce/neg/sampled heads: noise samples per step')
  head_noise: str = flag(
      "unigram",
      'nce/neg/sampled heads: noise distribution unigram, log_uniform or uniform')
  head_noise_power: float = flag(0.75, 'nce/neg/sampled heads: unigram counts raised to this power')
  head_shared_samples: bool = flag(
      True,
      'nce/neg/sampled heads: one noise sample set shared by the batch')
  head_bands: str = flag(
      "",
      'dsoftmax head: frequency bands as words:dims,... (most frequent first)')
  head_log_z: str = flag("learned", 'nce head: the log normaliser, learned or a fixed number')
  head_cutoffs: str = flag(
      "",
      "adaptive head: cutoffs c_0,c_1,... between the shortlist and the clusters, in "
      "frequency ranks (PyTorch's AdaptiveLogSoftmaxWithLoss); empty: the fewest words "
      "covering 80% of the training tokens, then clusters 4x larger each")
  head_div_value: float = flag(
      4.0, "adaptive head: cluster i is scored through a projection of H // div**(i+1) units")
  head_levels: int = flag(
      2,
      'classtree head: levels of frequency classes above the words (1: the class softmax, '
      '2, 3), each a softmax over ceil(V**(1/(levels+1))) children')


@dataclasses.dataclass
class OptimizationConfig:
  """The optimizer, its learning-rate schedule and the loss reduction."""

  optimizer: str = flag(
      "adam",
      'sgd, adam, adamw or lazy_adam (Adam moving only the rows a gradient touches, as '
      "TensorFlow's LazyAdam)")
  lr: float = flag(3e-3, 'learning rate')
  lr_schedule: str = flag(
      "constant",
      'constant; zaremba (divide by --lr_decay_factor each epoch after '
      '--lr_decay_start); plateau (Mikolov: halve once validation stalls)')
  lr_decay_start: int = flag(4, 'epochs at the initial rate before zaremba decay starts')
  lr_decay_factor: float = flag(2.0, 'zaremba decay divisor per epoch')
  stop_when_stalled: bool = flag(
      False,
      'plateau schedule: stop when halving no longer improves validation')
  clip: float = flag(5.0, 'clip gradients to this global norm (0: off)')
  weight_decay: float = flag(
      0.01,
      '--optimizer=adamw only: decoupled weight decay (optax.adamw) of every matrix '
      'except the input embedding; biases and vectors are not decayed')
  grad_reduction: str = flag(
      "token_mean",
      'token_mean, or sum_over_time (sum over T, mean over rows: Zaremba/TF PTB)')


@dataclasses.dataclass
class RunConfig:
  """Length, seeds, checkpoints, logging, devices and processes."""

  workdir: str = flag("runs/default", 'where checkpoints, metrics.jsonl, plots and results.json go')
  epochs: int = flag(3, 'epochs to train (ignored if --steps > 0)')
  steps: int = flag(0, 'total training steps (overrides --epochs)')
  time_budget: float = flag(
      0.0,
      'also stop after this many seconds of training (evaluation, checkpointing and plotting '
      'not counted; kept across resumes; 0: no limit), then evaluate as usual')
  seed: int = flag(0, 'seed for parameters, batches and dropout')
  checkpoint_every: int = flag(
      500,
      'save a checkpoint every this many steps (and at each epoch end)')
  eval_every: int = flag(
      0,
      'also evaluate on validation every this many steps (0: epoch ends only)')
  eval_every_seconds: float = flag(
      0.0,
      'also evaluate on validation each time this many more seconds of training time '
      '(as --time_budget counts it) have passed (0: off); for curves against training time')
  log_every: int = flag(100, 'report train metrics every this many steps')
  tensorboard: bool = flag(
      True,
      'also write TensorBoard event files in <workdir>/tensorboard (needs tensorboardX: pip '
      "install 'lm_jax[tensorboard]'; without it, metrics.jsonl only)")
  skip_nonfinite: bool = flag(
      False,
      'skip an update whose loss or gradient is NaN/Inf (counted in metrics.jsonl) '
      'instead of stopping the run')
  keep_freed_memory: bool = flag(
      True,
      'on the CPU backend only, the training application calls '
      'lm_jax.ops.allocator.keep_freed_memory_on_cpu() at start: glibc malloc keeps freed '
      "blocks for reuse, no page faults on each step's large temporaries; the process keeps "
      'its peak memory and it cannot be undone. Ignored on GPU/TPU')
  parallel: str = flag(
      "auto",
      'auto (shard_map over all devices when there are several, else none), none, '
      'shard_map or pmap (one process)')
  coordinator_address: str = flag(
      "",
      'host:port of process 0 for a multi-process run (or $JAX_COORDINATOR_ADDRESS)')
  num_processes: int = flag(
      0,
      "processes in a multi-process run (0: one, or $JAX_NUM_PROCESSES / the cluster's)")
  process_id: int = flag(
      -1,
      "this process's index in [0, num_processes) (-1: $JAX_PROCESS_ID or the "
      "cluster's)")

@dataclasses.dataclass
class TrainConfig:
  """Everything ``train_lm.py`` can be told, by group. Defaults: the embedded synthetic run."""

  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optimization: OptimizationConfig = dataclasses.field(default_factory=OptimizationConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)

  @staticmethod
  def flag_fields() -> list[tuple[str, dataclasses.Field]]:
    """``(group, field)`` for every flag, in declaration order."""
    return [(group.name, f) for group in dataclasses.fields(TrainConfig)
            for f in dataclasses.fields(group.default_factory())]

  @classmethod
  def from_flags(cls, **values: Any) -> TrainConfig:
    """A config from flat ``flag=value`` pairs (flags not given keep their defaults)."""
    groups: dict[str, dict[str, Any]] = {g.name: {} for g in dataclasses.fields(cls)}
    known = {f.name: group for group, f in cls.flag_fields()}
    unknown = sorted(set(values) - set(known))
    if unknown:
      raise ValueError(f"unknown flag(s) {unknown}; the flags are {sorted(known)}")
    for name, value in values.items():
      groups[known[name]][name] = value
    return cls(**{g.name: g.default_factory(**groups[g.name]) for g in dataclasses.fields(cls)})

  def flags(self) -> dict[str, Any]:
    """The flat ``{flag: value}`` form (``config.json``; ``from_flags`` reads it back)."""
    return {f.name: getattr(getattr(self, group), f.name) for group, f in self.flag_fields()}

  def replace(self, **values: Any) -> TrainConfig:
    """A copy with some flags changed (flat names)."""
    return TrainConfig.from_flags(**{**self.flags(), **values})

  def head_options(self) -> dict:
    """The keyword options of ``heads.make_head`` that ``self.model.head`` uses, and only those."""
    fields = HEAD_OPTION_FIELDS.get(self.model.head, {})
    flags = self.flags()
    return {option: flags[name] for option, name in fields.items()}

  def _head_problems(self) -> list[str]:
    if self.model.head not in heads.HEAD_NAMES:
      return [f"--head={self.model.head!r} is not one of {heads.HEAD_NAMES}"]
    problems = []
    used = set(HEAD_OPTION_FIELDS.get(self.model.head, {}).values())
    flags, defaults = self.flags(), TrainConfig().flags()
    for name in sorted({n for opts in HEAD_OPTION_FIELDS.values() for n in opts.values()}):
      if name not in used and flags[name] != defaults[name]:
        problems.append(f"--{name}={flags[name]!r} has no effect with "
                        f"--head={self.model.head} (it only applies to --head="
                        + "|".join(h for h, o in HEAD_OPTION_FIELDS.items() if name in o.values())
                        + ")")
    if self.model.head_tree not in heads.TREE_KINDS:
      problems.append(f"--head_tree={self.model.head_tree!r} is not one of {heads.TREE_KINDS}")
    if self.model.head_noise not in heads.noise.NOISE_NAMES:
      problems.append(f"--head_noise={self.model.head_noise!r} is not one of "
                      f"{heads.noise.NOISE_NAMES}")
    if self.model.head_classes < 0:
      problems.append(f"--head_classes={self.model.head_classes} must be >= 0 (0: sqrt of the "
                      "vocabulary size)")
    if self.model.head_levels not in heads.class_hierarchy.LEVELS:
      problems.append(f"--head_levels={self.model.head_levels} is not one of "
                      f"{heads.class_hierarchy.LEVELS}")
    if self.model.head_samples < 1:
      problems.append(f"--head_samples={self.model.head_samples} must be >= 1")
    return problems

  def _device_problems(self, num_devices: int, num_processes: int) -> list[str]:
    problems = []
    if num_processes > 1 and self.run.parallel in ("none", "pmap"):
      problems.append(f"--parallel={self.run.parallel} cannot span {num_processes} processes; use "
                      "--parallel=shard_map (or auto)")
    if self.run.parallel == "none" or (self.run.parallel == "auto" and num_devices == 1):
      return problems
    if self.data.batch_size % num_devices:
      where = (f"{num_processes} processes x {num_devices // num_processes} local devices"
               if num_processes > 1 else f"{num_devices} devices")
      problems.append(f"--batch_size={self.data.batch_size} is not divisible by the {where} = "
                      f"{num_devices} of --parallel={self.run.parallel}; use a multiple of "
                      f"{num_devices} or --parallel=none")
    return problems

  def validate(self, *, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Raises ValueError naming the flag(s) for anything inconsistent, before any work.

    With ``num_devices`` (all devices of all processes), also checks that the batches
    split evenly over the devices the run will use.
    """
    data, model, opt, run = self.data, self.model, self.optimization, self.run
    flags = self.flags()
    problems = self._head_problems()
    for name, choices in (("parallel", ("auto",) + parallel.MODES), ("corpus", corpora.NAMES),
                          ("cell", rnn.CELL_NAMES), ("batching", batching.STRATEGIES),
                          ("optimizer", optimizers.OPTIMIZERS),
                          ("lr_schedule", schedules.SCHEDULES),
                          ("grad_reduction", training.GRAD_REDUCTIONS)):
      if flags[name] not in choices:
        problems.append(f"--{name}={flags[name]!r} is not one of {choices}")
    for name in ("layers", "hidden", "embed", "batch_size", "bptt", "checkpoint_every",
                 "log_every", "eval_batch_size"):
      if flags[name] < 1:
        problems.append(f"--{name}={flags[name]} must be >= 1")
    if run.num_processes < 0:
      problems.append(f"--num_processes={run.num_processes} must be >= 0 (0: one process, "
                      "or as the JAX_* environment variables say)")
    if run.num_processes > 1 and not run.coordinator_address:
      problems.append(f"--num_processes={run.num_processes} needs --coordinator_address "
                      "(host:port of process 0)")
    if run.coordinator_address and not 0 <= run.process_id < max(run.num_processes, 1):
      problems.append(f"--process_id={run.process_id} must be in [0, --num_processes="
                      f"{run.num_processes}) with --coordinator_address")
    if num_devices is not None:
      problems += self._device_problems(num_devices, num_processes)
    problems += _data_problems(data)
    if os.path.exists(run.workdir) and not os.path.isdir(run.workdir):
      problems.append(f"--workdir={run.workdir} is a file, not a directory: give a directory "
                      "(it is created if missing)")
    if opt.weight_decay < 0:
      problems.append(f"--weight_decay={opt.weight_decay} must be >= 0")
    if opt.optimizer != "adamw" and opt.weight_decay != OptimizationConfig.weight_decay:
      problems.append(f"--weight_decay={opt.weight_decay} has no effect with --optimizer="
                      f"{opt.optimizer} (it only applies to --optimizer=adamw)")
    if run.steps < 0 or run.epochs < 0 or (run.steps == 0 and run.epochs == 0):
      problems.append(f"--epochs={run.epochs} and --steps={run.steps}: one must be positive")
    if run.time_budget < 0:
      problems.append(f"--time_budget={run.time_budget} must be >= 0 (0: no limit)")
    if run.eval_every_seconds < 0:
      problems.append(f"--eval_every_seconds={run.eval_every_seconds} must be >= 0 (0: off)")
    if not 0.0 <= model.dropout < 1.0:
      problems.append(f"--dropout={model.dropout} must be in [0, 1)")
    if model.variational_dropout and model.dropout == 0.0:
      problems.append("--variational_dropout has no effect without --dropout > 0")
    if model.cell == "elman_direct" and model.embed != model.hidden:
      problems.append(f"--cell=elman_direct adds the embedding to the hidden state, so it "
                      f"needs --embed == --hidden, got --embed={model.embed} "
                      f"--hidden={model.hidden}")
    if model.tie_weights and model.embed != model.hidden:
      problems.append(f"--tie_weights needs --embed == --hidden, got --embed={model.embed} "
                      f"and --hidden={model.hidden}")
    if model.tie_weights and model.head in ("class", "hsm", "dsoftmax", "adaptive", "classtree"):
      problems.append(f"--tie_weights needs a head with a [V, H] output matrix, not "
                      f"--head={model.head}")
    if model.dtype not in DTYPES:
      problems.append(f"--dtype={model.dtype!r} is not one of {DTYPES}")
    if opt.lr <= 0:
      problems.append(f"--lr={opt.lr} must be positive")
    if opt.clip < 0:
      problems.append(f"--clip={opt.clip} must be >= 0 (0 disables clipping)")
    if problems:
      raise FlagError(problems)


def _data_problems(data: DataConfig) -> list[str]:
  problems = []
  if data.text_path and data.corpus != "text":
    problems.append(f"--text_path={data.text_path} selects the text corpus, but --corpus="
                    f"{data.corpus} names another: drop --corpus (or use --corpus=text)")
  problems += _tokenizer_problems(data)
  if data.corpus == "text" and not data.text_path:
    problems.append("--corpus=text needs --text_path (your text file)")
  for name in ("valid_path", "test_path"):
    if getattr(data, name) and not data.text_path:
      problems.append(f"--{name} needs --text_path (the training file)")
  valid = 0.0 if data.valid_path else data.valid_fraction
  test = 0.0 if data.test_path else data.test_fraction
  if not data.valid_path and not 0.0 < data.valid_fraction < 1.0:
    problems.append(f"--valid_fraction={data.valid_fraction} must be in (0, 1)")
  if not 0.0 <= data.test_fraction < 1.0:
    problems.append(f"--test_fraction={data.test_fraction} must be in [0, 1)")
  if valid + test >= 1.0:
    problems.append(f"--valid_fraction={data.valid_fraction} and --test_fraction="
                    f"{data.test_fraction} leave no training text (their sum must be < 1)")
  return problems


def _tokenizer_problems(data: DataConfig) -> list[str]:
  problems = []
  defaults = DataConfig()
  if data.level is not None and data.level not in corpora.LEVEL_TOKENIZERS:
    problems.append(f"--level={data.level!r} must be char or word (or use --tokenizer="
                    f"{'|'.join(tokenizers.TOKENIZERS)})")
  if data.tokenizer is not None and data.tokenizer not in tokenizers.TOKENIZERS:
    problems.append(f"--tokenizer={data.tokenizer!r} is not one of {tokenizers.TOKENIZERS}")
  if (data.level in corpora.LEVEL_TOKENIZERS and data.tokenizer is not None
      and corpora.LEVEL_TOKENIZERS[data.level] != data.tokenizer):
    problems.append(f"--level={data.level} and --tokenizer={data.tokenizer} disagree: drop "
                    "--level (--tokenizer replaces it)")
  changed = [f"--{name}={getattr(data, name)}" for name in
             ("tokenizer", "level", "max_vocab", "min_count", "bpe_vocab_size",
              "text_max_tokens", "lowercase", "letters_only", "valid_fraction",
              "test_fraction") if getattr(data, name) != getattr(defaults, name)]
  if data.corpus != "text":
    if changed:
      problems.append(f"{', '.join(changed)}: only for your own text (--text_path); "
                      f"--corpus={data.corpus} has its own tokenization")
    return problems
  name = data.text_tokenizer()
  if data.max_vocab < 0 or 0 < data.max_vocab <= len(text.RESERVED_TOKENS):
    problems.append(f"--max_vocab={data.max_vocab} must be 0 (no cap) or more than the "
                    f"{len(text.RESERVED_TOKENS)} reserved tokens")
  if data.min_count < 1:
    problems.append(f"--min_count={data.min_count} must be >= 1")
  if name == "bpe":
    for flag_name in ("max_vocab", "min_count"):
      if getattr(data, flag_name) != getattr(defaults, flag_name):
        problems.append(f"--{flag_name} does not apply to --tokenizer=bpe (every UTF-8 text "
                        "encodes; set its size with --bpe_vocab_size)")
    if data.bpe_vocab_size < 256:
      problems.append(f"--bpe_vocab_size={data.bpe_vocab_size} must be >= 256 (the bytes)")
    if importlib.util.find_spec("tokenizers") is None:
      problems.append(f"--tokenizer=bpe needs HF tokenizers: {tokenizers.INSTALL_HINT}")
  elif data.bpe_vocab_size != defaults.bpe_vocab_size:
    problems.append(f"--bpe_vocab_size has no effect with --tokenizer={name} (only bpe)")
  if data.text_max_tokens and name not in ("char", "whitespace"):
    problems.append(f"--text_max_tokens needs --tokenizer=char or whitespace (the older "
                    f"levels), not {name}")
  if data.text_max_tokens < 0:
    problems.append(f"--text_max_tokens={data.text_max_tokens} must be >= 0 (0: all)")
  return problems


def model_fingerprint(config: TrainConfig, vocab_size: int, *,
                      data_sha256: str | None = None) -> dict:
  """What a checkpoint must agree on with the current run to be restorable: every flag that
  changes training or the data, as one flat dict (a checkpoint's ``config``).

  That is the state tree (model shape, head, optimizer and clipping, whose states are leaves
  of the optimizer state), the updates (learning rate, its schedule and decay, gradient
  reduction, weight decay, dropout, initialisation), the data order (``bptt``, ``seed``,
  ``batching``, batch sizes) and the data: the corpus, the flags its loader reads
  (:data:`DATA_OPTION_FIELDS`) and, as ``data_sha256``, the content hash of its vocabulary
  and token ids (``corpora.content_sha256``), so a resume on other data of the same length
  stops; without it (``load_trained`` has no corpus) the data is not compared. Not in it:
  where things are (``workdir``, ``data_dir``, ``text_path``: the hash identifies the data
  wherever it lies), how long to train, what to report and when, and devices and processes
  (``tests/train/config_test.py`` lists every flag with its reason).

  A checkpoint written before a key existed cannot say what its value was: such keys are
  not reported as a mismatch but named in a warning (``checkpointing.config_differences``;
  ``FINGERPRINT_DEFAULTS`` holds the few keys whose old value is known).
  """
  flags = config.flags()
  fingerprint = {"vocab_size": vocab_size, "head_options": config.head_options(),
                 **{k: flags[k] for k in FINGERPRINT_FLAGS},
                 **{k: flags[k] for k in DATA_OPTION_FIELDS.get(config.data.corpus, ())}}
  if config.data.corpus == "text":  # resolved: --level=word and --tokenizer=whitespace agree
    fingerprint["tokenizer"] = config.data.text_tokenizer()
    fingerprint["level"] = corpora.token_level(fingerprint["tokenizer"])
  if data_sha256 is not None:
    fingerprint["data_sha256"] = data_sha256
  return fingerprint
