"""Vote cascades chosen per task and certified along a path that never looks at the labels.

A vote cascade (``policy.CascadePolicy``) calls cheap models one at a time, cheapest rule first,
and accepts an answer once enough of them agree (answers compared as the task's labels were
made); otherwise the strong model answers. It has no learned score, so its certificate needs no
out-of-fold scores: only the choice of cascade per task is data-driven.

That choice is certified by fixed-sequence testing (Learn then Test, Angelopoulos et al. 2021)
along a path ordered by *label-free* quantities: how often a rule's accepted answer differs from
the strong model's answer, and what it costs. Neither needs a correctness label (the strong
model's reply is in the data whether or not anyone graded it), so however many cascades the
family holds, the path costs no multiple-comparison penalty. The path runs from sending every
prompt to the strong model (no disagreement) to the cheapest rules (most disagreement), one
combination of per-task cascades per step (the label-free Pareto front of the mixture); testing
stops at the first rule whose lower confidence bound of the paired difference with the
reference misses the target, and the cheapest rule before it is chosen.

A caveat on the order, and its strict modes: with ordering="same" (the default) it is computed on
the same rows it tests, from their outputs, and a rule that disagrees with the strong model less
on these rows is also wrong less on them, so the order is not independent of the losses as a
strict reading of the theory asks. ordering="split" removes that: half of the rows (by id hash)
order the path and only the other half tests it, so the order is fixed before the tested rows are
seen; "crossfit" does it both ways, each test at half the error budget, and keeps the cheaper
certified rule. Both test on half the rows, so their bounds are wider; repeated draws measure what
each costs in coverage and cost (tests and README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thrifty.routing.train.certify import (
    PathPoint,
    certified_ratio,
    cheapest_certified,
    lower_bounds,
    z_score,
)
from thrifty.routing.train.data import Row, split_rows
from thrifty.routing.train.policy import CascadePolicy, vote_policies


@dataclass(frozen=True, slots=True)
class VoteRuns:
    """One cascade replayed over rows: per row right (0/1), cost, whether it escalated, and
    whether its answer is the strong model's (escalated rows count as the same)."""

    policy: CascadePolicy
    ok: Any
    cost: Any
    escalated: Any
    same: Any


def cheap_models(rows: Sequence[Row], reference: str, *, limit: int = 6, share: float = 0.25) -> list[str]:
    """The pool's models (every row has a reply) costing under `share` of the reference on these
    rows, cheapest first, at most `limit`: the voters a cascade may draw from."""
    if not rows:
        return []
    common = set(rows[0].calls)
    for r in rows[1:]:
        common &= set(r.calls)
    common.discard(reference)
    ref_cost = sum(float(r.calls[reference].cost) for r in rows)
    totals = {m: sum(float(r.calls[m].cost) for r in rows) for m in common}
    return sorted((m for m in common if totals[m] < share * ref_cost), key=lambda m: (totals[m], m))[:limit]


def family_of(cheap: Sequence[str], strong: str, max_models: int = 3) -> list[CascadePolicy]:
    """Everything to `strong`, and every vote cascade over at most `max_models` of `cheap`."""
    return [
        CascadePolicy((), 1, 0, strong),
        *vote_policies([m for m in cheap if m != strong], strong, max_models),
    ]


def replay_votes(rows: Sequence[Row], policy: CascadePolicy) -> VoteRuns:
    """`policy` over `rows`, vectorised (the same decisions as ``CascadePolicy.run``)."""
    import numpy as np

    n, order = len(rows), policy.cheap
    keys = [[r.calls[m].answer for r in rows] for m in order]
    strong_key = [r.calls[policy.strong].answer for r in rows]
    eq = [
        [
            np.array([a is not None and a == b for a, b in zip(keys[i], keys[j], strict=True)])
            for j in range(len(order))
        ]
        for i in range(len(order))
    ]
    ok_m = [np.array([r.calls[m].correct for r in rows], dtype=float) for m in order]
    cost_m = [np.array([float(r.calls[m].cost) for r in rows]) for m in order]
    same_m = [
        np.array([a is not None and a == b for a, b in zip(keys[i], strong_key, strict=True)], dtype=float)
        for i in range(len(order))
    ]
    ok = np.array([r.calls[policy.strong].correct for r in rows], dtype=float)
    strong_cost = np.array([float(r.calls[policy.strong].cost) for r in rows])
    cost, same = np.zeros(n), np.ones(n)
    open_ = np.ones(n, dtype=bool)  # rows still calling cheap models
    accepted = np.zeros(n, dtype=bool)
    for step in range(len(order)):
        called = step + 1
        cost = cost + cost_m[step] * open_
        counts = np.stack([sum(eq[i][j].astype(int) for j in range(called)) for i in range(called)])
        top = counts.max(axis=0)
        first = counts.argmax(axis=0)  # the earliest reply giving the most common answer
        dissent = called - top
        take = open_ & (top > 0) & (top >= policy.min_votes) & (dissent <= policy.max_dissent)
        for i in range(called):
            pick = take & (first == i)
            ok = np.where(pick, ok_m[i], ok)
            same = np.where(pick, same_m[i], same)
        accepted |= take
        hopeless = (dissent > policy.max_dissent) | (top + len(order) - called < policy.min_votes)
        open_ = open_ & ~take & ~hopeless
    escalated = ~accepted
    cost = cost + strong_cost * escalated
    return VoteRuns(policy, ok, cost, escalated, same)


