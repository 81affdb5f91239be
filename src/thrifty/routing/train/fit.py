"""Training the router: fit its gates on labelled per-model outputs, calibrate its thresholds.

Gate scores are out-of-fold (k folds over the training rows); per-task thresholds are the cheapest
whose quality over all seen tasks is >= (target_quality + seen_margin) x the reference's, each the
median over bootstrap resamples; the fallback for unknown tasks is calibrated by scoring each
training task with gates fitted without it (see ``router`` for how the thresholds are used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.errors import InvalidData
from thrifty.routing.train.cost import FLASH, GPT4O, MINI
from thrifty.routing.train.data import Row, id_bucket
from thrifty.routing.train.gate import Logistic, fit_logistic, parse, prompt_features, stage_features
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router, accept_score


@dataclass(frozen=True, slots=True)
class Prepared:
    """One training row as the gates and the calibration see it."""

    task: str
    x1: list[float]
    x2: list[float]
    xp: list[float]
    y1: float  # first cheap draft right
    y2: float  # the stage-2 accepted draft right
    agree: bool
    prompt_chars: int
    draft_chars: int
    ok1: bool
    ok2: bool
    ok_strong: bool  # the escalated answer right
    ok_ref: bool
    cost1: float
    cost2: float  # both cheap calls
    cost_strong: float  # both cheap calls and the strong one
    cost_ref: float
    fold: int


def prepare(row: Row, ladder: tuple[str, str], strong: str, reference: str, folds: int) -> Prepared:
    """A row as the gates see it: parsed drafts, features, what each outcome would be and cost."""
    c0, c1, cs = row.calls[ladder[0]], row.calls[ladder[1]], row.calls[strong]
    d0, d1, ds = parse(c0.output, row.task), parse(c1.output, row.task), parse(cs.output, row.task)
    ok2 = c0.correct if d0.key is not None or d1.key is None else c1.correct
    ok_strong = cs.correct
    if ds.key is None and (d0.key is not None or d1.key is not None):
        ok_strong = c0.correct if d0.key is not None else c1.correct
    return Prepared(
        task=row.task,
        x1=stage_features([d0], row.prompt),
        x2=stage_features([d0, d1], row.prompt),
        xp=prompt_features(row.prompt),
        y1=float(c0.correct),
        y2=float(ok2),
        agree=d0.key is not None and d0.key == d1.key,
        prompt_chars=len(row.prompt),
        draft_chars=d0.length,
        ok1=c0.correct,
        ok2=ok2,
        ok_strong=ok_strong,
        ok_ref=row.calls[reference].correct,
        cost1=float(c0.cost),
        cost2=float(c0.cost + c1.cost),
        cost_strong=float(c0.cost + c1.cost + cs.cost),
        cost_ref=float(row.calls[reference].cost),
        fold=min(folds - 1, int(id_bucket(row.id, "gate-fold") * folds)),
    )


def _second(
    rows: Sequence[Prepared], train_i: Sequence[int], test_i: Sequence[int], l2: float
) -> list[float]:
    """Stage-2 P(right) of `test_i` from the agree and split gates fitted on `train_i`."""
    ag = _fit(rows, [i for i in train_i if rows[i].agree], "x2", "y2", l2)
    sp = _fit(rows, [i for i in train_i if not rows[i].agree], "x2", "y2", l2)
    return [(ag if rows[i].agree else sp).prob(rows[i].x2) for i in test_i]


def oof_second(rows: Sequence[Prepared], folds: int, l2: float) -> list[float]:
    """Out-of-fold stage-2 P(right): agree and split gates fitted without each row's fold."""
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        for i, v in zip(test_i, _second(rows, train_i, test_i, l2), strict=True):
            out[i] = v
    return out


def oof(rows: Sequence[Prepared], xs: str, ys: str, folds: int, l2: float) -> list[float]:
    """Out-of-fold P(right): each row scored by a gate fitted without its fold."""
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        if not test_i:
            continue
        model = _fit(rows, train_i, xs, ys, l2)
        for i in test_i:
            out[i] = model.prob(getattr(rows[i], xs))
    return out


def _fit(rows: Sequence[Prepared], idx: Sequence[int], xs: str, ys: str, l2: float) -> Logistic:
    x = [getattr(rows[i], xs) for i in idx]
    y = [getattr(rows[i], ys) for i in idx]
    if not y:  # e.g. no split at all in the data: an uninformed gate, P = 1/2
        x, y = [getattr(rows[0], xs)] * 2, [0.0, 1.0]
    elif len(set(y)) < 2:  # one class only: a constant model at that class's (smoothed) rate
        x, y = [*x, x[0]], [*y, 1.0 - y[0]]
    return fit_logistic(x, y, l2=l2)


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


