r"""Evaluate a train_lm.py workdir on text files (the ``lm-jax-evaluate`` command).

  python experiments/evaluate.py --workdir=runs/book held_out.txt [more.txt ...]

Prints perplexity, bits per token, bits per character, the <unk> rate and the token count
of each file as a table, and writes them as JSON (--json_out, default
<workdir>/evaluation.json).
"""
from lm_jax.commands import evaluate

if __name__ == "__main__":
  evaluate.run()
