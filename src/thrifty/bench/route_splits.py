"""`thrifty bench route-splits`: the route benchmark over repeated random 50/50 splits of one data
set, so a result comes with its spread rather than one lucky (or unlucky) split.

Each split hashes the prompt ids with its salt (``split_rows``), trains on one half and replays the
other through the router's step API, exactly as `bench route` does. Per split it reports the
certified cascade (with its certified bound and whether the held-out quality met the target), the
median thresholds (no certainty) and the plain agreement cascade over the learned pair; and, for
each task, the router trained on that task alone and tested on the other tasks (unseen).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from thrifty.bench.route import load_priced, run_policy_router
from thrifty.errors import InvalidData
from thrifty.routing.train.data import Row, split_rows
from thrifty.routing.train.fit import train
from thrifty.routing.train.gap import uncertified_router
from thrifty.routing.train.metrics import summarise
from thrifty.routing.train.policy import CascadePolicy, Outcome, run_policy, run_single, short_name
from thrifty.routing.train.votes import ORDERINGS, choose_votes

DEFAULT_SALTS = ("own1", "own2", "own3")
VOTE_SHARE = 0.5  # the vote candidate's share of the error budget in ``fit.train``'s default


@dataclass(frozen=True, slots=True)
class SplitResult:
    method: str
    split: str
    prompts: int
    rel_quality: float
    rel_cost: float
    ladder: str = ""
    bound: float | None = None  # the certified lower bound, for the certified cascade
    met: bool | None = None  # held-out quality >= target (certified cascade only)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "split": self.split,
            "prompts": self.prompts,
            "rel_quality": self.rel_quality,
            "rel_cost": self.rel_cost,
            "ladder": self.ladder,
            "bound": self.bound,
            "met": self.met,
        }


def _result(
    method: str, split: str, outcomes: Sequence[Outcome], rows: Sequence[Row], reference: str, **extra: Any
) -> SplitResult:
    s = summarise(method, outcomes, run_single(rows, reference))
    return SplitResult(method, split, len(rows), float(s.rel_quality), float(s.rel_cost), **extra)


def one_split(
    rows: Sequence[Row],
    salt: str,
    *,
    reference: str,
    target_quality: float,
    confidence: float,
    unseen: bool = True,
    vote_orderings: Sequence[str] = (),
    vote_ordering: str = "same",
) -> list[SplitResult]:
    """Train on the half of `rows` the salt picks, test on the other half. Each of
    `vote_orderings` adds the vote cascades alone, their path ordered that way (``choose_votes``),
    certified at the vote candidate's share of the confidence, as the trainer does."""
    train_rows, test_rows = split_rows(rows, 0.5, salt)
    if not train_rows or not test_rows:
        raise InvalidData(f"split {salt!r} leaves one half empty; more rows are needed")
    router = train(
        train_rows,
        reference=reference,
        target_quality=target_quality,
        confidence=confidence,
        vote_ordering=vote_ordering,
    )
    names = [*router.ladder, *([router.third] if router.third else []), router.strong]
    ladder = " → ".join(short_name(m) for m in names)
    cert = router.meta["certificate"]
    ours = _result("certified cascade", salt, run_policy_router(router, test_rows), test_rows, reference)
    certified = bool(cert["certified"])
    out = [
        SplitResult(
            ours.method,
            salt,
            ours.prompts,
            ours.rel_quality,
            ours.rel_cost,
            ladder,
            float(cert["bound"]) if certified else None,
            certified and ours.rel_quality >= target_quality - 1e-12,
        )
    ]
    median = uncertified_router(router)  # median thresholds, or the vote path's measured choice
    if median is not None:
        runs = run_policy_router(median, test_rows)
        out.append(_result("median thresholds", salt, runs, test_rows, reference, ladder=ladder))
    naive = CascadePolicy(router.ladder, min_votes=2, max_dissent=0, strong=router.strong)
    out.append(_result("plain agreement", salt, run_policy(test_rows, naive), test_rows, reference))
    for ordering in vote_orderings:
        out.append(_vote_result(train_rows, test_rows, salt, ordering, reference, target_quality, confidence))
    tasks = sorted({r.task for r in rows})
    if unseen and len(tasks) >= 2:
        for task in tasks:
            alone = train(
                [r for r in train_rows if r.task == task],
                reference=reference,
                target_quality=target_quality,
                confidence=confidence,
                vote_ordering=vote_ordering,
            )
            others = [r for r in test_rows if r.task != task]
            runs = run_policy_router(alone, others)
            out.append(_result(f"unseen: trained on {task} only", salt, runs, others, reference))
    return out


