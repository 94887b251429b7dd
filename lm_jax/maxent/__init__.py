"""Log-linear (MaxEnt) models with feature functions phi(x, y), fitted by maximum
likelihood (:mod:`loglinear`), and hashed n-gram features for them (:mod:`ngram`)."""

from lm_jax.maxent import loglinear
from lm_jax.maxent import ngram
