"""Text and data, NumPy only: tokenization and the vocabulary (:mod:`text`), corpora on
disk (:mod:`corpora`), the embedded synthetic language (:mod:`synthetic`), Zipf's law
(:mod:`zipf`), and random-sampling / sequential-partitioning minibatches (:mod:`batching`)."""

from lm_jax.data import batching
from lm_jax.data import corpora
from lm_jax.data import synthetic
from lm_jax.data import text
from lm_jax.data import zipf
from lm_jax.data.text import Vocab
