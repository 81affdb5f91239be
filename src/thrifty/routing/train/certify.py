"""Certified thresholds: the cheapest acceptance rule whose quality holds on new prompts, with a
stated confidence, rather than on the calibration rows alone.

The promise is "quality >= target x the reference's", over prompts drawn like the training ones.
For a rule, each row gives a paired difference d = ok(rule) - target x ok(reference); the rule is
certified when a one-sided lower confidence bound on the mean of d is >= 0 (normal approximation
of the paired difference: mean - z x sd / sqrt(n); n is hundreds here). Rules are tested along a
path fixed before looking at correctness, most cautious first (everything to the strong model,
then lone drafts and agreements accepted by decreasing gate score), and testing stops at the first rule
that fails: fixed-sequence testing (as in Learn then Test, Angelopoulos et al. 2021), so the chance
that any rule before it misses the target is at most 1 - confidence however many rules the path
holds (each test is at the full level; no multiple-comparison penalty, which is why the order must
not depend on the labels), and the cheapest of them is chosen.

Everything here is pure numpy over arrays, so the repeated-draw test of the coverage is fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any


def z_score(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise ValueError("confidence must be in [0.5, 1)")
    return NormalDist().inv_cdf(confidence)


@dataclass(frozen=True, slots=True)
class PathPoint:
    """One rule on the path: how many lone drafts it accepts, its totals over the rows."""

    step: int  # 0: all to the strong model alone; then rules by decreasing score threshold
    threshold: float  # the score a lone draft or an agreement needs (inf: none accepted)
    quality: float  # right answers
    both: float  # rows right under both the rule and the reference
    cost: float
    lower: float  # lower confidence bound of sum(d), >= 0 when certified


def lower_bounds(q: Any, qr: Any, r: float, n: int, target: float, z: float) -> Any:
    """Vectorised lower bounds of sum(d) for rules with `q` right answers, `qr` rows right under
    both the rule and the reference, `r` reference-right rows of `n`."""
    import numpy as np

    q, qr = np.asarray(q, dtype=float), np.asarray(qr, dtype=float)
    s = q - target * r
    s2 = q + target * target * r - 2.0 * target * qr  # sum of d^2 (ok values are 0/1)
    var = np.maximum(s2 - s * s / n, 0.0)  # n x variance of d: the variance of the sum
    return s - z * np.sqrt(var)


def certified_ratio(q: float, qr: float, r: float, n: int, z: float) -> float:
    """The largest quality ratio (rule / reference) that the rows certify: the least `target` at
    which the lower bound still holds, found by bisection (the bound falls as target rises)."""
    lo, hi = 0.0, 2.0
    if r <= 0:
        return 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if float(lower_bounds([q], [qr], r, n, mid, z)[0]) >= 0:
            lo = mid
        else:
            hi = mid
    return lo


def certify_path(
    score1: Any,
    score2: Any,
    ok1: Any,
    ok2: Any,
    ok_esc: Any,
    ok_base: Any,
    ok_ref: Any,
    cost1: Any,
    cost2: Any,
    cost_esc: Any,
    cost_base: Any,
    *,
    target: float,
    confidence: float,
    third: tuple[Any, Any, Any, Any, Any] | None = None,
) -> tuple[list[PathPoint], int]:
    """The path's rules and the index of the certified one (-1: not even the first is).

    Rule 0 sends every prompt to the strong model alone (`ok_base`/`cost_base`). Rule lambda takes
    a row's lone draft when `score1` >= lambda (`ok1`/`cost1`), else its second-stage answer when
    `score2` >= lambda (`ok2`/`cost2`; -inf where the drafts disagree), else escalates after the
    cheap calls (`ok_esc`/`cost_esc`); lambda runs down over every score, so each rule accepts a
    superset of the one before. `ok_ref` is the reference's correctness. Scores are label-free
    (out-of-fold gate outputs), so the order of the path does not look at the answers.

    `third` = (asks3, score3, ok3, cost3, cost_esc3) adds a third cheap opinion under the same
    lambda: a row neither stage took where `asks3` (the two drafts agreed, so the third model is
    asked) is taken when `score3` >= lambda (-inf where the third disagrees), at `cost3` (all three
    cheap calls), else escalated at `cost_esc3` (the third call paid too). Only rules with a finite
    lambda ask the third model."""
    import numpy as np

    z = z_score(confidence)
    s1, s2 = np.asarray(score1, dtype=float), np.asarray(score2, dtype=float)
    o1, o2, oe, ob, ref, c1, c2, ce, cb = (
        np.asarray(a, dtype=float)
        for a in (ok1, ok2, ok_esc, ok_base, ok_ref, cost1, cost2, cost_esc, cost_base)
    )
    n, r = len(s1), float(ref.sum())
    grid = np.unique(np.concatenate([s1, s2, *([np.asarray(third[1], dtype=float)] if third else [])]))
    grid = grid[np.isfinite(grid)][::-1]
    lam = np.concatenate([[np.inf], grid])[:, None]  # inf: every prompt escalates after the cheap calls
    take1 = s1[None, :] >= lam
    take2 = ~take1 & (s2[None, :] >= lam)
    esc = ~take1 & ~take2
    ok = take1 * o1 + take2 * o2 + esc * oe
    spent = take1 * c1 + take2 * c2 + esc * ce
    if third is not None:
        a3, s3, o3, c3, ce3 = (np.asarray(a, dtype=float) for a in third)
        asked = esc & (a3 > 0)[None, :] & np.isfinite(lam)  # rows that reach the third model
        take3 = asked & (s3[None, :] >= lam)
        ok = ok + take3 * (o3 - oe)
        spent = spent + take3 * (c3 - ce) + (asked & ~take3) * (ce3 - ce)
    q = np.concatenate([[ob.sum()], ok.sum(axis=1)])
    qr = np.concatenate([[(ob * ref).sum()], (ok * ref).sum(axis=1)])
    c = np.concatenate([[cb.sum()], spent.sum(axis=1)])
    lows = lower_bounds(q, qr, r, n, target, z)
    # Each rule's threshold is cut halfway to the next lower score: the gates the artifact ships
    # are refitted on every row, and their scores move a little from the out-of-fold ones.
    scores = [float(v) for v in lam[:, 0]]
    lower = [*scores[1:], scores[-1] - 2.0]
    cuts = [(a + b) / 2 if math.isfinite(a) else a for a, b in zip(scores, lower, strict=True)]
    thresholds = [math.inf, *cuts]
    points = [
        PathPoint(i, thresholds[i], float(q[i]), float(qr[i]), float(c[i]), float(lows[i]))
        for i in range(len(q))
    ]
    return points, cheapest_certified(points)


def cheapest_certified(points: list[PathPoint]) -> int:
    """Fixed-sequence testing: every rule before the first that fails is certified (the chance
    that any of them misses the target is at most 1 - confidence), so the cheapest of them may be
    chosen. -1 when the first rule already fails."""
    passed: list[int] = []
    for i, p in enumerate(points):
        if p.lower < 0:
            break
        passed.append(i)
    return min(passed, key=lambda i: (points[i].cost, -i)) if passed else -1


def prompts_needed(point: PathPoint, r: float, n: int, target: float, z: float) -> float:
    """How many prompts like these a certificate of `point` would need: the n at which its
    one-sided bound clears 0 if each row's paired difference kept the mean and variance measured
    here (n >= (z sd / mean)^2; inf when the rule measures at or below the target, which no
    amount of data can certify)."""
    s = point.quality - target * r
    if n <= 0 or s <= 0:
        return math.inf
    s2 = point.quality + target * target * r - 2.0 * target * point.both
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    return (z * math.sqrt(var) / mean) ** 2


def projected_costs(
    points: list[PathPoint], r: float, n: int, target: float, z: float, factors: tuple[float, ...]
) -> list[tuple[float, float, float]]:
    """What more labels would buy: for each factor f, (f x n prompts, cost, quality) of the rule the
    path would certify with that many prompts, if every rule's paired mean and variance stayed as
    measured (fixed-sequence: the last rule before the first that would still fail). A projection
    from these rows' variance, not a promise."""
    out: list[tuple[float, float, float]] = []
    for f in factors:
        passing = [
            replace(p, lower=0.0 if prompts_needed(p, r, n, target, z) <= f * n else -1.0) for p in points
        ]
        p = points[max(cheapest_certified(passing), 0)]
        out.append((f * n, p.cost, p.quality))
    return out
