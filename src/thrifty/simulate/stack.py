"""The savings stack from the replays of its steps: pure arithmetic over per-request outcomes.

A request the replay cannot answer in a step (no recorded output of the model a layer chose) is
not guessed: it keeps the cost and outcome it had in the step before, and the layer reports how
many requests it could not inform and for want of which model's outputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from thrifty.shapes import last_user_message_text
from thrifty.simulate.layers import Step
from thrifty.simulate.outcome import Outcome
from thrifty.simulate.run import StepRun
from thrifty.simulate.traffic import TrafficLine

_ZERO = Decimal(0)
_NO_ROW = Outcome(None, False, "miss", None, False, False, "no ledger row", 0, None)


@dataclass
class Quality:
    """Quality where labels exist; `measured` False says why it is not."""

    measured: bool
    text: str
    scored: int = 0
    correct: int = 0
    before_correct: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measured": self.measured, "text": self.text}
        if self.measured:
            out.update(scored=self.scored, correct=self.correct, rate=_ratio(self.correct, self.scored))
            if self.before_correct is not None:
                out.update(
                    before_correct=self.before_correct, before_rate=_ratio(self.before_correct, self.scored)
                )
        return out


@dataclass
class LayerReport:
    key: str
    title: str
    configured: bool
    cost_before: Decimal
    cost_after: Decimal
    affected: int = 0
    detail: dict[str, int] = field(default_factory=dict)
    uninformed: int = 0
    uninformed_models: dict[str, int] = field(default_factory=dict)
    quality: Quality | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def saving(self) -> Decimal:
        return self.cost_before - self.cost_after


@dataclass
class StackReport:
    requests: int
    baseline_cost: Decimal
    layers: list[LayerReport]
    unrecorded: int  # requests no recording answers even in the baseline (cost 0 in every step)
    unpriced: int  # ledger rows without a price in the last step
    failed: int = 0  # requests refused in the baseline for another reason (unknown route, bad body)
    failed_example: str | None = None
    # Requests that failed when recorded (outcome error): replayed as failures, at what the
    # ledger charges for them in each step; `answered_later` of them a layer answered instead.
    recorded_failures: int = 0
    recorded_failures_answered: int = 0
    # Requests that went to a batch when recorded (outcome deferred): answered now in the steps
    # whose route does not defer, deferred again where the candidate's route does.
    recorded_deferred: int = 0
    recorded_deferred_unanswered: int = 0  # of those, no batch answer was recorded (not guessed)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    ledger_totals: dict[str, str] = field(default_factory=dict)

    @property
    def final_cost(self) -> Decimal:
        return self.layers[-1].cost_after if self.layers else self.baseline_cost


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _cost(outcome: Outcome) -> Decimal:
    return outcome.cost if outcome.cost is not None else _ZERO


def answer_labels(lines: Sequence[TrafficLine]) -> dict[str, str]:
    """Recorded answer text -> the label of the request it answered (the first one)."""
    found: dict[str, str] = {}
    for line in lines:
        if line.label is None or line.response is None:
            continue
        choices = line.response.get("choices") or []
        text = (choices[0].get("message") or {}).get("content") if choices else None
        if isinstance(text, str):
            found.setdefault(text, line.label)
    return found


def _hit_quality(lines: Sequence[TrafficLine], now: Sequence[Outcome], hits: list[int]) -> Quality:
    scored = correct = 0
    for i in hits:
        mine = lines[i].label
        source = now[i].answer_label
        if mine is None or source is None:
            continue
        scored += 1
        correct += source == mine
    if not hits:
        return Quality(False, "no hits")
    if not scored:
        return Quality(False, "no labels on the hit requests: precision not measured")
    return Quality(True, f"precision {correct / scored:.2%} on {scored} labelled hits", scored, correct)


def _routing_quality(
    lines: Sequence[TrafficLine],
    before: Sequence[Outcome],
    now: Sequence[Outcome],
    correct_by_prompt: Mapping[str, Mapping[str, bool]],
    upstream: Mapping[str, str],
) -> Quality:
    scored = ok_now = ok_before = 0
    for i, line in enumerate(lines):
        if not (now[i].ok and before[i].ok) or now[i].cache != "miss" or before[i].cache != "miss":
            continue
        prompt = last_user_message_text(line.body().get("messages"))
        marks = correct_by_prompt.get(prompt or "")
        if not marks:
            continue
        a = marks.get(upstream.get(now[i].model or "", now[i].model or ""))
        b = marks.get(upstream.get(before[i].model or "", before[i].model or ""))
        if a is None or b is None:
            continue
        scored += 1
        ok_now += a
        ok_before += b
    if not scored:
        return Quality(False, "no labels for the routed requests: quality not measured")
    text = f"accuracy {ok_now / scored:.1%} (before {ok_before / scored:.1%}) on {scored} labelled requests"
    return Quality(True, text, scored, ok_now, ok_before)


def build_stack(
    steps: Sequence[Step],
    runs: Sequence[StepRun],
    lines: Sequence[TrafficLine],
    *,
    correct_by_prompt: Mapping[str, Mapping[str, bool]] | None = None,
) -> StackReport:
    """`runs[k]` is the replay of `steps[k]` (an unchanged step may repeat the run before it)."""
    base = [o if o is not None else _NO_ROW for o in runs[0].outcomes]
    unrecorded = sum(o.unrecorded for o in base)
    report = StackReport(
        requests=len(lines),
        baseline_cost=sum((_cost(o) for o in base), _ZERO),
        layers=[],
        unrecorded=unrecorded,
        unpriced=0,
    )
    refused = [
        o
        for o, line in zip(base, lines, strict=True)
        if not o.ok and not o.unrecorded and line.outcome != "error"
    ]
    report.failed = len(refused)
    report.failed_example = refused[0].error if refused else None
    report.recorded_failures = sum(line.outcome == "error" for line in lines)
    deferred = [i for i, line in enumerate(lines) if line.outcome == "deferred"]
    report.recorded_deferred = len(deferred)
    report.recorded_deferred_unanswered = sum(lines[i].response is None for i in deferred)
    before = base
    for step, run in zip(steps[1:], runs[1:], strict=True):
        assert step.layer is not None
        cost_before = sum((_cost(o) for o in before), _ZERO)
        layer = LayerReport(step.layer, step.title, step.changed, cost_before, cost_before)
        if not step.changed:
            layer.notes.append("not in the candidate's settings")
            report.layers.append(layer)
            continue
        now: list[Outcome] = []
        missing: Counter[str] = Counter()
        for i, outcome in enumerate(run.outcomes):
            prior = before[i]
            if outcome is None:
                now.append(prior)
            elif outcome.unrecorded and not prior.unrecorded:
                missing[outcome.missing_model or "?"] += 1
                now.append(prior)  # not guessed: what the step before did
            else:
                now.append(outcome)
        layer.cost_after = sum((_cost(o) for o in now), _ZERO)
        # Requests whose cost this layer changed (up or down: an escalation costs more).
        layer.affected = sum(_cost(a) != _cost(b) for a, b in zip(now, before, strict=True))
        layer.uninformed = sum(missing.values())
        layer.uninformed_models = dict(missing.most_common())
        _describe(layer, lines, before, now, correct_by_prompt or {}, step)
        report.layers.append(layer)
        before = now
    report.unpriced = sum(o.cost is None and o.ok for o in before)
    report.recorded_failures_answered = sum(
        o.ok for o, line in zip(before, lines, strict=True) if line.outcome == "error"
    )
    return report


def _describe(
    layer: LayerReport,
    lines: Sequence[TrafficLine],
    before: Sequence[Outcome],
    now: Sequence[Outcome],
    correct_by_prompt: Mapping[str, Mapping[str, bool]],
    step: Step,
) -> None:
    key = layer.key
    newly = [i for i, (a, b) in enumerate(zip(now, before, strict=True)) if a.cache != b.cache]
    if key == "dedup":
        layer.detail["answered_by_dedup"] = sum(now[i].cache == "dedup" for i in newly)
        layer.quality = Quality(False, "same answers (a repeat gets the first request's answer)")
    elif key in ("exact_cache", "semantic_cache"):
        kind = "exact" if key == "exact_cache" else "semantic"
        hits = [i for i in newly if now[i].cache == kind]
        layer.detail["hits"] = len(hits)
        layer.quality = _hit_quality(lines, now, hits)
        if kind == "semantic" and not hits:
            floors = {r.semantic_cache.min_entries for r in step.settings.routes.values() if r.semantic_cache}
            layer.notes.append(
                "no paraphrase answered: a partition answers paraphrases only once it holds min_entries "
                f"({', '.join(f'{f:,}' for f in sorted(floors))}) entries, "
                "and repeats go to the exact cache first"
            )
    elif key == "context":
        trimmed = [i for i, o in enumerate(now) if o.context_saved > 0]
        layer.detail["requests_trimmed"] = len(trimmed)
        layer.detail["prompt_tokens_saved"] = sum(now[i].context_saved for i in trimmed)
        layer.quality = Quality(False, "not measured offline: nobody recorded answers to the trimmed prompts")
        if trimmed:
            layer.notes.append("output tokens of trimmed requests are the recorded ones (assumed unchanged)")
    elif key == "routing":
        upstream = {alias: m.upstream or alias for alias, m in step.settings.models.items()}
        moved = [i for i, (a, b) in enumerate(zip(now, before, strict=True)) if a.model != b.model]
        layer.detail["answered_by_another_model"] = len(moved)
        layer.detail["escalated"] = sum(o.escalated for o in now)
        layer.quality = _routing_quality(lines, before, now, correct_by_prompt, upstream)
    elif key == "batch":
        layer.detail["deferred_to_batch"] = sum(
            o.batch and not b.batch for o, b in zip(now, before, strict=True)
        )
        layer.quality = Quality(False, "same model, same prompt: answers as in real time, later")
    if layer.uninformed:
        wanting = ", ".join(f"{m} ({n})" for m, n in layer.uninformed_models.items())
        layer.notes.append(
            f"{layer.uninformed} requests the traffic cannot inform (no recorded output of {wanting}): "
            "counted at the previous layer's cost"
        )


__all__ = ["LayerReport", "Quality", "StackReport", "answer_labels", "build_stack"]
