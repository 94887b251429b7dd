"""What every command shares: user errors as one line (``error: ...``, exit status 2, no
traceback) and a quiet exit on Ctrl-C."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags

from lm_jax.data import corpora
from lm_jax.train import checkpointing
from lm_jax.train.config import FlagError
from lm_jax.train.trainer import WorkdirError

# Mistakes in what the user gave (flags, files, a workdir), not bugs: one line, exit 2.
USER_ERRORS = (FlagError, corpora.CorpusError, checkpointing.CheckpointMismatchError,
               WorkdirError)
USAGE_EXIT = 2


def one_line(error: BaseException) -> str:
  """The error's message on one line (a FlagError's problems joined by ``; ``)."""
  message = "; ".join(error.problems) if isinstance(error, FlagError) else str(error)
  return " ".join(message.split())


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{one_line(e)} (see --helpfull)")


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with bad flag values, bad flag combinations, corpus errors, checkpoint
  mismatches and workdir mistakes printed as one ``error:`` line (exit 2), and Ctrl-C before
  training starts (while compiling, say) exiting with status 130 and one line."""

  def guarded(argv):
    try:
      return main(argv)
    except (*USER_ERRORS, app.UsageError) as e:
      fail(one_line(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(guarded, flags_parser=_parse_flags)
