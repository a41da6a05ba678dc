"""Confidence intervals for the evidence: Wilson's score interval for an accuracy out of n prompts, and a
block bootstrap for the mean of a per-position series (neighbouring positions are correlated, so whole
blocks are resampled)."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (Wilson 1927); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} is not in [0, n = {n}]")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def sign_test(b: int, c: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of b against c discordant pairs: the chance, under no
    difference, of a split at least as uneven as b:c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def block_means(values: np.ndarray, block: int) -> np.ndarray:
    """Means of consecutive blocks of `block` values (the last may be shorter)."""
    v = np.asarray(values, dtype=np.float64)
    return np.array([v[i:i + block].mean() for i in range(0, len(v), block)])


def bootstrap_ratio(num: np.ndarray, den: np.ndarray | None = None, *, weights: np.ndarray | None = None,
                    n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of sum(w*num)/sum(w) (den None) or of sum(w*num)/sum(w*den) over blocks
    resampled with replacement. num/den are per-block means, weights the blocks' sizes; a paired ratio
    (two methods on the same text) resamples the same blocks for both."""
    num = np.asarray(num, dtype=np.float64)
    w = np.ones_like(num) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    top = (num[idx] * w[idx]).sum(axis=1)
    bottom = w[idx].sum(axis=1) if den is None else (np.asarray(den, dtype=np.float64)[idx] * w[idx]).sum(axis=1)
    stats = top / bottom
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))
