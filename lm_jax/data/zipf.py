r"""Zipf's law: rank/frequency curves of n-grams and their fitted exponents.

Zipf's law says the ``i``-th most frequent word has frequency

.. math::

   n_i \propto i^{-\alpha}, \qquad \log n_i = -\alpha \log i + c,

so ``alpha`` is minus the slope of the rank/frequency curve on log-log axes.
``fit_zipf`` estimates it by least squares on ``(log i, log n_i)`` over a range of
ranks, each rank weighted by ``1 / i`` so that every decade of ranks counts equally
(unweighted, the many ranks of the tail would decide the fit alone). The default
range skips the first 9 ranks (function words bend the head) and stops at the last
rank seen at least 5 times (below that the counts are a staircase of small integers).

>>> freqs = rank_frequency([0, 0, 0, 0, 1, 1, 2, 0, 1, 3])
>>> freqs.tolist(), rank_frequency([0, 0, 0, 0, 1, 1, 2, 0, 1, 3], n=2).tolist()
([5, 3, 1, 1], [3, 2, 1, 1, 1, 1])
>>> round(fit_zipf(1e6 * (1.0 + np.arange(1000)) ** -1.1), 4)
1.1

References:
  G. K. Zipf, Human Behavior and the Principle of Least Effort (1949);
  Dive into Deep Learning, section 9.3.3 "Natural Language Statistics" (n-grams follow
  Zipf's law with a smaller exponent).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

_FIT_DEFAULTS = {"min_rank": 10, "max_rank": None, "min_count": 5}


def _as_ids(tokens: Sequence[Any] | np.ndarray) -> np.ndarray:
  """Integer arrays as they are; other tokens numbered in order of first appearance."""
  if isinstance(tokens, np.ndarray) and np.issubdtype(tokens.dtype, np.integer):
    return tokens
  index: dict[Any, int] = {}
  return np.fromiter((index.setdefault(t, len(index)) for t in tokens), dtype=np.int64)


def rank_frequency(token_ids_or_tokens: Sequence[Any] | np.ndarray, n: int = 1) -> np.ndarray:
  """Counts of the distinct n-grams of a token stream, sorted descending, ``np.int64``.

  Args:
    token_ids_or_tokens: a 1-D integer array or a sequence of hashable tokens.
    n: n-gram order, ``1 <= n <= len(tokens)``.

  Returns:
    ``np.int64 [number of distinct n-grams]``.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be an int >= 1, got {n!r}")
  arr = _as_ids(token_ids_or_tokens)
  if arr.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
  if len(arr) < n:
    raise ValueError(f"{len(arr)} tokens have no {n}-grams")
  grams_NxG = np.lib.stride_tricks.sliding_window_view(arr.astype(np.int64), n)
  _, counts = np.unique(grams_NxG, axis=0, return_counts=True)
  return np.sort(counts)[::-1].astype(np.int64)


def _fit_line(freqs: Any, min_rank: int, max_rank: int | None,
              min_count: int) -> tuple[float, float, int, int]:
  """(slope, intercept, first rank, last rank) of the weighted log-log fit."""
  freqs = np.asarray(freqs, dtype=np.float64)
  if freqs.ndim != 1:
    raise ValueError(f"freqs must be 1-D, got shape {freqs.shape}")
  if np.any(np.diff(freqs) > 0):
    raise ValueError("freqs must be sorted in decreasing order (use rank_frequency)")
  if min_rank < 1:
    raise ValueError(f"min_rank must be >= 1, got {min_rank}")
  last = int(np.sum(freqs >= min_count))
  lo, hi = min_rank, last if max_rank is None else min(max_rank, last)
  if hi - lo + 1 < 2:
    raise ValueError(f"need at least 2 ranks to fit, but ranks [{lo}, {hi}] of {len(freqs)} "
                     f"(count >= {min_count}) leave {max(hi - lo + 1, 0)}")
  ranks = np.arange(lo, hi + 1, dtype=np.float64)
  slope, intercept = np.polyfit(np.log(ranks), np.log(freqs[lo - 1:hi]), 1, w=ranks ** -0.5)
  return float(slope), float(intercept), lo, hi


def fit_zipf(freqs: Sequence[float] | np.ndarray, *, min_rank: int = 10,
             max_rank: int | None = None, min_count: int = 5) -> float:
  r"""The Zipf exponent ``alpha`` of a rank/frequency curve.

  .. math::

     \hat\alpha, \hat c = \arg\min \sum_{i = r_0}^{r_1} \frac{1}{i}
       \bigl(\log n_i + \alpha \log i - c\bigr)^2

  Args:
    freqs: counts sorted descending, ``[R]`` (as ``rank_frequency`` returns).
    min_rank: first rank used (1-based, inclusive).
    max_rank: last rank used (inclusive); None: up to the last rank with
      ``count >= min_count``.
    min_count: ranks with smaller counts are left out.

  Returns:
    ``alpha`` (a Python float; larger means a steeper curve).
  """
  return -_fit_line(freqs, min_rank, max_rank, min_count)[0]


def zipf_report(token_ids_or_tokens: Sequence[Any] | np.ndarray, *, max_n: int = 3,
                png_path: str | os.PathLike | None = None, title: str | None = None,
                **fit_kwargs) -> dict[str, Any]:
  """Fits alpha for the 1..max_n-grams of a stream; optionally plots them.

  Returns:
    A JSON-ready dict: ``num_tokens``, the fit settings, and per ``n`` (as a string)
    ``alpha``, ``distinct`` n-grams and the ``fit_ranks`` ``[first, last]`` used.
  """
  tokens = _as_ids(token_ids_or_tokens)
  settings = {**_FIT_DEFAULTS, **fit_kwargs}
  curves, ngrams = {}, {}
  for n in range(1, max_n + 1):
    freqs = rank_frequency(tokens, n)
    slope, _, lo, hi = _fit_line(freqs, **settings)
    curves[f"{n}-grams"] = freqs
    ngrams[str(n)] = {"alpha": -slope, "distinct": int(len(freqs)), "fit_ranks": [lo, hi]}
  if png_path is not None:
    plot_zipf(curves, png_path, title=title, **settings)
  return {"num_tokens": int(len(tokens)), "fit": settings, "ngrams": ngrams}


def plot_zipf(curves: Mapping[str, np.ndarray], path: str | os.PathLike, *,
              title: str | None = None, **fit_kwargs) -> dict[str, float]:
  """Writes a log-log rank/frequency PNG with fitted lines; returns ``{label: alpha}``.

  Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6.4, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  alphas = {}
  for label, freqs in curves.items():
    freqs = np.asarray(freqs, dtype=np.float64)
    slope, intercept, lo, hi = _fit_line(freqs, **{**_FIT_DEFAULTS, **fit_kwargs})
    alphas[label] = -slope
    (line,) = ax.loglog(np.arange(1, len(freqs) + 1), freqs,
                        label=f"{label}: alpha = {-slope:.2f}")
    fit_ranks = np.geomspace(lo, hi, 50)
    ax.loglog(fit_ranks, np.exp(intercept) * fit_ranks ** slope, "--", color=line.get_color(),
              linewidth=1)
  ax.set_xlabel("rank")
  ax.set_ylabel("frequency")
  if title:
    ax.set_title(title)
  ax.legend()
  ax.grid(True, which="major", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  return alphas
