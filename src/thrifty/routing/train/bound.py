"""Hindsight bounds: the cheapest any of our routing rules could be on a set of labelled rows.

A target such as "99% of the reference's quality at 25% of its cost" may simply be out of reach
of the signals a router has (cheap drafts and whether they agree). This module answers that with
the test answers in hand, so the number is a bound, not a result: it scores the rows with gates
fitted out-of-fold, then lets every task pick its threshold pair *after* seeing which answers were
right, and also tries every vote-counting cascade over the cheap models. If even that cannot reach
a target, no calibration of these gates can, and the gap is in the data's signals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.errors import InvalidData
from thrifty.routing.train.calibrate import Point, calibrate_joint, frontier
from thrifty.routing.train.data import Row
from thrifty.routing.train.ladders import candidate_ladders, pool_models
from thrifty.routing.train.metrics import auc
from thrifty.routing.train.oof import oof, oof_second, prepare
from thrifty.routing.train.policy import vote_policies
from thrifty.routing.train.router import AGREE_BONUS
from thrifty.routing.train.votes import cheap_models, family_of, replay_votes


@dataclass(frozen=True, slots=True)
class BoundRow:
    """The cheapest hindsight choice for one target: relative quality and cost over all rows,
    and per task (quality, cost) relative to the reference on that task."""

    target: float
    rel_quality: float
    rel_cost: float
    per_task: dict[str, tuple[float, float]]
    reachable: bool


@dataclass(frozen=True, slots=True)
class Bound:
    rows: list[BoundRow]
    split_auc: dict[str, float]  # per task: how well the gate ranks which side of a split is right
    agree_auc: dict[str, float]  # per task: how well it ranks which agreements are right
    # per task alone: target -> the least relative cost reaching it on that task (None: unreachable)
    task_alone: dict[str, dict[float, float | None]]
    ladder: tuple[str, str] = ("", "")  # the gates' ladder
    cheap: tuple[str, ...] = ()  # the models the vote cascades draw from


def hindsight_bound(
    rows: Sequence[Row],
    targets: Sequence[float] = (0.98, 0.99, 0.995, 1.0),
    *,
    reference: str = "gpt-4o-2024-08-06",
    ladder: tuple[str, str] | None = None,
    cheap: Sequence[str] | None = None,
    folds: int = 5,
    l2: float = 10.0,
    grid: int = 120,
) -> Bound:
    """For each target, the least cost over the mixture of tasks, each task choosing its rule with
    hindsight among learned-gate threshold pairs (lone draft, agreements and splits all allowed)
    and every vote cascade.

    Any pool: without `ladder`, the gates are fitted on the cheapest plain agreement ladder over the
    rows' models; without `cheap`, the votes are over the models of the cheapest such ladders and
    then the cheapest of the pool, four in all (every order of four is 424 cascades; five would be ~3,400)."""
    options = candidate_ladders(rows, reference, min(targets), 4) if ladder is None or cheap is None else []
    if ladder is None:
        ladder = options[0].ladder
    if cheap is None:
        # The models of the cheapest plain agreement ladders first (the router's own candidates),
        # then the cheapest others of the pool.
        pool = [m for m in pool_models(rows) if m != reference]
        by_cost = sorted(pool, key=lambda m: sum(r.calls[m].cost for r in rows))
        cheap = list(dict.fromkeys([*ladder, *(m for o in options for m in o.ladder), *by_cost]))[:4]
    lacking = sorted({m for r in rows for m in (*ladder, reference) if m not in r.calls})
    if lacking:
        raise InvalidData(f"rows lack replies from: {', '.join(lacking)}")
    cheap = [m for m in cheap if all(m in r.calls for r in rows)]  # vote with what every row has
    prep = [prepare(r, ladder, reference, reference, folds) for r in rows]
    p1 = oof(prep, "x1", "y1", folds, l2)
    p2 = oof_second(prep, folds, l2)
    tasks = sorted({p.task for p in prep})
    fronts: dict[str, list[Point]] = {}
    ref_q: dict[str, float] = {}
    ref_c: dict[str, float] = {}
    split_auc: dict[str, float] = {}
    agree_auc: dict[str, float] = {}
    policies = vote_policies(cheap, reference)
    # The family the trainer's vote cascades are chosen from (at most three of the pool's cheap
    # models), so that the bound covers every rule the router can ship.
    policies += family_of(cheap_models(rows, reference), reference)
    for task in tasks:
        idx = [i for i, p in enumerate(prep) if p.task == task]
        sub = [prep[i] for i in idx]
        s2 = [p2[i] + (AGREE_BONUS if prep[i].agree else 0.0) for i in idx]
        points = frontier(sub, [p1[i] for i in idx], s2, first=True, grid=grid)
        task_rows = [r for r in rows if r.task == task]
        for policy in policies:
            runs = replay_votes(task_rows, policy)
            points.append(Point(float(runs.cost.sum()), float(runs.ok.sum()), 0, 0))
        fronts[task] = points
        ref_q[task] = float(sum(p.ok_ref for p in sub))
        ref_c[task] = sum(p.cost_ref for p in sub)
        split = [i for i in idx if not prep[i].agree]
        agree = [i for i in idx if prep[i].agree]
        split_auc[task] = auc([p2[i] for i in split], [prep[i].ok2 for i in split])
        agree_auc[task] = auc([p2[i] for i in agree], [prep[i].ok2 for i in agree])
    task_alone = {
        t: {target: _cheapest_at(fronts[t], target * ref_q[t], ref_c[t]) for target in targets} for t in tasks
    }
    total_q, total_c = sum(ref_q.values()), sum(ref_c.values())
    out: list[BoundRow] = []
    for target in targets:
        pick = calibrate_joint(fronts, target * total_q)
        quality = sum(p.quality for p in pick.values()) / total_q
        out.append(
            BoundRow(
                target=target,
                rel_quality=quality,
                rel_cost=sum(p.cost for p in pick.values()) / total_c,
                per_task={t: (p.quality / ref_q[t], p.cost / ref_c[t]) for t, p in pick.items()},
                reachable=quality >= target - 1e-9,
            )
        )
    return Bound(out, split_auc, agree_auc, task_alone, ladder, tuple(cheap))


def _cheapest_at(points: Sequence[Point], need: float, ref_cost: float) -> float | None:
    costs = [p.cost for p in points if p.quality >= need - 1e-9]
    return min(costs) / ref_cost if costs else None
