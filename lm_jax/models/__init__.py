"""Models: recurrent cells as a ``lax.scan`` (:mod:`rnn`), the language model
(:mod:`language_model`: embedding, stacked cells, any output head) and sampling text from
it (:mod:`generation`). Built on :mod:`lm_jax.heads` and :mod:`lm_jax.ops`."""

from lm_jax.models import generation
from lm_jax.models import language_model
from lm_jax.models import rnn
from lm_jax.models.generation import generate
from lm_jax.models.language_model import LanguageModel
from lm_jax.models.language_model import make_language_model
from lm_jax.models.rnn import elman_cell
from lm_jax.models.rnn import get_cell
from lm_jax.models.rnn import gru_cell
from lm_jax.models.rnn import lstm_cell
from lm_jax.models.rnn import scan_layer
