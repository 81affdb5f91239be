"""Threshold calibration on out-of-fold scores without a certificate: the cost/quality frontier of
threshold pairs, the joint choice over tasks, the bootstrap medians kept for comparison, the
unseen-task bar and the classifier's threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.routing.train.oof import Prepared
from thrifty.routing.train.router import NEVER


def _thresholds(ps: Sequence[float], n: int = 60) -> list[float]:
    vals = sorted(set(ps))
    if len(vals) > n:
        vals = [vals[round(k * (len(vals) - 1) / (n - 1))] for k in range(n)]
    return [*vals, NEVER]


@dataclass(frozen=True, slots=True)
class Point:
    """One threshold pair's outcome on calibration rows: cost in USD, quality in right answers."""

    cost: float
    quality: float
    first: float
    second: float


def frontier(
    rows: Sequence[Prepared],
    p1: Sequence[float],
    p2: Sequence[float],
    *,
    first: bool,
    grid: int = 60,
    weights: Sequence[float] | None = None,
    min_second: float = -math.inf,
    max_second: float | None = None,
) -> list[Point]:
    """Every (first, second) threshold pair on a grid of score quantiles, with its cost and quality
    (each row counted `weights[i]` times, for bootstrap resamples)."""
    import numpy as np

    a1, a2 = np.asarray(p1, dtype=float), np.asarray(p2, dtype=float)
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=float)
    ok1 = np.array([r.ok1 for r in rows], dtype=float) * w
    ok2 = np.array([r.ok2 for r in rows], dtype=float) * w
    oks = np.array([r.ok_strong for r in rows], dtype=float) * w
    c1 = np.array([r.cost1 for r in rows]) * w
    c2 = np.array([r.cost2 for r in rows]) * w
    cs = np.array([r.cost_strong for r in rows]) * w
    out: list[Point] = []
    for t1 in _thresholds(p1, grid) if first else [NEVER]:
        acc1 = a1 >= t1
        for t2 in (
            [t for t in _thresholds(p2, grid) if t >= min_second] if max_second is None else [max_second]
        ):
            acc2 = ~acc1 & (a2 >= t2)
            esc = ~acc1 & ~acc2
            q = float((ok1 * acc1 + ok2 * acc2 + oks * esc).sum())
            c = float((c1 * acc1 + c2 * acc2 + cs * esc).sum())
            out.append(Point(c, q, t1, t2))
    return out


def cheapest(points: Sequence[Point], need: float) -> Point:
    """The cheapest point with quality >= need; if none, the best quality (cheapest among equals)."""
    ok = [p for p in points if p.quality >= need - 1e-9]
    if ok:
        return min(ok, key=lambda p: (p.cost, -p.quality))
    return max(points, key=lambda p: (p.quality, -p.cost))


