"""Benchmark metrics: accuracy, cost, quality and cost relative to a reference model, and
RouteLLM's PGR / APGR / CPT for a weak/strong pair (Ong et al., 2024, "RouteLLM")."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.routing.train.policy import Outcome


@dataclass(frozen=True, slots=True)
class Summary:
    strategy: str
    n: int
    accuracy: Decimal
    cost_usd: Decimal
    rel_quality: Decimal
    rel_cost: Decimal
    escalation_rate: Decimal

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "accuracy": float(self.accuracy),
            "cost_usd": float(self.cost_usd),
            "rel_quality": float(self.rel_quality),
            "rel_cost": float(self.rel_cost),
            "escalation_rate": float(self.escalation_rate),
        }


def _ratio(a: Decimal, b: Decimal) -> Decimal:
    return a / b if b else Decimal(0)


def summarise(strategy: str, outcomes: Sequence[Outcome], reference: Sequence[Outcome]) -> Summary:
    n = len(outcomes)
    correct = Decimal(sum(o.correct for o in outcomes))
    cost = sum((o.cost for o in outcomes), Decimal(0))
    ref_correct = Decimal(sum(o.correct for o in reference))
    ref_cost = sum((o.cost for o in reference), Decimal(0))
    return Summary(
        strategy=strategy,
        n=n,
        accuracy=_ratio(correct, Decimal(n)),
        cost_usd=cost,
        rel_quality=_ratio(correct, ref_correct),
        rel_cost=_ratio(cost, ref_cost),
        escalation_rate=_ratio(Decimal(sum(o.escalated for o in outcomes)), Decimal(n)),
    )


def random_at_cost(
    strategy: str,
    target_cost: Decimal,
    weak: Sequence[Outcome],
    strong: Sequence[Outcome],
    reference: Sequence[Outcome],
) -> Summary:
    """A router that calls `strong` with probability p else `weak`, p chosen so that its expected
    cost equals `target_cost`; accuracy and cost are the exact expectations, not one noisy draw."""
    w_cost = sum((o.cost for o in weak), Decimal(0))
    s_cost = sum((o.cost for o in strong), Decimal(0))
    p = _ratio(target_cost - w_cost, s_cost - w_cost)
    p = min(Decimal(1), max(Decimal(0), p))
    n = Decimal(len(weak))
    w_acc = _ratio(Decimal(sum(o.correct for o in weak)), n)
    s_acc = _ratio(Decimal(sum(o.correct for o in strong)), n)
    acc = (1 - p) * w_acc + p * s_acc
    cost = (1 - p) * w_cost + p * s_cost
    ref_correct = Decimal(sum(o.correct for o in reference))
    ref_cost = sum((o.cost for o in reference), Decimal(0))
    return Summary(strategy, len(weak), acc, cost, _ratio(acc * n, ref_correct), _ratio(cost, ref_cost), p)


@dataclass(frozen=True, slots=True)
class PairMetrics:
    weak_acc: float
    strong_acc: float
    pgr: dict[float, float]  # strong-call rate -> PGR
    apgr: float
    cpt50: float | None
    cpt80: float | None


def pgr_curve(
    scores: Sequence[float], weak_correct: Sequence[bool], strong_correct: Sequence[bool], steps: int = 100
) -> list[tuple[float, float]]:
    """PGR at strong-call rates 0, 1/steps, ..., 1: the router sends its `rate` highest-scoring
    queries (score = how much it wants the strong model) to strong and the rest to weak."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep data order
    weak_acc = sum(weak_correct) / n
    strong_acc = sum(strong_correct) / n
    gap = strong_acc - weak_acc
    # Prefix sums of the gain from switching each query (in rank order) from weak to strong.
    gain = [0]
    for i in order:
        gain.append(gain[-1] + int(strong_correct[i]) - int(weak_correct[i]))
    curve = []
    for s in range(steps + 1):
        rate = s / steps
        k = round(rate * n)
        acc = weak_acc + gain[k] / n
        curve.append((rate, (acc - weak_acc) / gap if gap else 0.0))
    return curve


def pair_metrics(
    scores: Sequence[float], weak_correct: Sequence[bool], strong_correct: Sequence[bool], steps: int = 100
) -> PairMetrics:
    curve = pgr_curve(scores, weak_correct, strong_correct, steps)
    # APGR: the area under PGR over strong-call rate in [0, 1], by the trapezoid rule.
    apgr = sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in itertools.pairwise(curve))

    def cpt(target: float) -> float | None:
        return next((rate for rate, pgr in curve if pgr >= target), None)

    n = len(scores)
    return PairMetrics(
        weak_acc=sum(weak_correct) / n,
        strong_acc=sum(strong_correct) / n,
        pgr={rate: p for rate, p in curve if round(rate * 100) % 10 == 0},
        apgr=apgr,
        cpt50=cpt(0.5),
        cpt80=cpt(0.8),
    )


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The area under the ROC curve: P(a random positive outscores a random negative), ties
    counting half (Mann-Whitney). NaN when either class is empty."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid_rank = (i + j) / 2 + 1  # ranks are 1-based; a tie shares the mean rank
        rank_sum += mid_rank * sum(1 for k in order[i : j + 1] if labels[k])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
