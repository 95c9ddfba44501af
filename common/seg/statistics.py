"""Spread over repeats and differences with confidence intervals, for the downstream study.

A regime trained with K seeds and tested on the same N cases gives scores ``(K, N)`` (one
label, or the mean over labels of each case; NaN where a case lacks the label).
``mean_sd`` gives the mean and the sample standard deviation over seeds of the per-seed means;
``bootstrap_difference`` the mean difference of two regimes with a percentile bootstrap
interval that resamples seeds and test cases with replacement, paired: the same resampled
(seed, case) pairs for both regimes (seed k of each regime starts from the same weights, and
case c is the same scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    """Mean of the finite entries along ``axis``; NaN where there are none (no warning)."""
    finite = np.isfinite(x)
    count = finite.sum(axis=axis)
    total = np.where(finite, x, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def mean_sd(scores: Sequence[Sequence[float]]) -> tuple[float, float]:
    """``(mean, sd)`` over seeds of the per-seed mean scores of ``scores (K, N)``; sd is the
    sample standard deviation (ddof 1), NaN for one seed."""
    per_seed = _nanmean(np.asarray(scores, dtype=np.float64), axis=1)
    per_seed = per_seed[np.isfinite(per_seed)]
    if per_seed.size == 0:
        return float("nan"), float("nan")
    sd = float(np.std(per_seed, ddof=1)) if per_seed.size > 1 else float("nan")
    return float(per_seed.mean()), sd


def bootstrap_difference(
    scores: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    level: float = 0.95,
    resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: mean of ``scores - reference`` (both ``(K, N)``: seeds x
    test cases, paired) and its ``level`` percentile bootstrap interval.

    Each resample draws K seeds and N cases with replacement (seeded by ``seed``) and averages
    the paired differences of those (seed, case) cells.
    """
    diff = np.asarray(scores, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"scores and reference must be (seeds, cases) arrays, got {diff.shape}")
    k, n = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, k, (resamples, k, 1))
    cases = rng.integers(0, n, (resamples, 1, n))
    means = _nanmean(diff[seeds, cases].reshape(resamples, -1), axis=1)
    means = means[np.isfinite(means)]
    if means.size == 0:
        return float("nan"), float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(_nanmean(diff)), float(low), float(high)


def case_means(per_label: np.ndarray) -> np.ndarray:
    """``(K, N, L)`` per-label scores -> ``(K, N)``: each case's mean over its labels."""
    return _nanmean(np.asarray(per_label, dtype=np.float64), axis=-1)
