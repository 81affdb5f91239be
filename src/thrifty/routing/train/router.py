"""The trained router: a calibrated agreement cascade per known task, a conservative fallback for
tasks never seen in training, and a scorer that ranks prompts for the weak/strong pair.

Calibration picks, on a part of the training data held back from everything else, the cheapest
cascade whose quality is at least `target_quality` x the reference model's. Tasks not in the
artifact get the fallback: a cascade that met the target with a margin on *every* training task and
demands more agreement, so an unfamiliar task escalates more rather than trusting cheap votes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from thrifty.routing.train.cost import CHEAP_MODELS, GPT4O, MINI, STRONG_MODELS
from thrifty.routing.train.data import Row, split_rows
from thrifty.routing.train.policy import CascadePolicy, Outcome, run_policy
from thrifty.routing.train.scorer import Scorer, fit_scorer

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Router:
    reference: str
    target_quality: float
    policies: dict[str, CascadePolicy]
    fallback: CascadePolicy
    pair_scorer: Scorer | None = None

    def policy_for(self, task: str | None) -> CascadePolicy:
        """The task's calibrated cascade; an unknown or missing task gets the cautious fallback."""
        if task is None:
            return self.fallback
        return self.policies.get(task, self.fallback)

    def run(self, row: Row) -> Outcome:
        return self.policy_for(row.task).run(row)

    def strong_score(self, row: Row) -> float:
        """How much the weak model's answer needs the strong model (higher = send to strong)."""
        if self.pair_scorer is None:
            return 0.0
        return 1.0 - self.pair_scorer.score(row)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "thrifty-router",
            "version": FORMAT_VERSION,
            "reference": self.reference,
            "target_quality": self.target_quality,
            "policies": {t: p.to_json() for t, p in sorted(self.policies.items())},
            "fallback": self.fallback.to_json(),
            "pair_scorer": self.pair_scorer.to_json() if self.pair_scorer else None,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Router:
        if obj.get("format") != "thrifty-router" or obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a thrifty router artifact (version {FORMAT_VERSION})")
        scorer = obj.get("pair_scorer")
        return cls(
            reference=str(obj["reference"]),
            target_quality=float(obj["target_quality"]),
            policies={str(t): CascadePolicy.from_json(p) for t, p in obj["policies"].items()},
            fallback=CascadePolicy.from_json(obj["fallback"]),
            pair_scorer=Scorer.from_json(scorer) if scorer else None,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Router:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def candidate_policies(
    cheap: Sequence[str] = CHEAP_MODELS, strong: Sequence[str] = STRONG_MODELS, max_cheap: int = 4
) -> list[CascadePolicy]:
    """Every ordered set of cheap voters with every agreement rule, for each strong fallback."""
    out: list[CascadePolicy] = []
    for k in range(1, min(max_cheap, len(cheap)) + 1):
        for order in itertools.permutations(cheap, k):
            for votes in range(1, k + 1):
                for dissent in range(k - votes + 1):
                    out.extend(CascadePolicy(order, votes, dissent, s) for s in strong)
    return out


@dataclass(frozen=True, slots=True)
class Evaluated:
    policy: CascadePolicy
    rel_quality: float
    rel_cost: float


def evaluate(policy: CascadePolicy, rows: Sequence[Row], reference: str) -> Evaluated:
    outcomes = run_policy(rows, policy)
    ref_correct = sum(r.calls[reference].correct for r in rows)
    ref_cost = sum((r.calls[reference].cost for r in rows), Decimal(0))
    correct = sum(o.correct for o in outcomes)
    cost = sum((o.cost for o in outcomes), Decimal(0))
    return Evaluated(
        policy,
        correct / ref_correct if ref_correct else 0.0,
        float(cost / ref_cost) if ref_cost else 0.0,
    )


def _cheapest(evals: Iterable[Evaluated], target: float) -> Evaluated | None:
    ok = [e for e in evals if e.rel_quality >= target]
    # Ties on cost go to the fewer voters: the same quality with fewer dependencies.
    return min(ok, key=lambda e: (e.rel_cost, len(e.policy.cheap)), default=None)


def calibrate(
    rows: Sequence[Row],
    reference: str,
    target_quality: float,
    candidates: Sequence[CascadePolicy],
) -> CascadePolicy:
    """The cheapest candidate reaching the target on `rows`; if none does, the best-quality one."""
    evals = [evaluate(p, rows, reference) for p in candidates]
    best = _cheapest(evals, target_quality)
    if best is None:
        best = max(evals, key=lambda e: (e.rel_quality, -e.rel_cost))
    return best.policy


def calibrate_fallback(
    by_task: dict[str, Sequence[Row]],
    reference: str,
    target_quality: float,
    candidates: Sequence[CascadePolicy],
    *,
    margin: float,
    min_votes: int,
) -> CascadePolicy:
    """For unseen tasks: among cautious candidates (at least `min_votes` agreeing, no dissent), the
    one with the lowest worst-case cost whose worst-case quality over the known tasks is at least
    target + margin; without one, the most demanding cascade escalating to the reference."""
    if not candidates:
        raise ValueError("no candidate policies")
    # With few voters on offer, ask for as much agreement as the candidates allow.
    need = min(min_votes, max(p.min_votes for p in candidates))
    # Escalate to the reference itself: another strong model's strengths may not carry to a new task.
    cautious = [p for p in candidates if p.min_votes >= need and p.max_dissent == 0 and p.strong == reference]
    cautious = cautious or [p for p in candidates if p.min_votes >= need and p.max_dissent == 0]
    per_policy: list[Evaluated] = []
    for p in cautious:
        evals = [evaluate(p, rows, reference) for rows in by_task.values() if rows]
        per_policy.append(Evaluated(p, min(e.rel_quality for e in evals), max(e.rel_cost for e in evals)))
    best = _cheapest(per_policy, target_quality + margin)
    if best is None:
        best = max(per_policy, key=lambda e: (e.rel_quality, -e.rel_cost))
    return best.policy


def train(
    rows: Sequence[Row],
    *,
    reference: str = GPT4O,
    target_quality: float = 1.0,
    holdout: float = 0.5,
    unseen_margin: float = 0.01,
    unseen_min_votes: int = 3,
    candidates: Sequence[CascadePolicy] | None = None,
) -> Router:
    """Fit the scorer on one part of `rows`, calibrate the cascades on the held-back rest."""
    if not rows:
        raise ValueError("no training rows")
    candidates = list(candidates) if candidates is not None else candidate_policies()
    fit_rows, cal_rows = split_rows(rows, 1.0 - holdout, salt="calibration")
    if not cal_rows or not fit_rows:
        fit_rows = cal_rows = list(rows)  # too little data to hold any back: calibrate in-sample
    by_task: dict[str, list[Row]] = {}
    for r in cal_rows:
        by_task.setdefault(r.task, []).append(r)
    policies = {t: calibrate(rs, reference, target_quality, candidates) for t, rs in by_task.items()}
    fallback = calibrate_fallback(
        dict(by_task.items()),
        reference,
        target_quality,
        candidates,
        margin=unseen_margin,
        min_votes=unseen_min_votes,
    )
    voters = (MINI, *(m for m in CHEAP_MODELS if m != MINI))
    pair_scorer = fit_scorer(fit_rows, voters, anchored=True)
    return Router(reference, target_quality, policies, fallback, pair_scorer)