def calibrate_unseen(
    held_out: Sequence[tuple[Sequence[Prepared], Sequence[float]]], need: float, tolerance: float
) -> float:
    """The fallback's agreement threshold on P(right), from tasks each scored as if unseen.

    Worst case over those tasks: the cheapest threshold whose worst relative quality reaches
    `need`; if none does, the cheapest within `tolerance` of the best worst-case quality (chasing
    the last tenth of a point on one task can multiply the cost on another). NEVER if even
    escalating every prompt is not within reach."""
    options: list[tuple[float, float, float]] = []  # (threshold, worst quality, worst cost)
    for t in (*UNSEEN_GRID, NEVER):
        worst_q, worst_c = math.inf, 0.0
        for rows, ps in held_out:
            q = sum(r.ok2 if r.agree and p >= t else r.ok_strong for r, p in zip(rows, ps, strict=True))
            c = sum(r.cost2 if r.agree and p >= t else r.cost_strong for r, p in zip(rows, ps, strict=True))
            ref_q = sum(r.ok_ref for r in rows) or 1
            ref_c = sum(r.cost_ref for r in rows) or 1.0
            worst_q, worst_c = min(worst_q, q / ref_q), max(worst_c, c / ref_c)
        options.append((t, worst_q, worst_c))
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


def train(
    rows: Sequence[Row],
    *,
    reference: str = GPT4O,
    target_quality: float = 0.995,
    seen_margin: float = 0.005,
    unseen_target: float = 1.0,
    unseen_margin: float = 0.01,
    unseen_tolerance: float = 0.02,
    ladder: tuple[str, str] = (MINI, FLASH),
    strong: str | None = None,
    folds: int = 5,
    l2: float = 10.0,
    cost_aware: bool = True,
    grid: int = 60,
    bootstrap: int = 30,
    accept_splits: bool = False,
    rank_agreements: bool = False,
) -> Router:
    """Fit the gates on all rows; calibrate thresholds on out-of-fold scores, per task and across
    tasks for the unseen-task fallback."""
    if not rows:
        raise InvalidData("no training rows")
    strong = strong or reference
    needed = (*ladder, strong, reference)
    for row in rows:
        lacking = [m for m in needed if m not in row.calls]
        if lacking:
            raise InvalidData(
                f"training row {row.id!r} has no reply from {', '.join(lacking)}; every row needs "
                f"the cascade's models ({', '.join(dict.fromkeys(needed))})"
            )
    prep = [prepare(r, ladder, strong, reference, folds) for r in rows]
    tasks = sorted({p.task for p in prep})
    by_task = {t: [i for i, p in enumerate(prep) if p.task == t] for t in tasks}

    def first_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            accept_score(p, prep[i].prompt_chars, prep[i].draft_chars, cost_aware=aware)
            for i, p in zip(idx, ps, strict=True)
        ]

    def second_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            s + (AGREE_BONUS if prep[i].agree else 0.0)
            for i, s in zip(idx, first_scores(idx, ps, aware), strict=True)
        ]

    every = range(len(prep))
    o1 = first_scores(every, oof(prep, "x1", "y1", folds, l2))
    o2p = oof_second(prep, folds, l2)
    o2 = second_scores(every, o2p)
    op = oof(prep, "xp", "y1", folds, l2 * 30)
    seen_need = target_quality + seen_margin
    chosen = calibrate_bagged(
        {t: [prep[i] for i in idx] for t, idx in by_task.items()},
        {t: [o1[i] for i in idx] for t, idx in by_task.items()},
        {t: [o2[i] for i in idx] for t, idx in by_task.items()},
        seen_need,
        grid=grid,
        rounds=bootstrap,
        min_second=-math.inf if accept_splits else AGREE_BONUS,
        max_second=None if rank_agreements else AGREE_BONUS,
    )
    gates: dict[str, Gate] = {}
    for t, idx in by_task.items():
        sub = [prep[i] for i in idx]
        tc = calibrate_classifier(sub, [op[i] for i in idx], seen_need)
        gates[t] = Gate(chosen[t][0], chosen[t][1], tc, cost_aware)
    # The fallback: each task scored by gates that never saw it (if there are other tasks).
    held_out: list[tuple[Sequence[Prepared], Sequence[float]]] = []
    strictest_cls = 0.0
    unseen_need = unseen_target + unseen_margin
    for t, idx in by_task.items():
        others = [i for i, p in enumerate(prep) if p.task != t]
        sub = [prep[i] for i in idx]
        if not others:
            strictest_cls = NEVER
            continue
        gp = _fit(prep, others, "xp", "y1", l2 * 30)
        held_out.append((sub, _second(prep, others, idx, l2)))
        strictest_cls = max(
            strictest_cls, calibrate_classifier(sub, [gp.prob(p.xp) for p in sub], unseen_need)
        )
    # An unknown task never takes a lone draft, nor one the other cheap model contradicts; its
    # scores are plain P(right), as a new task's cost scale is unknown. With a single training
    # task there is no evidence of how a gate transfers, so any agreement is accepted: the one
    # rule that needs no calibration.
    agree_p = calibrate_unseen(held_out, unseen_need, unseen_tolerance) if held_out else 0.0
    fallback = Gate(NEVER, AGREE_BONUS + agree_p, strictest_cls, cost_aware=False)
    all_i = list(range(len(prep)))
    return Router(
        reference=reference,
        target_quality=target_quality,
        ladder=ladder,
        strong=strong,
        first_gate=_fit(prep, all_i, "x1", "y1", l2),
        agree_gate=_fit(prep, [i for i in all_i if prep[i].agree], "x2", "y2", l2),
        split_gate=_fit(prep, [i for i in all_i if not prep[i].agree], "x2", "y2", l2),
        prompt_gate=_fit(prep, all_i, "xp", "y1", l2 * 30),
        gates=gates,
        fallback=fallback,
        meta={"rows": {t: len(i) for t, i in by_task.items()}, "folds": folds},
    )
