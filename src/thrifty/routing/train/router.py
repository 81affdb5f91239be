"""The trained router: a sequential, calibrated cascade over cheap drafts, with an online step API.

Cascade (the default strategy): call the ladder's draft model; accept its lone draft if its score
clears the task's first threshold; else call the voter and accept if the stage-2 score clears the
second threshold; else call the strong (final) model and return its answer. The ladder's models are
whatever the training data had (the artifact names them). Easy prompts cost one cheap call. Scores
come from logistic gates over task-agnostic draft features (agreement above all; gate.py), made
cost-aware on known tasks: log(estimated escalation cost) - log P(wrong), so a risk is taken more
readily where escalating would cost more. At stage 2 every agreement ranks above every split
(AGREE_BONUS), so one threshold says "splits with score >= x" or "agreements with score >= x".
Training certifies one score threshold for lone drafts and agreements alike and never accepts a
split (which side of a split is right is barely predictable from the replies, gate AUC ~0.5-0.6).

Classifier (the other strategy): before any call, a logistic model over hashed prompt words
predicts whether the draft model will be right; the prompt goes to it alone or to the strong model.

Calibration (``fit``, ``certify``): thresholds are certified out-of-fold for a target quality
relative to the reference at a stated confidence. A task not in the artifact (or None) gets the
fallback: never a lone draft, never a split, agreements (compared by answer equivalence) only above
a bar that held on tasks the gates had not seen, and straight to the strong model if no bar is safe.
So an unfamiliar task leans to the strong model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thrifty.routing.train.data import Row
from thrifty.routing.train.gate import (
    Logistic,
    Parsed,
    parse,
    prompt_features,
    stage_features,
)
from thrifty.routing.train.policy import CONTINUE, ESCALATE, CascadePolicy, short_name
from thrifty.routing.train.step import Accept, CallModel, Draft, Step

FORMAT_VERSION = 2
NEVER = math.inf
STRATEGIES = ("cascade", "classifier")


@dataclass(frozen=True, slots=True)
class Gate:
    """Acceptance thresholds on P(right): after one cheap draft, after two, and for the
    classifier's pre-call choice. `NEVER` (inf; null in JSON) disables that acceptance."""

    first: float
    second: float
    classifier: float
    cost_aware: bool = True  # thresholds apply to `accept_score`, cost-aware or plain P(right)
    third: float = NEVER  # a three-way agreement's score (the third cheap model asked when two agree)

    def to_json(self) -> dict[str, float | bool | None]:
        out: dict[str, float | bool | None] = {k: (None if math.isinf(v) else v) for k, v in _items(self)}
        out["cost_aware"] = self.cost_aware
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Gate:
        def val(k: str) -> float:
            v = obj[k]
            return NEVER if v is None else float(v)

        third = obj.get("third")  # absent in artifacts from before the third opinion
        return cls(
            val("first"),
            val("second"),
            val("classifier"),
            bool(obj.get("cost_aware", True)),
            NEVER if third is None else float(third),
        )


def _items(g: Gate) -> list[tuple[str, float]]:
    return [("first", g.first), ("second", g.second), ("classifier", g.classifier), ("third", g.third)]


CAUTIOUS = Gate(NEVER, NEVER, NEVER)
# Stage-2 scores of agreeing drafts get this added, so every agreement ranks above every split.
AGREE_BONUS = 100.0


def accept_score(p: float, prompt_chars: int, draft_chars: int, *, cost_aware: bool) -> float:
    """How strongly to accept a cheap answer with P(right) = p; thresholds apply to this.

    Cost-aware, it is log(escalation cost) - log(P(wrong)): the same risk is worth taking where
    escalating would cost more. The strong call's cost is estimated from what is known before it
    is made, the prompt and the cheap draft's length (input and output priced 1:4, as most list
    prices are); only the ranking matters, so characters stand in for tokens."""
    if not cost_aware:
        return p
    return math.log(prompt_chars + 4.0 * draft_chars + 1.0) - math.log(max(1e-9, 1.0 - p))


def _rule(gate: Gate, score: float, agree: bool, passed: bool) -> str:
    """The stage-2 verdict in words: scores are compared within the agree or the split band."""
    t = gate.second
    name = "score" if gate.cost_aware else "p"
    if t >= AGREE_BONUS:
        if not agree:
            return "a split is never accepted here"
        if t == AGREE_BONUS:
            return "any agreement is accepted here"
        t -= AGREE_BONUS
    elif agree:
        return "any agreement is accepted here"
    return f"{name} {score:.3f} {'>=' if passed else '<'} {_fmt(t)}"


