"""Binomial quantiles summed term by term: the exact percentiles of the bootstrap of a 0/1 share (the
bootstrap distribution of the mean of n 0/1 values with k ones is Binomial(n, k/n) / n)."""

from math import comb


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest j with P(Binomial(n, p) <= j) >= q."""
    cdf = 0.0
    for j in range(n + 1):
        cdf += comb(n, j) * p ** j * (1 - p) ** (n - j)
        if cdf >= q:
            return j
    return n