def pareto(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both cost and quality, by increasing cost."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.quality)):
        if not out or p.quality > out[-1].quality:
            out.append(p)
    return out


def calibrate_joint(frontiers: dict[str, list[Point]], need: float) -> dict[str, Point]:
    """One point per task, minimising total cost subject to total quality >= need (the metric is
    quality over the mixture of seen tasks): an exact merge of the tasks' Pareto fronts. If no
    combination reaches `need`, each task's best-quality point (cheapest among equals)."""
    combos: list[tuple[float, float, dict[str, Point]]] = [(0.0, 0.0, {})]  # (cost, quality, pick)
    for task, points in sorted(frontiers.items()):
        merged = [
            (c + p.cost, q + p.quality, {**sel, task: p}) for c, q, sel in combos for p in pareto(points)
        ]
        merged.sort(key=lambda m: (m[0], -m[1]))
        combos = []
        for m in merged:
            if not combos or m[1] > combos[-1][1]:
                combos.append(m)
    ok = [m for m in combos if m[1] >= need - 1e-9]
    if not ok:
        return {t: cheapest(ps, math.inf) for t, ps in frontiers.items()}
    return min(ok, key=lambda m: m[0])[2]


def calibrate_bagged(
    rows: dict[str, list[Prepared]],
    s1: dict[str, list[float]],
    s2: dict[str, list[float]],
    target: float,
    *,
    grid: int = 60,
    rounds: int = 0,
    min_second: float = -math.inf,
    max_second: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-task (first, second) thresholds meeting `target` x the reference's quality over all
    tasks at the least cost. With `rounds` > 0, the choice is repeated on bootstrap resamples of
    the rows (seeded, so training is deterministic) and each threshold is the median choice: the
    frontier is flat (a right answer more or less can move the cheapest point a long way), and
    the median is far steadier than one noisy argmin."""
    import numpy as np

    def once(weights: dict[str, list[float]] | None) -> dict[str, Point]:
        fronts = {
            t: frontier(
                rs,
                s1[t],
                s2[t],
                first=True,
                grid=grid,
                weights=None if weights is None else weights[t],
                min_second=min_second,
                max_second=max_second,
            )
            for t, rs in rows.items()
        }
        need = target * sum(
            float(np.dot([r.ok_ref for r in rs], weights[t]))
            if weights is not None
            else sum(r.ok_ref for r in rs)
            for t, rs in rows.items()
        )
        return calibrate_joint(fronts, need)

    if rounds <= 0:
        return {t: (p.first, p.second) for t, p in once(None).items()}
    rng = np.random.default_rng(7)
    picks = [
        once({t: [float(v) for v in rng.poisson(1.0, len(rs))] for t, rs in rows.items()})
        for _ in range(rounds)
    ]
    return {
        t: (float(np.median([p[t].first for p in picks])), float(np.median([p[t].second for p in picks])))
        for t in rows
    }


UNSEEN_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass(frozen=True, slots=True)
class HeldOut:
    """A training task scored as if unseen: by gates fitted on the other tasks only."""

    rows: Sequence[Prepared]
    p2: Sequence[float]  # stage-2 P(right)
    p3: Sequence[float] | None  # three-way P(right), if the ladder has a third opinion


def _unseen_outcome(r: Prepared, p2: float, p3: float, pair_t: float, third_t: float) -> tuple[bool, float]:
    """(right, cost) of one row under the fallback rule (pair bar, three-way bar)."""
    if r.agree and p2 >= pair_t:
        return r.ok2, r.cost2
    if r.agree and not math.isinf(third_t):  # the third model is asked
        return (r.ok2, r.cost3) if r.agree3 and p3 >= third_t else (r.ok_strong, r.cost_esc3)
    return r.ok_strong, r.cost_strong


def calibrate_unseen(held_out: Sequence[HeldOut], need: float, tolerance: float) -> tuple[float, float]:
    """The fallback's (agreement, three-way agreement) thresholds on P(right), from tasks each
    scored as if unseen: either two drafts that agree above a bar, or, with a third opinion, all
    three agreeing above a bar (two alone never accepted).

    Worst case over those tasks: the cheapest rule whose worst relative quality reaches `need`;
    if none does, the cheapest within `tolerance` of the best worst-case quality (chasing the last
    tenth of a point on one task can multiply the cost on another). NEVER for both if even
    escalating every prompt is not within reach."""
    rules = [(t, NEVER) for t in (*UNSEEN_GRID, NEVER)]
    if all(h.p3 is not None for h in held_out):
        rules += [(NEVER, t) for t in UNSEEN_GRID]
    options: list[tuple[tuple[float, float], float, float]] = []  # (rule, worst quality, worst cost)
    for pair_t, third_t in rules:
        worst_q, worst_c = math.inf, 0.0
        for h in held_out:
            p3s = h.p3 if h.p3 is not None else [0.0] * len(h.rows)
            outs = [
                _unseen_outcome(r, p2, p3, pair_t, third_t)
                for r, p2, p3 in zip(h.rows, h.p2, p3s, strict=True)
            ]
            ref_q = sum(r.ok_ref for r in h.rows) or 1
            ref_c = sum(r.cost_ref for r in h.rows) or 1.0
            q, c = sum(o[0] for o in outs), sum(o[1] for o in outs)
            worst_q, worst_c = min(worst_q, q / ref_q), max(worst_c, c / ref_c)
        options.append(((pair_t, third_t), worst_q, worst_c))
    best = max(q for _, q, _ in options)
    floor = min(need, best - tolerance)
    return min((o for o in options if o[1] >= floor - 1e-12), key=lambda o: (o[2], -o[1]))[0]


def calibrate_classifier(rows: Sequence[Prepared], p: Sequence[float], target: float) -> float:
    """The lowest P(cheap right) threshold (cheapest routing) reaching the target, else NEVER."""
    need = target * sum(r.ok_ref for r in rows)
    best = NEVER
    for t in sorted(_thresholds(p), reverse=True):
        q = sum(r.ok1 if pi >= t else r.ok_ref for r, pi in zip(rows, p, strict=True))
        if q >= need - 1e-9:
            best = t
    return best
