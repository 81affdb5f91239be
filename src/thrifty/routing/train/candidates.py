"""The candidates with no learned score, and the result every candidate returns: plain agreement
rules on a learned ladder, and per-task vote cascades (``votes``), each certified along its own
fixed path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from thrifty.routing.train.certify import (
    PathPoint,
    certified_ratio,
    prompts_needed,
    z_score,
)
from thrifty.routing.train.data import Row
from thrifty.routing.train.oof import prepare
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router
from thrifty.routing.train.votes import choose_votes


@dataclass(frozen=True, slots=True)
class Calibrated:
    """One ladder trained and certified on out-of-fold scores."""

    router: Router
    rel_cost: float  # out-of-fold cost of the certified rule, relative to the reference
    bound: float  # certified quality ratio (lower confidence bound), relative to the reference
    certified: bool  # whether the bound reaches the target


def plain_rules(
    rows: Sequence[Row], learned: Router, target: float, confidence: float, folds: int
) -> Calibrated:
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


def vote_cascades(
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
            "prompts_needed": finite_or_none(need),
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


def finite_or_none(v: float) -> float | None:
    """JSON has no infinity: None stands for "no amount of data"."""
    return round(v) if math.isfinite(v) else None
