"""Routing strategies replayed over recorded replies: what each would have answered and paid.

The cascade calls cheap models one after another and accepts the most common normalised answer as
soon as `min_votes` of them agree with at most `max_dissent` replies against it (a reply with no
answer counts against); as soon as acceptance is out of reach it calls the strong model and returns
that reply. Every call made is paid for, the failed cheap votes included.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.routing.train.data import Row

ESCALATE = -1
CONTINUE = -2


@dataclass(frozen=True, slots=True)
class Outcome:
    correct: bool
    cost: Decimal
    escalated: bool
    calls: int


@dataclass(frozen=True, slots=True)
class CascadePolicy:
    cheap: tuple[str, ...]
    min_votes: int
    max_dissent: int
    strong: str

    def to_json(self) -> dict[str, Any]:
        return {
            "cheap": list(self.cheap),
            "min_votes": self.min_votes,
            "max_dissent": self.max_dissent,
            "strong": self.strong,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CascadePolicy:
        return cls(
            cheap=tuple(str(m) for m in obj["cheap"]),
            min_votes=int(obj["min_votes"]),
            max_dissent=int(obj["max_dissent"]),
            strong=str(obj["strong"]),
        )

    def describe(self) -> str:
        if not self.cheap:
            return f"all to {short_name(self.strong)}"
        names = "+".join(short_name(m) for m in self.cheap)
        return f"{names} {self.min_votes}-agree/≤{self.max_dissent}-dissent → {short_name(self.strong)}"

    def decide(self, answers: Sequence[str | None]) -> int:
        """Given the answers of the cheap models called so far: the index of a model whose answer
        is accepted, ESCALATE, or CONTINUE (call the next cheap model)."""
        votes = Counter(a for a in answers if a is not None)
        top, count = votes.most_common(1)[0] if votes else (None, 0)
        dissent = len(answers) - count
        if top is not None and count >= self.min_votes and dissent <= self.max_dissent:
            return answers.index(top)
        remaining = len(self.cheap) - len(answers)
        # Escalate as soon as no continuation can meet the rule; calling more would be wasted money.
        if dissent > self.max_dissent or count + remaining < self.min_votes:
            return ESCALATE
        return CONTINUE

    def run(self, row: Row) -> Outcome:
        answers: list[str | None] = []
        cost = Decimal(0)
        for model in self.cheap:
            call = row.calls[model]
            answers.append(call.answer)
            cost += call.cost
            verdict = self.decide(answers)
            if verdict == ESCALATE:
                break
            if verdict >= 0:
                chosen = row.calls[self.cheap[verdict]]
                return Outcome(chosen.correct, cost, escalated=False, calls=len(answers))
        strong = row.calls[self.strong]
        return Outcome(strong.correct, cost + strong.cost, escalated=True, calls=len(answers) + 1)


def vote_policies(cheap: Sequence[str], strong: str, max_models: int | None = None) -> list[CascadePolicy]:
    """Every cascade that calls an ordered subset of `cheap` (at most `max_models` of them),
    accepts k agreeing answers with at most d dissenting, and otherwise calls `strong`."""
    out: list[CascadePolicy] = []
    for n in range(1, min(len(cheap), max_models or len(cheap)) + 1):
        for order in itertools.permutations(cheap, n):
            for votes in range(1, n + 1):
                for dissent in range(n - votes + 1):
                    out.append(CascadePolicy(tuple(order), votes, dissent, strong))
    return out


_SHORT = {
    "gpt-4o-mini-2024-07-18": "mini",
    "gpt-4o-2024-08-06": "4o",
    "claude-3-haiku-20240307": "haiku",
    "claude-3-5-sonnet-20240620": "sonnet",
    "gemini-1.5-flash": "flash",
    "gpt-3.5-turbo-0125": "3.5",
}


def short_name(model: str) -> str:
    """A model id as the reasons and tables name it ("mini", "4o", ...)."""
    return _SHORT.get(model, model)


def run_single(rows: Sequence[Row], model: str) -> list[Outcome]:
    return [Outcome(r.calls[model].correct, r.calls[model].cost, escalated=False, calls=1) for r in rows]


def run_oracle(rows: Sequence[Row], models: Sequence[str]) -> list[Outcome]:
    """The cheapest model that answered correctly, else the cheapest model: an upper bound that
    pays for one call only, as if the router knew the answers in advance."""
    out: list[Outcome] = []
    for r in rows:
        calls = [r.calls[m] for m in models]
        right = [c for c in calls if c.correct]
        best = min(right or calls, key=lambda c: c.cost)
        out.append(Outcome(best.correct, best.cost, escalated=False, calls=1))
    return out


def run_policy(rows: Sequence[Row], policy: CascadePolicy) -> list[Outcome]:
    return [policy.run(r) for r in rows]
