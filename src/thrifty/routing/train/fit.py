"""Training the router: learn its ladder, fit its gates, certify its thresholds.

The ladder (draft model, voter, strong model) is searched over every model the training data has
(``candidate_ladders``, then each candidate trained). Gate scores are out-of-fold (k folds over the
training rows); the lone-draft threshold is the cheapest rule whose quality over all seen tasks is
certified >= target_quality x the reference's at the stated confidence (``certify``); the median
choice of the old calibration (bootstrap medians, no certainty) is kept in the artifact's meta for
comparison. The fallback for unknown tasks is calibrated by scoring each training task with gates
fitted without it (see ``router`` for how the thresholds are used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from thrifty.errors import InvalidData
from thrifty.routing.train.certify import (
    PathPoint,
    certified_ratio,
    certify_path,
    projected_costs,
    prompts_needed,
    z_score,
)
from thrifty.routing.train.data import Row, id_bucket
from thrifty.routing.train.gate import Logistic, fit_logistic, parse, prompt_features, stage_features
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router, accept_score
from thrifty.routing.train.votes import ORDERINGS, choose_votes


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
    ok_alone: bool = False  # the strong model's answer when it is called first and alone
    cost_alone: float = 0.0
    # The third cheap opinion (asked when the two drafts agree), if the ladder has one.
    x3: tuple[float, ...] = ()
    agree3: bool = False  # all three cheap drafts give one answer
    cost3: float = 0.0  # all three cheap calls
    cost_esc3: float = 0.0  # all three cheap calls and the strong one


def prepare(
    row: Row, ladder: tuple[str, str], strong: str, reference: str, folds: int, third: str | None = None
) -> Prepared:
    """A row as the gates see it: parsed drafts, features, what each outcome would be and cost."""
    c0, c1, cs = row.calls[ladder[0]], row.calls[ladder[1]], row.calls[strong]
    d0, d1, ds = parse(c0.output, row.task), parse(c1.output, row.task), parse(cs.output, row.task)
    x3: tuple[float, ...] = ()
    agree3, cost3 = False, 0.0
    if third is not None:
        c2 = row.calls[third]
        d2 = parse(c2.output, row.task)
        x3 = tuple(stage_features([d0, d1, d2], row.prompt))
        agree3 = d0.key is not None and d0.key == d1.key == d2.key
        cost3 = float(c0.cost + c1.cost + c2.cost)
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
        ok_alone=cs.correct,
        cost_alone=float(cs.cost),
        x3=x3,
        agree3=agree3,
        cost3=cost3,
        cost_esc3=cost3 + float(cs.cost),
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


def pool_models(rows: Sequence[Row]) -> list[str]:
    """The models every row has a (priced) reply from: the pool a router may be built over."""
    if not rows:
        return []
    common = set(rows[0].calls)
    for r in rows[1:]:
        common &= set(r.calls)
    return sorted(common)


@dataclass(frozen=True, slots=True)
class LadderOption:
    ladder: tuple[str, str]
    strong: str
    cost: float  # the agreement cascade's cost on the training rows (no learned gate yet)
    quality: float
    third: str | None = None  # the third opinion asked when the two drafts agree


def pick_third(option: LadderOption, rows: Sequence[Row], reference: str, target: float) -> str | None:
    """The third cheap model for a ladder: the one whose plain three-way cascade (ask it when the
    two drafts agree, accept when all three agree, else the strong model) is cheapest at the
    target on the training rows, else the best such cascade; None if no model is cheap enough or
    agrees often enough to save anything."""
    import numpy as np

    a, b = option.ladder
    strong = option.strong
    every = pool_models(rows)
    if any(m not in every for m in (a, b, strong, reference)):
        return None  # training names what is missing
    pool = [m for m in every if m not in (a, b, strong, reference)]
    cost = {m: np.array([float(r.calls[m].cost) for r in rows]) for m in [*pool, a, b, strong]}
    ref_q = sum(r.calls[reference].correct for r in rows)
    ka, kb = [r.calls[a].answer for r in rows], [r.calls[b].answer for r in rows]
    pair = np.array([x is not None and x == y for x, y in zip(ka, kb, strict=True)])
    right_a = np.array([r.calls[a].correct for r in rows], dtype=float)
    right_s = np.array([r.calls[strong].correct for r in rows], dtype=float)
    scored: list[tuple[float, float, str]] = []
    for m in pool:
        if cost[m].sum() >= 0.25 * cost[strong].sum():
            continue  # a third opinion that costs a quarter of the strong call saves little
        all3 = pair & np.array([r.calls[m].answer == x for r, x in zip(rows, ka, strict=True)])
        q = float(np.where(all3, right_a, right_s).sum())
        c = float((cost[a] + cost[b] + cost[m] * pair + cost[strong] * ~all3).sum())
        scored.append((q, c, m))
    # A third opinion is worth asking only if it saves on what it replaces: escalating every
    # agreement the gate is unsure of (a model that never agrees with the pair only adds its cost).
    escalate_all = float((cost[a] + cost[b] + cost[strong]).sum())
    scored = [t for t in scored if t[1] < escalate_all]
    if not scored:
        return None
    feasible = [t for t in scored if t[0] >= target * ref_q]
    return min(feasible, key=lambda t: t[1])[2] if feasible else max(scored, key=lambda t: (t[0], -t[1]))[2]


def candidate_ladders(rows: Sequence[Row], reference: str, target: float, limit: int) -> list[LadderOption]:
    """Ladders worth training, cheapest first: (draft, voter) -> strong, ranked by the plain
    agreement cascade (accept when the two cheap answers agree, else call the strong model) on the
    training rows. The learned gates only add cheaper acceptances on top, so a ladder whose plain
    cascade misses the target by much is not worth the folds. Strong candidates: the reference
    and any cheaper model at least as good as it on these rows."""
    import itertools

    import numpy as np

    pool = pool_models(rows)
    if reference not in pool:
        raise InvalidData(f"every training row needs a reply from the reference model {reference!r}")
    right = {m: np.array([r.calls[m].correct for r in rows], dtype=float) for m in pool}
    cost = {m: np.array([float(r.calls[m].cost) for r in rows]) for m in pool}
    keys = {m: [r.calls[m].answer for r in rows] for m in pool}
    ref_q, ref_c = right[reference].sum(), cost[reference].sum()
    strongs = [reference] + [
        m for m in pool if m != reference and right[m].sum() >= ref_q and cost[m].sum() < ref_c
    ]
    options: list[LadderOption] = []
    for strong in strongs:
        for a, b in itertools.permutations([m for m in pool if m != strong], 2):
            if cost[a].sum() + cost[b].sum() >= 0.5 * cost[strong].sum():
                continue  # two cheap calls that cost half the strong one cannot save much
            agree = np.array([x is not None and x == y for x, y in zip(keys[a], keys[b], strict=True)])
            q = float(np.where(agree, right[a], right[strong]).sum())
            c = float((cost[a] + cost[b]).sum() + cost[strong][~agree].sum())
            options.append(LadderOption((a, b), strong, c, q))
    if not options:
        raise InvalidData(
            "no two models in the training data are cheap enough next to a strong one to cascade; "
            f"the pool is {', '.join(pool)}"
        )
    feasible = sorted((o for o in options if o.quality >= target * ref_q), key=lambda o: o.cost)
    ranked = (feasible or sorted(options, key=lambda o: -o.quality))[:limit]
    if all(o.strong != reference for o in ranked):
        # A strong model other than the reference is only as good as it on these rows; keep the
        # cheapest ladder that ends on the reference itself, whose promise can always be certified.
        own = [o for o in (feasible or options) if o.strong == reference]
        ranked = [*ranked[: limit - 1], min(own, key=lambda o: o.cost)] if own else ranked
    return ranked


@dataclass(frozen=True, slots=True)
class Calibrated:
    """One ladder trained and certified on out-of-fold scores."""

    router: Router
    rel_cost: float  # out-of-fold cost of the certified rule, relative to the reference
    bound: float  # certified quality ratio (lower confidence bound), relative to the reference
    certified: bool  # whether the bound reaches the target


def train(
    rows: Sequence[Row],
    *,
    reference: str = "gpt-4o-2024-08-06",
    target_quality: float = 0.99,
    confidence: float = 0.95,
    unseen_target: float = 1.0,
    unseen_margin: float = 0.01,
    unseen_tolerance: float = 0.02,
    ladder: tuple[str, str] | None = None,
    strong: str | None = None,
    candidates: int = 3,
    folds: int = 5,
    l2: float = 10.0,
    cost_aware: bool = True,
    grid: int = 60,
    bootstrap: int = 30,
    third: str | None = None,
    ask_third: bool = True,
    votes: bool | None = None,
    vote_share: float = 0.5,
    vote_ordering: str = "same",
) -> Router:
    """Learn the ladder and fit its gates on all rows; certify thresholds on out-of-fold scores.

    Without `ladder`, the `candidates` cheapest plain agreement cascades over the pool are each
    trained and certified, and the one whose certified rule is cheapest wins; each is certified at
    1 - (1 - confidence) / candidates, so that picking the best of them keeps the stated confidence.
    With `ask_third`, each ladder gets a third opinion (`third`, or ``pick_third``'s choice).
    With `votes` (default: when no `ladder` is given), per-task vote cascades
    (``votes.choose_votes``) compete too, at 1 - (1 - confidence) x `vote_share`; the ladders
    share the rest of the error budget. `vote_ordering` says which rows order their path
    ("same", "split", "crossfit": ``votes.choose_votes``)."""
    if not rows:
        raise InvalidData("no training rows")
    z_score(confidence)  # a bad confidence is refused before any work
    if vote_ordering not in ORDERINGS:
        raise InvalidData(f"vote ordering must be one of {', '.join(ORDERINGS)}, not {vote_ordering!r}")
    if ladder is not None:
        options = [LadderOption(ladder, strong or reference, 0.0, 0.0)]
    else:
        options = candidate_ladders(rows, reference, target_quality, candidates)
    if ask_third:
        options = [replace(o, third=third or pick_third(o, rows, reference, target_quality)) for o in options]
    # One more candidate: the plain agreement rules (no learned score) on the first ladder; and,
    # with `votes`, per-task vote cascades over the pool's cheap models. The error budget
    # 1 - confidence is split in advance (weighted Bonferroni): `vote_share` of it to the vote
    # cascades, the rest evenly over the ladders, so picking the cheapest keeps the confidence.
    alpha = 1.0 - confidence
    votes = ladder is None if votes is None else votes
    learned_alpha = alpha * (1.0 - vote_share) if votes else alpha
    level = 1.0 - learned_alpha / (len(options) + 1)
    fits = [
        _train_ladder(
            rows,
            o.ladder,
            o.strong,
            o.third,
            reference=reference,
            target_quality=target_quality,
            confidence=level,
            unseen_target=unseen_target,
            unseen_margin=unseen_margin,
            unseen_tolerance=unseen_tolerance,
            folds=folds,
            l2=l2,
            cost_aware=cost_aware,
            grid=grid,
            bootstrap=bootstrap,
        )
        for o in options
    ]
    fits.append(_plain(rows, fits[0].router, target_quality, level, folds))
    if votes:
        # The vote cascades end on the reference; the router under them (its unseen-task fallback
        # and classifier) is the best certified ladder that ends there too: a final model that is
        # only as good as the reference on the seen tasks may be far worse on an unseen one.
        own = [f for f in fits if f.router.strong == reference] or fits
        base = min(own, key=lambda f: (not f.certified, f.rel_cost if f.certified else -f.bound))
        fits.append(_votes(rows, base.router, target_quality, 1.0 - alpha * vote_share, vote_ordering))
    best = min(fits, key=lambda f: (not f.certified, f.rel_cost if f.certified else -f.bound))
    searched = [
        {
            "rule": f.router.meta["certificate"].get("rule", "learned"),
            "ladder": list(f.router.ladder),
            "third": f.router.third,
            "strong": f.router.strong,
            "rel_cost": f.rel_cost,
            "bound": f.bound,
        }
        for f in fits
    ]
    meta = dict(best.router.meta)
    # The promise is at the confidence asked for; each candidate was tested at `level`.
    meta["certificate"] = {**meta["certificate"], "confidence": confidence, "per_ladder_level": level}
    meta["ladders_searched"] = searched
    meta["pool"] = pool_models(rows)
    return replace(best.router, meta=meta)


def _train_ladder(
    rows: Sequence[Row],
    ladder: tuple[str, str],
    strong: str,
    third: str | None,
    *,
    reference: str,
    target_quality: float,
    confidence: float,
    unseen_target: float,
    unseen_margin: float,
    unseen_tolerance: float,
    folds: int,
    l2: float,
    cost_aware: bool,
    grid: int,
    bootstrap: int,
) -> Calibrated:
    needed = (*ladder, strong, reference, *([third] if third else []))
    for row in rows:
        lacking = [m for m in needed if m not in row.calls]
        if lacking:
            raise InvalidData(
                f"training row {row.id!r} has no reply from {', '.join(lacking)}; every row needs "
                f"the cascade's models ({', '.join(dict.fromkeys(needed))})"
            )
    prep = [prepare(r, ladder, strong, reference, folds, third) for r in rows]
    tasks = sorted({p.task for p in prep})
    by_task = {t: [i for i, p in enumerate(prep) if p.task == t] for t in tasks}

    def first_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            accept_score(p, prep[i].prompt_chars, prep[i].draft_chars, cost_aware=aware)
            for i, p in zip(idx, ps, strict=True)
        ]

    every = range(len(prep))
    o1 = first_scores(every, oof(prep, "x1", "y1", folds, l2))
    op = oof(prep, "xp", "y1", folds, l2 * 30)
    # The certified rule: one path over every seen task's rows (cost-aware scores are comparable
    # across tasks), as the promise is quality over the mixture of seen tasks.
    o2p = oof_second(prep, folds, l2)
    o2_agree = [
        s if prep[i].agree else -math.inf for i, s in zip(every, first_scores(every, o2p), strict=True)
    ]
    # The third opinion: P(right) of an answer all three cheap drafts give, fitted on the rows where
    # the two drafts agree (the only ones that ask the third model), out of fold.
    agreeing = [i for i in every if prep[i].agree]
    o3 = [-math.inf] * len(prep)
    if third is not None:
        o3p = _oof_subset(prep, agreeing, "x3", "y2", folds, l2)
        for i, s in zip(agreeing, first_scores(agreeing, [o3p[i] for i in agreeing]), strict=True):
            o3[i] = s if prep[i].agree3 else -math.inf
    third_stage = (
        (
            [p.agree for p in prep],
            o3,
            [p.ok2 for p in prep],
            [p.cost3 for p in prep],
            [p.cost_esc3 for p in prep],
        )
        if third is not None
        else None
    )
    points, chosen = certify_path(
        o1,
        o2_agree,
        [p.ok1 for p in prep],
        [p.ok2 for p in prep],
        [p.ok_strong for p in prep],
        [p.ok_alone for p in prep],
        [p.ok_ref for p in prep],
        [p.cost1 for p in prep],
        [p.cost2 for p in prep],
        [p.cost_strong for p in prep],
        [p.cost_alone for p in prep],
        target=target_quality,
        confidence=confidence,
        third=third_stage,
    )
    point = points[max(chosen, 0)]
    first = point.threshold if point.step >= 1 else NEVER
    # Agreements need the same score as lone drafts (AGREE_BONUS puts them in their own band).
    second = AGREE_BONUS + point.threshold if point.step >= 1 else NEVER
    n, ref_q = len(prep), float(sum(p.ok_ref for p in prep))
    ref_c = float(sum(p.cost_ref for p in prep)) or 1.0
    bound = certified_ratio(point.quality, point.both, ref_q, n, z_score(confidence))
    # What the promise costs in labels: the cheapest rule on the same path that measures the target
    # out of fold, how many prompts its certificate would need, and what 2x, 4x, 10x the labels
    # would let the path certify (projected from these rows' variance).
    z = z_score(confidence)
    reaching = [p for p in points if p.quality >= target_quality * ref_q - 1e-9]
    cheapest_point = min(reaching, key=lambda p: p.cost) if reaching else points[0]
    projection = [
        {"prompts": round(m), "rel_cost": c / ref_c, "quality": q / ref_q if ref_q else 0.0}
        for m, c, q in projected_costs(points, ref_q, n, target_quality, z, (2.0, 4.0, 10.0))
    ]
    # The median choice, for comparison: per-task thresholds, each the median over bootstrap
    # resamples of the cheapest pair reaching the target on the point estimate (no certainty).
    o2 = [
        s + (AGREE_BONUS if prep[i].agree else 0.0)
        for i, s in zip(every, first_scores(every, o2p), strict=True)
    ]
    median = calibrate_bagged(
        {t: [prep[i] for i in idx] for t, idx in by_task.items()},
        {t: [o1[i] for i in idx] for t, idx in by_task.items()},
        {t: [o2[i] for i in idx] for t, idx in by_task.items()},
        target_quality,
        grid=grid,
        rounds=bootstrap,
        min_second=AGREE_BONUS,
        max_second=AGREE_BONUS,
    )
    gates: dict[str, Gate] = {}
    escalation: dict[str, float] = {}
    for t, idx in by_task.items():
        sub = [prep[i] for i in idx]
        tc = calibrate_classifier(sub, [op[i] for i in idx], target_quality)
        gates[t] = Gate(first, second, tc, cost_aware, third=first if third is not None else NEVER)
        escalation[t] = _escalation_rate(
            [max(o1[i], o2_agree[i], o3[i]) for i in idx], point.threshold if point.step >= 1 else None
        )
    fallback, held_out_tasks = _fallback(
        prep, by_task, unseen_target + unseen_margin, unseen_tolerance, l2, third is not None
    )
    all_i = list(range(len(prep)))
    router = Router(
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
        third=third,
        third_gate=_fit(prep, agreeing, "x3", "y2", l2) if third is not None and agreeing else None,
        meta={
            "rows": {t: len(i) for t, i in by_task.items()},
            "folds": folds,
            "certificate": {
                "confidence": confidence,
                "target": target_quality,
                "certified": chosen >= 0,
                "bound": bound,
                "quality": point.quality / ref_q if ref_q else 0.0,
                "rel_cost": point.cost / ref_c,
                "prompts": n,
                "uncertified_path_rule": {
                    "rel_cost": cheapest_point.cost / ref_c,
                    "quality": cheapest_point.quality / ref_q if ref_q else 0.0,
                    "prompts_needed": _finite(prompts_needed(cheapest_point, ref_q, n, target_quality, z)),
                },
                "projection": projection,
            },
            # What each seen task escalated out of fold under the certified rule: the drift watch's
            # baseline (a live rate far from it means the traffic no longer looks like the labels).
            "escalation_rate": escalation,
            "median_gates": {
                t: Gate(m[0], m[1], gates[t].classifier, cost_aware).to_json() for t, m in median.items()
            },
            "unseen_calibrated_on": held_out_tasks,
        },
    )
    return Calibrated(router, point.cost / ref_c, bound, chosen >= 0 and bound >= target_quality - 1e-9)


def _plain(rows: Sequence[Row], learned: Router, target: float, confidence: float, folds: int) -> Calibrated:
    """The plain agreement rules on a learned ladder, certified by fixed-sequence testing in the
    order everything to the strong model, then (with a third opinion) any three-way agreement,
    then any agreement of the two drafts. No learned score: a sure pair that is wrong together
    looks like a right one, but where agreements are right the rule is cheap and its variance low."""
    import numpy as np

    from thrifty.routing.train.certify import PathPoint, cheapest_certified, lower_bounds

    prep = [prepare(r, learned.ladder, learned.strong, learned.reference, folds, learned.third) for r in rows]

    def col(name: str) -> Any:
        return np.array([getattr(p, name) for p in prep], dtype=float)

    agree, agree3, ref = col("agree") > 0, col("agree3") > 0, col("ok_ref")
    ok2, oks, c2, cs = col("ok2"), col("ok_strong"), col("cost2"), col("cost_strong")
    alone = ("everything to the strong model", col("ok_alone"), col("cost_alone"))
    rules: list[tuple[str, Any, Any]] = [alone]
    if learned.third is not None:
        ok3 = np.where(agree3, ok2, oks)
        c3 = np.where(agree3, col("cost3"), np.where(agree, col("cost_esc3"), cs))
        rules.append(("plain three-way agreement", ok3, c3))
    rules.append(("plain agreement", np.where(agree, ok2, oks), np.where(agree, c2, cs)))
    z, n, r = z_score(confidence), len(prep), float(ref.sum())
    points = []
    for i, (_, ok, cost) in enumerate(rules):
        q, qr = float(ok.sum()), float((ok * ref).sum())
        low = float(lower_bounds([q], [qr], r, n, target, z)[0])
        points.append(PathPoint(i, math.inf, q, qr, float(cost.sum()), low))
    chosen = cheapest_certified(points)
    name = rules[max(chosen, 0)][0]
    point = points[max(chosen, 0)]
    ref_c = float(col("cost_ref").sum()) or 1.0
    accepted = {
        "everything to the strong model": np.zeros(n, dtype=bool),
        "plain three-way agreement": agree3,
        "plain agreement": agree,
    }[name]
    tasks = {t: [i for i, p in enumerate(prep) if p.task == t] for t in learned.gates}
    bound = certified_ratio(point.quality, point.both, r, n, z)
    cert = {
        **learned.meta["certificate"],
        "rule": name,
        "confidence": confidence,
        "certified": chosen >= 0,
        "bound": bound,
        "quality": point.quality / r if r else 0.0,
        "rel_cost": point.cost / ref_c,
        "projection": [],
    }
    meta = {
        **learned.meta,
        "certificate": cert,
        "escalation_rate": {t: float(1.0 - accepted[idx].mean()) if idx else 0.0 for t, idx in tasks.items()},
    }
    router = replace(learned, gates={t: _plain_gate(name, g) for t, g in learned.gates.items()}, meta=meta)
    return Calibrated(router, point.cost / ref_c, bound, chosen >= 0 and bound >= target - 1e-9)


def _votes(
    rows: Sequence[Row], learned: Router, target: float, confidence: float, ordering: str = "same"
) -> Calibrated:
    """Per-task vote cascades over the pool's cheap models, certified along a label-free path
    (``votes``). The learned router's gates stay for its classifier; the cascade follows the votes."""
    choice = choose_votes(
        rows, reference=learned.reference, target=target, confidence=confidence, ordering=ordering
    )
    z = z_score(confidence)
    loose = choice.path[choice.uncertified]
    ref_q = float(sum(r.calls[learned.reference].correct for r in rows))
    ref_c = float(sum(r.calls[learned.reference].cost for r in rows)) or 1.0
    need = prompts_needed(
        PathPoint(0, math.inf, loose.quality, loose.both, loose.cost, 0.0), ref_q, len(rows), target, z
    )
    cert = {
        **learned.meta["certificate"],
        "rule": "vote cascades",
        "confidence": confidence,
        "certified": choice.certified,
        "bound": choice.bound,
        "quality": choice.rel_quality,
        "rel_cost": choice.rel_cost,
        "uncertified_path_rule": {
            "rel_cost": loose.cost / ref_c,
            "quality": loose.quality / ref_q if ref_q else 0.0,
            "prompts_needed": _finite(need),
        },
        "projection": [],
    }
    meta = {
        **learned.meta,
        "certificate": cert,
        "escalation_rate": choice.escalation,
        "votes": choice.to_json(),
    }
    policies = choice.policies() if choice.certified else {}
    router = replace(learned, votes=policies, meta=meta)
    if not choice.certified:  # not even all to the strong model: the learned router says so itself
        router = replace(
            router,
            gates={t: replace(g, first=NEVER, second=NEVER, third=NEVER) for t, g in learned.gates.items()},
        )
    return Calibrated(
        router, choice.rel_cost, choice.bound, choice.certified and choice.bound >= target - 1e-9
    )


def _plain_gate(rule: str, gate: Gate) -> Gate:
    """A seen task's gate under a plain rule: no lone draft, and any (three-way) agreement."""
    if rule == "plain three-way agreement":  # scores are positive: a bar of 0 takes any
        return replace(gate, first=NEVER, second=NEVER, third=0.0)
    if rule == "plain agreement":
        return replace(gate, first=NEVER, second=AGREE_BONUS, third=NEVER)
    return replace(gate, first=NEVER, second=NEVER, third=NEVER)


def _finite(v: float) -> float | None:
    """JSON has no infinity: None stands for "no amount of data"."""
    return round(v) if math.isfinite(v) else None


def _escalation_rate(best: Sequence[float], threshold: float | None) -> float:
    """The share of rows the certified rule sends to the strong model (all, when threshold is None):
    those whose best score over the stages they reach is below the threshold."""
    if not best:
        return 0.0
    if threshold is None:
        return 1.0
    return sum(1 for b in best if b < threshold) / len(best)


def _oof_subset(
    rows: Sequence[Prepared], idx: Sequence[int], xs: str, ys: str, folds: int, l2: float
) -> dict[int, float]:
    """Out-of-fold P(right) of the rows `idx`, each scored by a gate fitted on the others of `idx`
    outside its fold."""
    out: dict[int, float] = {}
    for f in range(folds):
        train_i = [i for i in idx if rows[i].fold != f]
        test_i = [i for i in idx if rows[i].fold == f]
        if not test_i or not train_i:
            continue
        model = _fit(rows, train_i, xs, ys, l2)
        out.update({i: model.prob(getattr(rows[i], xs)) for i in test_i})
    return out


def _fallback(
    prep: Sequence[Prepared],
    by_task: dict[str, list[int]],
    need: float,
    tolerance: float,
    l2: float,
    has_third: bool,
) -> tuple[Gate, list[str]]:
    """The gate for a task the router was not trained on: each training task scored by gates
    that never saw it (if there are other tasks)."""
    held_out: list[HeldOut] = []
    strictest_cls = 0.0
    names: list[str] = []
    for t, idx in by_task.items():
        others = [i for i, p in enumerate(prep) if p.task != t]
        sub = [prep[i] for i in idx]
        if not others:
            strictest_cls = NEVER
            continue
        names.append(t)
        gp = _fit(prep, others, "xp", "y1", l2 * 30)
        p3: list[float] | None = None
        if has_third:
            g3 = _fit(prep, [i for i in others if prep[i].agree], "x3", "y2", l2)
            p3 = [g3.prob(p.x3) for p in sub]
        held_out.append(HeldOut(sub, _second(prep, others, idx, l2), p3))
        strictest_cls = max(strictest_cls, calibrate_classifier(sub, [gp.prob(p.xp) for p in sub], need))
    # An unknown task never takes a lone draft, nor one the other cheap model contradicts; its
    # scores are plain P(right), as a new task's cost scale is unknown. With a single training
    # task there is no evidence of how a gate transfers, so the rule is one that needs no
    # calibration: any three-way agreement of the cheap models if there is a third opinion (cheap
    # models that agree in pairs are often wrong together on a task unlike the training one), else
    # any agreement.
    if not held_out:
        if has_third:
            return Gate(NEVER, NEVER, strictest_cls, cost_aware=False, third=0.0), names
        return Gate(NEVER, AGREE_BONUS, strictest_cls, cost_aware=False), names
    pair_p, third_p = calibrate_unseen(held_out, need, tolerance)
    second = NEVER if math.isinf(pair_p) else AGREE_BONUS + pair_p
    return Gate(NEVER, second, strictest_cls, cost_aware=False, third=third_p), names
