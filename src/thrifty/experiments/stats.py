"""Per-arm numbers of an experiment, from its ledger rows joined with their feedback (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from thrifty.experiments.stoprule import StopDecision, decide
from thrifty.experiments.store import VariantRow
from thrifty.settings import ExperimentSettings, StopRuleSettings
from thrifty.types import decimal_text

DEFAULT_FAILURE_LABELS = ("wrong", "bad", "cache_wrong")


@dataclass(frozen=True, slots=True)
class FailureRule:
    """What makes a request a failure: an error, `correct: false`, a failure label, a low score."""

    labels: frozenset[str] = frozenset(DEFAULT_FAILURE_LABELS)
    min_score: float | None = None

    @classmethod
    def of(cls, experiment: ExperimentSettings | None) -> FailureRule:
        if experiment is None:
            return cls()
        return cls(frozenset(experiment.failure_labels), experiment.min_score)

    def failed(self, row: VariantRow) -> bool:
        if row.status != "ok" or row.correct is False:
            return True
        if row.label is not None and row.label in self.labels:
            return True
        return self.min_score is not None and row.score is not None and row.score < self.min_score


@dataclass(slots=True)
class ArmStats:
    variant: str
    requests: int = 0
    failures: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)
    unpriced: int = 0
    escalated: int = 0
    feedback: int = 0
    score_sum: float = 0.0
    scored: int = 0

    @property
    def successes(self) -> int:
        return self.requests - self.failures

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    @property
    def cost_per_success(self) -> Decimal | None:
        return self.cost_usd / self.successes if self.successes else None

    def to_json(self) -> dict[str, Any]:
        cps = self.cost_per_success
        return {
            "variant": self.variant,
            "requests": self.requests,
            "failures": self.failures,
            "success_rate": None if self.success_rate is None else round(self.success_rate, 6),
            "cost_usd": decimal_text(self.cost_usd),
            "cost_per_success_usd": None if cps is None else decimal_text(cps.quantize(Decimal("1e-12"))),
            "unpriced_requests": self.unpriced,
            "escalation_rate": round(self.escalated / self.requests, 6) if self.requests else None,
            "feedback": self.feedback,
            "feedback_score": round(self.score_sum / self.scored, 6) if self.scored else None,
        }


def arm_stats(rows: Iterable[VariantRow], rule: FailureRule, arms: Sequence[str] = ()) -> dict[str, ArmStats]:
    out = {name: ArmStats(name) for name in arms}
    for row in rows:
        s = out.get(row.variant)
        if s is None:
            s = out[row.variant] = ArmStats(row.variant)
        s.requests += 1
        s.failures += rule.failed(row)
        if row.cost_usd is None:
            s.unpriced += 1
        else:
            s.cost_usd += Decimal(row.cost_usd)
        s.escalated += row.escalated
        if row.score is not None or row.label is not None or row.correct is not None:
            s.feedback += 1
        if row.score is not None:
            s.score_sum += row.score
            s.scored += 1
    return out


def stop_decisions(
    stats: dict[str, ArmStats], baseline: str, rule: StopRuleSettings
) -> dict[str, StopDecision]:
    """The stop rule for every arm against the baseline."""
    base = stats.get(baseline) or ArmStats(baseline)
    return {
        name: decide(
            s.failures,
            s.requests,
            base.failures,
            base.requests,
            margin=rule.margin,
            alpha=rule.alpha,
            tau=rule.tau,
            min_requests=rule.min_requests,
        )
        for name, s in stats.items()
        if name != baseline
    }


__all__ = ["ArmStats", "FailureRule", "arm_stats", "stop_decisions"]
