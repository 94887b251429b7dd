r"""Sample text from a train_lm.py workdir's latest checkpoint (the ``lm-jax-generate`` command).

  python experiments/generate.py --workdir=runs/default --prompt="the" --temperature=0.8
  python experiments/generate.py --workdir=runs/timemachine --prompt="time traveller" \
      --num_tokens=200 --temperature=0     # greedy

Temperature T divides the logits: T < 1 peaky, T > 1 flat, T = 0 greedy (argmax).
"""
from lm_jax.commands import generate

if __name__ == "__main__":
  generate.run()