@dataclass(frozen=True, slots=True)
class VoteStep:
    """One rule of the path: a cascade per task, and its totals over every row."""

    policies: dict[str, CascadePolicy]
    disagree: float  # rows whose accepted answer is not the strong model's (label-free)
    cost: float
    quality: float  # right answers
    both: float  # rows right under both the rule and the reference
    lower: float  # lower confidence bound of sum(ok - target x ok_ref); >= 0: certified


@dataclass(frozen=True, slots=True)
class VoteChoice:
    path: list[VoteStep]
    chosen: int  # index on the path of the certified rule (-1: none, not even all to the strong model)
    bound: float  # certified quality ratio of the chosen rule
    rel_cost: float  # its cost on the rows, relative to the reference
    rel_quality: float
    escalation: dict[str, float]  # per task, the share of rows the chosen rule escalates
    uncertified: int  # index of the cheapest rule on the path that merely measures the target
    cheap: tuple[str, ...]
    family: int  # cascades per task in the family
    ordering: str = "same"  # which rows ordered the path (``choose_votes``)
    tested: int = 0  # rows the path was tested on (all of them, or a half)

    @property
    def certified(self) -> bool:
        return self.chosen >= 0

    def policies(self) -> dict[str, CascadePolicy]:
        """The chosen rule's cascade per task; every task to the strong model when none is
        certified (the path's first rule need not be that: a cheaper cascade that never disagreed
        on the ordering rows comes first)."""
        first = self.path[0].policies
        if self.chosen < 0:
            return {t: CascadePolicy((), 1, 0, p.strong) for t, p in first.items()}
        return self.path[self.chosen].policies

    def to_json(self) -> dict[str, Any]:
        loose = self.path[self.uncertified]
        return {
            "policies": {t: p.to_json() for t, p in sorted(self.policies().items())},
            "uncertified_policies": {t: p.to_json() for t, p in sorted(loose.policies.items())},
            "path_length": len(self.path),
            "steps_certified": self.chosen + 1,
            "cheap": list(self.cheap),
            "family": self.family,
            "ordering": self.ordering,
            "tested_rows": self.tested,
        }


def _front(disagree: Any, cost: Any) -> list[int]:
    """Indices on the label-free front, fewest disagreements first, each cheaper than the last."""
    import numpy as np

    out: list[int] = []
    best = math.inf
    for k in np.lexsort((cost, disagree)):
        if cost[k] < best - 1e-15:
            out.append(int(k))
            best = float(cost[k])
    return out


ORDERINGS = ("same", "split", "crossfit")
_ORDER_SALT = "vote-order"


def _fronts(
    rows: Sequence[Row], family: Sequence[CascadePolicy], tasks: Sequence[str]
) -> dict[str, list[tuple[float, float, int]]]:
    """Per task, the label-free front of the family on `rows`: (disagreements with the strong
    model, cost, index in `family`), fewest disagreements first. A task with no rows here has only
    "everything to the strong model" (index 0)."""
    import numpy as np

    out: dict[str, list[tuple[float, float, int]]] = {}
    for t in tasks:
        sub = [r for r in rows if r.task == t]
        if not sub:
            out[t] = [(0.0, 0.0, 0)]
            continue
        runs = [replay_votes(sub, p) for p in family]
        dis = np.array([float((1.0 - v.same).sum()) for v in runs])
        cost = np.array([float(v.cost.sum()) for v in runs])
        out[t] = [(float(dis[k]), float(cost[k]), k) for k in _front(dis, cost)]
    return out


def _mixture(fronts: dict[str, list[tuple[float, float, int]]]) -> list[tuple[float, dict[str, int]]]:
    """The tasks' fronts merged into the mixture's (fewest disagreements for the cost), one task at
    a time: (disagreements, a family index per task), from "never disagree" to the cheapest."""
    combos: list[tuple[float, float, dict[str, int]]] = [(0.0, 0.0, {})]
    for t, front in fronts.items():
        merged = [(d + d2, c + c2, {**sel, t: k}) for d, c, sel in combos for d2, c2, k in front]
        merged.sort(key=lambda m: (m[0], m[1]))
        combos = []
        for m in merged:
            if not combos or m[1] < combos[-1][1] - 1e-15:
                combos.append(m)
    return [(d, sel) for d, _, sel in combos]