def _vote_result(
    train_rows: Sequence[Row],
    test_rows: Sequence[Row],
    salt: str,
    ordering: str,
    reference: str,
    target_quality: float,
    confidence: float,
) -> SplitResult:
    level = 1.0 - (1.0 - confidence) * VOTE_SHARE
    choice = choose_votes(
        train_rows, reference=reference, target=target_quality, confidence=level, ordering=ordering
    )
    policies = choice.policies()
    ordered = sorted(test_rows, key=lambda r: r.task)
    outcomes: list[Outcome] = []
    for task in dict.fromkeys(r.task for r in ordered):
        sub = [r for r in ordered if r.task == task]
        outcomes += run_policy(sub, policies.get(task, CascadePolicy((), 1, 0, reference)))
    res = _result(f"vote cascades, {ordering} order", salt, outcomes, ordered, reference)
    bound = choice.bound if choice.certified else None
    met = choice.certified and res.rel_quality >= target_quality - 1e-12
    return replace(
        res,
        bound=bound,
        met=met,
        ladder="; ".join(f"{t}: {p.describe()}" for t, p in sorted(policies.items())),
    )


def run_route_splits(
    data_paths: Sequence[str | Path],
    salts: Sequence[str] = DEFAULT_SALTS,
    reference: str = "gpt-4o-2024-08-06",
    json_out: str | Path | None = None,
    console: Console | None = None,
    *,
    target_quality: float = 0.99,
    confidence: float = 0.95,
    prices: str | Path | None = None,
    unseen: bool = True,
    vote_orderings: Sequence[str] = (),
    vote_ordering: str = "same",
) -> list[SplitResult]:
    console = console or Console()
    bad = [o for o in (*vote_orderings, vote_ordering) if o not in ORDERINGS]
    if bad:
        raise InvalidData(f"unknown vote ordering {bad[0]!r}; one of {', '.join(ORDERINGS)}")
    rows = load_priced(data_paths, prices, console)
    if not rows:
        raise InvalidData("no rows")
    if not salts:
        raise InvalidData("give at least one split salt")
    results: list[SplitResult] = []
    for salt in salts:
        results += one_split(
            rows,
            salt,
            reference=reference,
            target_quality=target_quality,
            confidence=confidence,
            unseen=unseen,
            vote_orderings=vote_orderings,
            vote_ordering=vote_ordering,
        )
    print_splits(console, results, target_quality, confidence)
    if json_out is not None:
        payload = {"results": [r.to_json() for r in results], "summary": summary(results)}
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return results


def summary(results: Sequence[SplitResult]) -> list[dict[str, Any]]:
    """Per method over the splits: mean and spread of quality and cost, and how often the certified
    target was met."""
    out: list[dict[str, Any]] = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        q, c = [r.rel_quality for r in rs], [r.rel_cost for r in rs]
        met = [r.met for r in rs if r.met is not None]
        out.append(
            {
                "method": method,
                "splits": len(rs),
                "rel_quality_mean": statistics.fmean(q),
                "rel_quality_sd": statistics.stdev(q) if len(q) > 1 else 0.0,
                "rel_cost_mean": statistics.fmean(c),
                "rel_cost_sd": statistics.stdev(c) if len(c) > 1 else 0.0,
                "met": sum(met) if met else None,
            }
        )
    return out


def print_splits(
    console: Console, results: Sequence[SplitResult], target_quality: float, confidence: float
) -> None:
    table = Table(title=f"route bench over {len({r.split for r in results})} random 50/50 splits")
    for col in ("method", "split", "prompts", "ladder", "rel quality", "rel cost", "certified bound", "met"):
        table.add_column(col, justify="left" if col in ("method", "split", "ladder") else "right")
    for r in results:
        table.add_row(
            r.method,
            r.split,
            str(r.prompts),
            r.ladder,
            f"{r.rel_quality:.1%}",
            f"{r.rel_cost:.1%}",
            "" if r.bound is None else f"{r.bound:.2%}",
            "" if r.met is None else ("yes" if r.met else "NO"),
        )
    console.print(table)
    for s in summary(results):
        met = "" if s["met"] is None else f"; target {target_quality:.1%} met on {s['met']} of {s['splits']}"
        console.print(
            f"{s['method']}: quality {s['rel_quality_mean']:.1%} ± {s['rel_quality_sd']:.1%}, cost "
            f"{s['rel_cost_mean']:.1%} ± {s['rel_cost_sd']:.1%} over {s['splits']} splits{met} "
            f"(certificates at {confidence:.0%})",
            highlight=False,
        )
