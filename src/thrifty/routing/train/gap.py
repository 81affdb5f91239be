"""Where the cost between the hindsight bound and the certified router goes.

On a train/test split, four costs on the test prompts and one on all prompts telescope from the
certified rule down to the bound `bench route-bound` prints:

- certified: the router as trained (its certified rule), replayed on the test prompts;
- uncertified: the same family's choice on the training prompts without the certainty (the vote
  path's cheapest rule that measures the target, or the learned gates' bootstrap-median
  thresholds), on the test prompts;
- family hindsight: the cheapest rule of the same family chosen *on the test prompts' answers*
  (vote cascades per task, merged over the mixture);
- bound, test prompts: the hindsight bound (learned-gate thresholds per task, splits and lone
  drafts allowed, and every vote cascade) on the test prompts;
- bound, all prompts: the same on train and test together (the number `route-bound` reports).

So certified - bound(all) = certification margin (certified - uncertified) + choosing from the
training sample (uncertified - family hindsight) + policy family (family hindsight - bound on
the test prompts) + the bound's own sample size (bound on the test half - bound on all: hindsight
over fewer prompts finds luckier rules). A rule chosen on the training half can land below the
target on the test half; each line carries its quality so that costs are read at their quality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from thrifty.routing.train.calibrate import Point, calibrate_joint
from thrifty.routing.train.data import Row
from thrifty.routing.train.policy import CascadePolicy, Outcome
from thrifty.routing.train.router import Gate, Router
from thrifty.routing.train.votes import cheap_models, family_of, replay_votes


@dataclass(frozen=True, slots=True)
class GapLine:
    name: str
    rel_quality: float | None
    rel_cost: float | None


@dataclass(frozen=True, slots=True)
class Gap:
    lines: list[GapLine]  # certified, uncertified, family hindsight, bound (test), bound (all)
    terms: dict[str, float | None]  # the four differences, in points of relative cost

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": [
                {"name": x.name, "rel_quality": x.rel_quality, "rel_cost": x.rel_cost} for x in self.lines
            ],
            "terms": self.terms,
        }


def family_hindsight(
    rows: Sequence[Row], policies: Sequence[CascadePolicy], reference: str, target: float
) -> tuple[float, float] | None:
    """(quality, cost) relative to the reference of the cheapest per-task choice of `policies`
    reaching `target` over the mixture of `rows`, chosen with the answers in hand."""
    tasks = sorted({r.task for r in rows})
    fronts: dict[str, list[Point]] = {}
    for t in tasks:
        sub = [r for r in rows if r.task == t]
        fronts[t] = []
        for p in policies:
            v = replay_votes(sub, p)
            fronts[t].append(Point(float(v.cost.sum()), float(v.ok.sum()), 0.0, 0.0))
    ref_q = float(sum(r.calls[reference].correct for r in rows))
    ref_c = float(sum(r.calls[reference].cost for r in rows)) or 1.0
    pick = calibrate_joint(fronts, target * ref_q)
    q = sum(p.quality for p in pick.values())
    if q < target * ref_q - 1e-9:
        return None
    return q / ref_q, sum(p.cost for p in pick.values()) / ref_c


def uncertified_router(router: Router) -> Router | None:
    """The trained family's choice without the certainty: the vote path's cheapest rule that
    measures the target, or the learned gates' median thresholds."""
    votes = router.meta.get("votes")
    if router.votes and votes:
        loose = {t: CascadePolicy.from_json(p) for t, p in votes["uncertified_policies"].items()}
        return replace(router, votes=loose)
    median = router.meta.get("median_gates")
    if not median:
        return None
    return replace(router, votes={}, gates={t: Gate.from_json(g) for t, g in median.items()})


def decompose(
    router: Router,
    train_rows: Sequence[Row],
    test_rows: Sequence[Row],
    *,
    reference: str,
    target: float,
    replay: Callable[[Router, Sequence[Row]], list[Outcome]],
    bound_cost: Callable[[Sequence[Row]], float | None],
) -> Gap:
    """The decomposition above; `replay` runs a router over rows (the benchmark's step loop) and
    `bound_cost` is the hindsight bound's least relative cost at `target` on some rows."""
    seen = [r for r in test_rows if router.known(r.task)]
    ref_q = float(sum(r.calls[reference].correct for r in seen)) or 1.0
    ref_c = float(sum(r.calls[reference].cost for r in seen)) or 1.0

    def measure(name: str, r: Router | None) -> GapLine:
        if r is None:
            return GapLine(name, None, None)
        runs = replay(r.with_strategy("cascade"), seen)
        return GapLine(name, sum(o.correct for o in runs) / ref_q, float(sum(o.cost for o in runs)) / ref_c)

    certified = measure("certified (as trained)", router)
    loose = measure("uncertified choice, same family", uncertified_router(router))
    if router.votes:
        cheap = router.meta.get("votes", {}).get("cheap") or cheap_models(train_rows, reference)
        hind = family_hindsight(seen, family_of(cheap, router.strong), reference, target)
    else:
        hind = None  # the learned gates' hindsight is part of the bound itself
    family = GapLine("same family, hindsight on the test prompts", *(hind or (None, None)))
    bound_test = GapLine("hindsight bound, test prompts", None, bound_cost(seen))
    every = [*train_rows, *seen]
    bound_all = GapLine("hindsight bound, all prompts", None, bound_cost(every))
    lines = [certified, loose, family, bound_test, bound_all]

    def diff(a: GapLine, b: GapLine) -> float | None:
        return None if a.rel_cost is None or b.rel_cost is None else a.rel_cost - b.rel_cost

    terms = {
        "certification margin": diff(certified, loose),
        "choosing on the training sample": diff(loose, family),
        "policy family": diff(family, bound_test),
        "bound's sample size": diff(bound_test, bound_all),
        "choosing and family together": diff(loose, bound_test),
        "total": diff(certified, bound_all),
    }
    return Gap(lines, terms)
