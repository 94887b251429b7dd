r"""Zipf's law on a corpus: fitted exponents of unigrams, bigrams and trigrams, and a plot.

Reads the corpus's training split (ids, with ``<eos>``/``<unk>`` as ordinary types),
fits alpha on log-log rank/frequency curves (``lm_jax.data.zipf.fit_zipf``: ranks 10 up to
the last rank seen 5 times, each decade weighted equally), prints the alphas, and
writes a PNG and a JSON file. Examples:

  python experiments/zipf.py --corpus=ptb --out=zipf_ptb.png --json_out=zipf_ptb.json
  python experiments/zipf.py --corpus=timemachine --level=word --out=zipf_tm.png
  python experiments/zipf.py --corpus=text --path=my.txt --level=word --lowercase
"""
import json

from absl import app
from absl import flags

from lm_jax.data import corpora
from lm_jax.data import zipf

_CORPUS = flags.DEFINE_enum("corpus", "synthetic", list(corpora.NAMES), "corpus to analyse")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "folder of ptb/, wikitext-2/, timemachine/ "
                                "(default: $LM_JAX_DATA_DIR or ../shared/data)")
_PATH = flags.DEFINE_string("path", None, "text file for --corpus=text")
_LEVEL = flags.DEFINE_enum("level", None, ["word", "char"],
                           "tokens for text corpora (default: the loader's)")
_LOWERCASE = flags.DEFINE_bool("lowercase", False, "lower-case (--corpus=text)")
_LETTERS_ONLY = flags.DEFINE_bool("letters_only", False, "non-letters to spaces (--corpus=text)")
_MAX_N = flags.DEFINE_integer("max_n", 3, "fit 1..max_n-grams")
_MIN_RANK = flags.DEFINE_integer("min_rank", 10, "first rank of the fit")
_MIN_COUNT = flags.DEFINE_integer("min_count", 5, "fit ranks whose count is at least this")
_OUT = flags.DEFINE_string("out", "zipf.png", "PNG path ('' for none)")
_JSON_OUT = flags.DEFINE_string("json_out", None, "JSON path for the fitted alphas")


def main(argv):
  del argv
  kwargs = {"level": _LEVEL.value} if _LEVEL.value else {}
  if _CORPUS.value == "text":
    kwargs.update(path=_PATH.value, lowercase=_LOWERCASE.value, letters_only=_LETTERS_ONLY.value)
  corpus = corpora.load_corpus(_CORPUS.value, _DATA_DIR.value, **kwargs)
  report = zipf.zipf_report(corpus.train, max_n=_MAX_N.value, png_path=_OUT.value or None,
                            title=f"{corpus.name} ({corpus.level}s)",
                            min_rank=_MIN_RANK.value, min_count=_MIN_COUNT.value)
  report.update(corpus=corpus.name, level=corpus.level)
  for n, fit in report["ngrams"].items():
    print(f"{corpus.name} {n}-grams: alpha = {fit['alpha']:.3f} over ranks {fit['fit_ranks']} "
          f"of {fit['distinct']} distinct")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
