"""The commands (lm-jax-train, lm-jax-evaluate, lm-jax-generate), run as a user runs them:
one-line errors with exit status 2, evaluation of text files, and a non-editable install."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden=16", "--embed=8", "--batch_size=4", "--bptt=8", "--eval_batch_size=2",
        "--level=char", "--parallel=none"]


def _command(name, *args, cwd=None, timeout=300):
  script = os.path.join(REPO, "experiments", {"train": "train_lm.py"}.get(name, f"{name}.py"))
  return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True,
                        text=True, timeout=timeout, cwd=cwd)


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  output = result.stdout + result.stderr
  assert "Traceback" not in output, output[-2000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr
  for fragment in fragments:
    assert fragment in error_lines[0], error_lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny character model trained on a small text, with held-out files."""
  root = tmp_path_factory.mktemp("commands")
  (root / "book.txt").write_text("the cat sat on the mat. " * 120)
  (root / "other.txt").write_text("a cat sat on the hat. " * 20)  # every character seen
  (root / "alien.txt").write_text("ÆØÅ ÆØÅ the cat " * 10)  # mostly unseen characters
  result = _command("train", f"--text_path={root / 'book.txt'}", f"--workdir={root / 'w'}",
                    "--steps=12", "--log_every=6", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return root


@pytest.mark.parametrize("args,fragments", [
    (["--steps=abc"], ["--steps=abc", "invalid literal"]),
    (["--text_path=my.txt", "--corpus=ptb"], ["--text_path=my.txt selects the text corpus",
                                              "--corpus=ptb"]),
    (["--text_path=missing.txt"], ["missing.txt: cannot open corpus file"]),
    (["--valid_path=v.txt"], ["--valid_path needs --text_path"]),
    (["--hidden=0", "--dropout=2"], ["--hidden=0", "; ", "--dropout=2"]),  # problems joined
    (["--text_path=my.txt", "--tokenizer=sentencepiece", "--level=word"],
     ["--tokenizer='sentencepiece' is not one of"]),  # checked with the flags, before reading
])
def test_train_errors_print_one_line_and_exit_2(tmp_path, args, fragments):
  _assert_one_line_error(_command("train", f"--workdir={tmp_path / 'w'}", *args,
                                  cwd=tmp_path), *fragments)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "afile").write_text("")
  _assert_one_line_error(_command("train", f"--workdir={tmp_path / 'afile'}"),
                         "is a file, not a directory")


def test_resume_mistakes_are_one_line(trained, tmp_path):
  book, workdir = trained / "book.txt", trained / "w"
  _assert_one_line_error(
      _command("train", f"--text_path={book}", f"--workdir={workdir}", "--steps=4", *TINY),
      "--steps=4 (4 steps) is below the 12 steps already done")
  mismatch = [a for a in TINY if a != "--level=char"] + ["--level=word"]
  _assert_one_line_error(
      _command("train", f"--text_path={book}", f"--workdir={workdir}", "--steps=20", *mismatch),
      "vocab.json", "differs from the vocabulary")


def test_evaluate_reports_every_file_and_warns_about_unk(trained, tmp_path):
  out = tmp_path / "eval.json"
  result = _command("evaluate", f"--workdir={trained / 'w'}", f"--json_out={out}",
                    trained / "other.txt", trained / "alien.txt")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "other.txt" in result.stdout and "bits_per_character" in result.stdout
  rows = json.loads(out.read_text())["results"]
  assert [os.path.basename(r["file"]) for r in rows] == ["other.txt", "alien.txt"]
  for row in rows:
    assert row["tokens"] > 0 and 1.0 < row["perplexity"] < 1e4
    # char level: one token per character, so bits per character = bits per token (up to
    # the first, unpredicted, character).
    assert row["bits_per_character"] == pytest.approx(row["bits_per_token"], rel=0.01)
  assert rows[0]["unk_rate"] == 0.0 and rows[1]["unk_rate"] > 0.1
  warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
  assert len(warnings) == 1 and "alien.txt" in warnings[0] and "<unk>" in warnings[0]
  _assert_one_line_error(_command("evaluate", f"--workdir={trained / 'w'}", tmp_path / "no.txt"),
                         "no.txt: no such file")
  _assert_one_line_error(_command("evaluate", f"--workdir={tmp_path}", trained / "other.txt"),
                         "config.json not found")


def test_generate_warns_about_an_unknown_prompt(trained):
  result = _command("generate", f"--workdir={trained / 'w'}", "--prompt=ÆØ the", "--num_tokens=5")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("ÆØ the") or "the" in result.stdout
  assert any(line.startswith("warning: ") and "<unk>" in line
             for line in result.stderr.splitlines())


def test_a_plain_install_gives_the_three_commands(tmp_path):
  """``pip install .`` (not editable) into a fresh venv: the console scripts work from any
  directory, with lm_jax imported from the venv, not from this source tree."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                 timeout=120)
  python, bin_dir = venv / "bin" / "python", venv / "bin"
  # Installed from a copy of what the package ships (no build/ or egg-info of this tree).
  source = tmp_path / "source"
  shutil.copytree(os.path.join(REPO, "lm_jax"), source / "lm_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), source / name)
  install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", str(source)], capture_output=True, text=True,
                           timeout=300)
  assert install.returncode == 0, install.stderr[-3000:]
  # Every lm_jax module the commands import comes from the venv (an editable install of this
  # tree in the system site-packages would otherwise fill in anything the copy lacks).
  probe = ("import sys, lm_jax.commands.train, lm_jax.commands.evaluate, "
           "lm_jax.commands.generate; print([m.__file__ for n, m in sys.modules.items() "
           "if n.startswith('lm_jax') and getattr(m, '__file__', None)])")
  where = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
  files = eval(where.stdout.strip())  # pylint: disable=eval-used  (our own probe's list)
  assert len(files) > 20 and all(f.startswith(str(venv)) for f in files), where.stdout + where.stderr
  (tmp_path / "mine.txt").write_text("hello world, hello lm_jax. " * 60)
  run = lambda *args: subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True,
                                     text=True, cwd=tmp_path, timeout=300)
  train = run("lm-jax-train", "--text_path=mine.txt", "--workdir=w", "--steps=4", *TINY)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "test_perplexity" in json.loads((tmp_path / "w" / "results.json").read_text())
  evaluate = run("lm-jax-evaluate", "--workdir=w", "mine.txt")
  assert evaluate.returncode == 0 and "mine.txt" in evaluate.stdout, evaluate.stderr[-3000:]
  generate = run("lm-jax-generate", "--workdir=w", "--prompt=hello", "--num_tokens=4")
  assert generate.returncode == 0 and generate.stdout.startswith("hello"), generate.stderr[-3000:]
  bad = run("lm-jax-train", "--text_path=mine.txt", "--corpus=ptb")
  _assert_one_line_error(bad, "--corpus=ptb")


def test_prompts_are_read_as_the_training_text_was(tmp_path):
  """--lowercase --letters_only at training: the prompt's capitals and punctuation are folded
  the same way, so no <unk> and no warning."""
  (tmp_path / "t.txt").write_text("the cat sat on the mat " * 100)
  result = _command("train", f"--text_path={tmp_path / 't.txt'}", f"--workdir={tmp_path / 'w'}",
                    "--steps=4", "--lowercase", "--letters_only", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  result = _command("generate", f"--workdir={tmp_path / 'w'}", "--prompt=The Cat, sat.",
                    "--num_tokens=3")
  assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-3000:]
  assert result.stdout.startswith("the cat sat ")
