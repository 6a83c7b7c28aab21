"""Bootstrap 95% intervals of a score over its examples, computed where the per-example values exist.

A task score on a sample of n examples is uncertain by about 1/n per example (16 NLI examples: 0.06
per example), so a figure needs the interval to tell a change from noise. The interval is the
percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the n examples with replacement
``RESAMPLES`` times, recompute the score on each resample, and take the 2.5th and 97.5th percentiles
of those scores. The generator is seeded, so one sample always gets the same interval.

A score that is a ratio of sums over examples (perplexity = exp(Σ NLL / Σ tokens) over windows)
resamples whole examples and recomputes the ratio on each resample (``ratio_interval``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentiles(statistics: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap statistics."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of ``values``; (NaN, NaN) for no values."""
    data = np.asarray(values, dtype=np.float64)
    if not len(data):
        return math.nan, math.nan
    return percentiles(data[_resample_indices(len(data), resamples, seed)].mean(axis=1), level)


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], *, transform=None,
                   resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """The percentile-bootstrap interval of ``transform(Σ numerators / Σ denominators)`` over examples
    (each example one (numerator, denominator) pair, resampled together); ``transform``, a numpy ufunc
    such as ``exp`` (perplexity from per-window NLL sums and token counts)."""
    top = np.asarray(numerators, dtype=np.float64)
    bottom = np.asarray(denominators, dtype=np.float64)
    if len(top) != len(bottom):
        raise ValueError(f"ratio_interval: {len(top)} numerators for {len(bottom)} denominators")
    if not len(top):
        return math.nan, math.nan
    index = _resample_indices(len(top), resamples, seed)
    ratios = top[index].sum(axis=1) / bottom[index].sum(axis=1)
    return percentiles(transform(ratios) if transform is not None else ratios, level)


def proportion_interval(value: float, n: int, *, level: float = LEVEL) -> tuple[float, float]:
    """The same percentile-bootstrap interval for a share of n 0/1 outcomes, in closed form: the
    bootstrap distribution of such a mean is exactly Binomial(n, value) / n, so its percentiles are
    binomial quantiles (the smallest j with P(X <= j) >= q). For stores written before intervals were
    stored, which hold only the share and n."""
    if n <= 0 or math.isnan(value):
        return math.nan, math.nan
    if value <= 0 or value >= 1:
        return float(value), float(value)
    tail = (1 - level) / 2
    log_p, log_q = math.log(value), math.log1p(-value)
    cdf, low, high = 0.0, None, None
    for j in range(n + 1):
        # log of C(n, j) p^j (1-p)^(n-j), through lgamma so that large n does not overflow
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                        + j * log_p + (n - j) * log_q)
        if low is None and cdf >= tail:
            low = j
        if cdf >= 1 - tail:
            high = j
            break
    return low / n, (high if high is not None else n) / n
