"""The command-line programs: ``lm-jax-train``, ``lm-jax-evaluate`` and ``lm-jax-generate``
(console scripts of the installed package; ``experiments/train_lm.py``, ``evaluate.py`` and
``generate.py`` are the same programs). Each module defines its absl flags only when its
``run()`` starts, so importing it (or ``lm_jax``) defines no flag. Mistakes in the user's
input print one line, ``error: ...``, and exit with status 2 (:mod:`lm_jax.commands.cli`).
"""
