"""Small statistics for eval results: Wilson intervals, percentiles, a paired difference bound. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def z_two_sided(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    z = z_two_sided(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def paired_difference(
    baseline: Sequence[bool], candidate: Sequence[bool], confidence: float
) -> tuple[float, float, float]:
    """Mean of candidate - baseline over paired items and its two-sided interval at `confidence`
    (normal approximation on the per-item differences, -1/0/+1)."""
    n = len(baseline)
    if n == 0 or n != len(candidate):
        raise ValueError("paired samples must be non-empty and of equal length")
    diffs = [int(c) - int(b) for b, c in zip(baseline, candidate, strict=True)]
    mean = sum(diffs) / n
    if n == 1:
        return (mean, -1.0, 1.0)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = z_two_sided(confidence) * math.sqrt(var / n)
    return (mean, mean - half, mean + half)