def _fmt(t: float) -> str:
    return "never" if math.isinf(t) else f"{t:.3f}"


@dataclass(frozen=True, slots=True)
class Router:
    reference: str
    target_quality: float
    ladder: tuple[str, str]  # the two cheap models, in call order
    strong: str
    first_gate: Logistic
    agree_gate: Logistic  # P(right) of an answer both cheap drafts give
    split_gate: Logistic  # P(the first draft is right) when the two disagree
    prompt_gate: Logistic
    gates: dict[str, Gate]
    fallback: Gate
    strategy: str = "cascade"
    meta: dict[str, Any] = field(default_factory=dict)
    # A third cheap model, asked when the two drafts agree but their score is short of the bar:
    # its agreement is a third opinion far cheaper than the strong model (None: no third).
    third: str | None = None
    third_gate: Logistic | None = None  # P(right) of an answer all three cheap drafts give
    # Per seen task, a vote cascade certified on its own (``votes``): when a task has one, the
    # cascade strategy follows it instead of the learned gates (no score; answers must agree).
    votes: dict[str, CascadePolicy] = field(default_factory=dict)

    # ---- online API -------------------------------------------------------------------------
    def models(self) -> set[str]:
        """Every model id this router may ask the gateway to call."""
        voters = {m for p in self.votes.values() for m in (*p.cheap, p.strong)}
        return {*self.ladder, self.strong, *([self.third] if self.third else []), *voters}

    def gate_for(self, task: str | None) -> Gate:
        return self.gates.get(task, self.fallback) if task is not None else self.fallback

    def known(self, task: str | None) -> bool:
        return task is not None and task in self.gates

    def draft_confidence(self, task: str | None, prompt: str, output: str) -> float:
        """P(a lone first-tier draft is right), from the prompt and the draft (a scorer gate)."""
        return self.first_gate.prob(stage_features([parse(output, task)], prompt))

    def next_step(self, task: str | None, prompt: str, drafts: Sequence[Draft]) -> Step:
        """The next call to make, or which draft to return. Pure: same inputs, same step."""
        gate = self.gate_for(task)
        where = f"task {task}" if self.known(task) else "unknown task, cautious"
        strong_at = [i for i, d in enumerate(drafts) if d.model == self.strong]
        # An unseen task's answers compare by equivalence ("1/2" agrees with "\\frac{1}{2}").
        parsed = {i: parse(d.output, task if self.known(task) else None) for i, d in enumerate(drafts)}
        if strong_at:
            return self._final(strong_at[-1], parsed)
        if self.strategy == "classifier":
            return self._classify(gate, where, prompt, drafts)
        vote = self.votes.get(task) if task is not None and self.known(task) else None
        if vote is not None:
            return self._vote(vote, where, drafts, parsed)
        cheap = [next((i for i, d in enumerate(drafts) if d.model == m), None) for m in self.ladder]
        # Only a prefix of the ladder counts; a draft from elsewhere is kept but not voted.
        n = 0
        while n < len(cheap) and cheap[n] is not None:
            n += 1
        a, b = short_name(self.ladder[0]), short_name(self.ladder[1])
        if n == 0:
            if math.isinf(gate.first) and math.isinf(gate.second) and not self._asks_third(gate):
                # No cheap draft could ever be accepted here: asking for one would only add cost.
                return CallModel(self.strong, f"no cheap draft is trusted ({where})")
            return CallModel(self.ladder[0], f"first tier ({where})")
        if n == 1:
            i0 = cheap[0]
            assert i0 is not None
            p = self.first_gate.prob(stage_features([parsed[i0]], prompt))
            score = self._score(gate, p, prompt, parsed[i0])
            shown = f"p={p:.3f}" + (f", score {score:.3f}" if gate.cost_aware else "")
            if score >= gate.first:
                return Accept(i0, f"{a} draft trusted ({shown} >= {_fmt(gate.first)}, {where})")
            return CallModel(self.ladder[1], f"{a} unsure ({shown} < {_fmt(gate.first)}, {where}), ask {b}")
        i0, i1 = cheap[0], cheap[1]
        assert i0 is not None and i1 is not None
        d0, d1 = parsed[i0], parsed[i1]
        agree, p = self.second_p(d0, d1, prompt)
        score = self._score(gate, p, prompt, d0)
        verdict = f"{a} and {b} {'agree' if agree else 'disagree'}"
        if score + (AGREE_BONUS if agree else 0.0) >= gate.second:
            pick = i0 if d0.key is not None or d1.key is None else i1
            return Accept(pick, f"{verdict} (p={p:.3f}, {_rule(gate, score, agree, True)}, {where})")
        why = f"{verdict} (p={p:.3f}, {_rule(gate, score, agree, False)}, {where})"
        if not (agree and self._asks_third(gate)):
            return CallModel(self.strong, f"{why}, escalate")
        assert self.third is not None and self.third_gate is not None
        i2 = next((i for i, d in enumerate(drafts) if d.model == self.third), None)
        c = short_name(self.third)
        if i2 is None:
            return CallModel(self.third, f"{why}, ask {c}")
        d2 = parsed[i2]
        p3 = self.third_gate.prob(stage_features([d0, d1, d2], prompt))
        score3 = self._score(gate, p3, prompt, d0)
        shown = f"p={p3:.3f}" + (f", score {score3:.3f}" if gate.cost_aware else "")
        if d2.key is None or d2.key != d0.key:
            return CallModel(self.strong, f"{c} disagrees with {a} and {b} ({where}), escalate")
        if score3 >= gate.third:
            return Accept(i0, f"{a}, {b} and {c} agree ({shown} >= {_fmt(gate.third)}, {where})")
        return CallModel(
            self.strong, f"{a}, {b} and {c} agree ({shown} < {_fmt(gate.third)}, {where}), escalate"
        )

    def _vote(
        self, policy: CascadePolicy, where: str, drafts: Sequence[Draft], parsed: dict[int, Parsed]
    ) -> Step:
        """A seen task's vote cascade: its models in order, until enough of them agree."""
        final = [i for i, d in enumerate(drafts) if d.model == policy.strong]
        if final:
            return self._final(final[-1], parsed)
        at: list[int] = []  # the draft index of each of the policy's models called so far, in order
        for m in policy.cheap:
            i = next((j for j, d in enumerate(drafts) if d.model == m), None)
            if i is None:
                break
            at.append(i)
        if not at:
            if not policy.cheap:
                return CallModel(policy.strong, f"no cheap draft is trusted ({where})")
            return CallModel(policy.cheap[0], f"vote {policy.describe()} ({where})")
        keys = [parsed[i].key for i in at]
        verdict = policy.decide(keys)
        shown = ", ".join(f"{short_name(policy.cheap[k])}={keys[k]!r}" for k in range(len(at)))
        if verdict == ESCALATE:
            return CallModel(
                policy.strong, f"votes {shown}: short of {policy.min_votes} agreeing ({where}), escalate"
            )
        if verdict == CONTINUE:
            nxt = policy.cheap[len(at)]
            return CallModel(nxt, f"votes {shown}: not settled ({where}), ask {short_name(nxt)}")
        return Accept(at[verdict], f"votes {shown}: {policy.min_votes} agree ({where})")

    def _asks_third(self, gate: Gate) -> bool:
        return self.third is not None and self.third_gate is not None and not math.isinf(gate.third)

    def second_p(self, d0: Parsed, d1: Parsed, prompt: str) -> tuple[bool, float]:
        """(do the two cheap drafts agree, P(the answer we would return is right))."""
        agree = d0.key is not None and d0.key == d1.key
        x = stage_features([d0, d1], prompt)
        return agree, (self.agree_gate if agree else self.split_gate).prob(x)

    @staticmethod
    def _score(gate: Gate, p: float, prompt: str, first: Parsed) -> float:
        return accept_score(p, len(prompt), first.length, cost_aware=gate.cost_aware)

    def _classify(self, gate: Gate, where: str, prompt: str, drafts: Sequence[Draft]) -> Step:
        if drafts:
            return Accept(len(drafts) - 1, f"classifier sent the prompt to {short_name(drafts[-1].model)}")
        p = self.prompt_gate.prob(prompt_features(prompt))
        if p >= gate.classifier:
            return CallModel(
                self.ladder[0], f"classifier: P({short_name(self.ladder[0])} right)={p:.3f} ({where})"
            )
        return CallModel(
            self.strong, f"classifier: P({short_name(self.ladder[0])} right)={p:.3f} too low ({where})"
        )

    def _final(self, strong_index: int, parsed: dict[int, Parsed]) -> Accept:
        """The strong model's draft, unless it gave no answer and a cheap draft did."""
        if parsed[strong_index].key is None:
            for i, d in parsed.items():
                if d.key is not None:
                    return Accept(i, f"{short_name(self.strong)} gave no answer; keep a cheap draft")
        return Accept(strong_index, f"escalated: {short_name(self.strong)} answers")

    def strong_score(self, row: Row) -> float:
        """How much the first cheap model's reply needs the strong model (1 - stage-1 P(right))."""
        d = parse(row.calls[self.ladder[0]].output, row.task)
        return 1.0 - self.first_gate.prob(stage_features([d], row.prompt))

    def with_strategy(self, strategy: str) -> Router:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        return replace(self, strategy=strategy)

    def describe(self, task: str | None) -> str:
        vote = self.votes.get(task) if task is not None and self.known(task) else None
        if vote is not None and self.strategy == "cascade":
            return f"vote cascade {vote.describe()}"
        g = self.gate_for(task)
        a, b, s = short_name(self.ladder[0]), short_name(self.ladder[1]), short_name(self.strong)
        name = "score" if g.cost_aware else "p"
        if math.isinf(g.second):
            second = "never"
        elif g.second == AGREE_BONUS:
            second = "any agreement"
        elif g.second > AGREE_BONUS:
            second = f"agreement with {name}>={_fmt(g.second - AGREE_BONUS)}"
        else:
            second = f"agreement, or a split with {name}>={_fmt(g.second)}"
        third = ""
        if self._asks_third(g):
            assert self.third is not None
            c = short_name(self.third)
            third = f"+{c} if they agree: three-way agreement with {name}>={_fmt(g.third)} → "
        return (
            f"{a} alone if {name}>={_fmt(g.first)} → +{b}: {second} → {third}{s}; "
            f"classifier: {a} if p>={_fmt(g.classifier)} else {s}"
        )

    # ---- artifact ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "thrifty-router",
            "version": FORMAT_VERSION,
            "reference": self.reference,
            "target_quality": self.target_quality,
            "strategy": self.strategy,
            "ladder": list(self.ladder),
            "strong": self.strong,
            "gates": {t: g.to_json() for t, g in sorted(self.gates.items())},
            "fallback": self.fallback.to_json(),
            "first_gate": self.first_gate.to_json(),
            "agree_gate": self.agree_gate.to_json(),
            "split_gate": self.split_gate.to_json(),
            "prompt_gate": self.prompt_gate.to_json(),
            "third": self.third,
            "third_gate": self.third_gate.to_json() if self.third_gate is not None else None,
            "votes": {t: p.to_json() for t, p in sorted(self.votes.items())},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Router:
        if obj.get("format") != "thrifty-router" or obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a thrifty router artifact (version {FORMAT_VERSION})")
        ladder = tuple(str(m) for m in obj["ladder"])
        if len(ladder) != 2:
            raise ValueError("the router's ladder must name two cheap models")
        strategy = str(obj.get("strategy", "cascade"))
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        return cls(
            reference=str(obj["reference"]),
            target_quality=float(obj["target_quality"]),
            ladder=(ladder[0], ladder[1]),
            strong=str(obj["strong"]),
            first_gate=Logistic.from_json(obj["first_gate"]),
            agree_gate=Logistic.from_json(obj["agree_gate"]),
            split_gate=Logistic.from_json(obj["split_gate"]),
            prompt_gate=Logistic.from_json(obj["prompt_gate"]),
            gates={str(t): Gate.from_json(g) for t, g in obj["gates"].items()},
            fallback=Gate.from_json(obj["fallback"]),
            strategy=strategy,
            meta=dict(obj.get("meta", {})),
            third=str(obj["third"]) if obj.get("third") else None,
            third_gate=Logistic.from_json(obj["third_gate"]) if obj.get("third_gate") else None,
            votes={str(t): CascadePolicy.from_json(p) for t, p in (obj.get("votes") or {}).items()},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Router:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