def _test_path(
    order: list[tuple[float, dict[str, int]]],
    rows: Sequence[Row],
    family: Sequence[CascadePolicy],
    tasks: Sequence[str],
    *,
    reference: str,
    target: float,
    confidence: float,
    cheap: Sequence[str],
    ordering: str,
) -> VoteChoice:
    """Fixed-sequence testing of the path `order` (computed elsewhere) on `rows`."""
    import numpy as np

    by_task = {t: [r for r in rows if r.task == t] for t in tasks}
    cache: dict[tuple[str, int], VoteRuns] = {}

    def runs(t: str, k: int) -> VoteRuns:
        if (t, k) not in cache:
            cache[t, k] = replay_votes(by_task[t], family[k])
        return cache[t, k]

    ok_ref = {t: np.array([r.calls[reference].correct for r in by_task[t]], dtype=float) for t in tasks}
    r_total, n = float(sum(v.sum() for v in ok_ref.values())), len(rows)
    z = z_score(confidence)
    path: list[VoteStep] = []
    for d, sel in order:
        q = float(sum(runs(t, sel[t]).ok.sum() for t in tasks))
        qr = float(sum((runs(t, sel[t]).ok * ok_ref[t]).sum() for t in tasks))
        c = float(sum(runs(t, sel[t]).cost.sum() for t in tasks))
        low = float(lower_bounds([q], [qr], r_total, n, target, z)[0])
        path.append(VoteStep({t: family[sel[t]] for t in tasks}, d, c, q, qr, low))
    points = [PathPoint(i, math.inf, s.quality, s.both, s.cost, s.lower) for i, s in enumerate(path)]
    chosen = cheapest_certified(points)
    step = path[max(chosen, 0)]
    ref_c = sum(float(r.calls[reference].cost) for r in rows) or 1.0
    reaching = [i for i, s in enumerate(path) if s.quality >= target * r_total - 1e-9]
    loose = min(reaching, key=lambda i: path[i].cost) if reaching else 0
    sel = order[max(chosen, 0)][1]
    certified = chosen >= 0  # else every prompt goes to the strong model (``VoteChoice.policies``)
    return VoteChoice(
        path=path,
        chosen=chosen,
        bound=certified_ratio(step.quality, step.both, r_total, n, z) if certified else 0.0,
        rel_cost=step.cost / ref_c if certified else 1.0,
        rel_quality=(step.quality / r_total if r_total else 0.0) if certified else 1.0,
        escalation={
            t: float(runs(t, sel[t]).escalated.mean()) if certified and by_task[t] else 1.0 for t in tasks
        },
        uncertified=loose,
        cheap=tuple(cheap),
        family=len(family),
        ordering=ordering,
        tested=n,
    )


def choose_votes(
    rows: Sequence[Row],
    *,
    reference: str,
    strong: str | None = None,
    target: float,
    confidence: float,
    cheap: Sequence[str] | None = None,
    max_models: int = 3,
    ordering: str = "same",
) -> VoteChoice:
    """The cheapest per-task vote cascades certified >= `target` x the reference's quality over
    the mixture of `rows`' tasks at `confidence` (see the module docstring for the path).

    `ordering` says which rows order the path: "same" (the rows it tests; the caveat of the module
    docstring), "split" (half of the rows, by id hash, order it and the other half tests it at the
    full confidence), "crossfit" (each half orders the other's path, each tested at half the error
    budget, the cheaper certified of the two chosen)."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}")
    strong = strong or reference
    cheap = list(cheap) if cheap is not None else cheap_models(rows, reference)
    cheap = [m for m in cheap if m != strong]
    family = family_of(cheap, strong, max_models)
    tasks = sorted({r.task for r in rows})
    kw: dict[str, Any] = {"reference": reference, "target": target, "cheap": cheap, "ordering": ordering}
    if ordering == "same":
        order = _mixture(_fronts(rows, family, tasks))
        return _test_path(order, rows, family, tasks, confidence=confidence, **kw)
    first, second = split_rows(rows, 0.5, _ORDER_SALT)
    if ordering == "split":
        order = _mixture(_fronts(first, family, tasks))
        return _test_path(order, second, family, tasks, confidence=confidence, **kw)
    # Two tests at half the error budget each (Bonferroni), so choosing the cheaper keeps it.
    level = 1.0 - (1.0 - confidence) / 2
    choices = [
        _test_path(_mixture(_fronts(a, family, tasks)), b, family, tasks, confidence=level, **kw)
        for a, b in ((first, second), (second, first))
    ]
    return min(choices, key=lambda c: (not c.certified, c.rel_cost if c.certified else -c.bound))
