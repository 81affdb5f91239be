"""The experiment store port and the values it speaks in: feedback joined to its ledger row, each
route's arms as promote / stop / a release step left them, the log of those actions and release
plans. The embedded default keeps them in the SQLite file (`sqlite_store.py`); several replicas
share them in PostgreSQL (`postgres_store.py`); `stores.factory.open_experiment_store` picks one
by `storage.url`, and nothing else knows which.

The port is synchronous (the CLI calls it directly, the gateway on a worker thread), and an
implementation is safe to call from several threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    """What feedback needs to know about the request it is about."""

    request_id: str
    tenant_id: str
    route: str | None
    variant: str | None
    model: str | None
    cache: str
    status: str


@dataclass(frozen=True, slots=True)
class Feedback:
    """Feedback on one request, joined to its ledger row (what observers receive)."""

    request_id: str
    tenant_id: str
    ts: float
    route: str | None
    variant: str | None
    model: str | None
    cache: str  # how the request was answered: miss | exact | semantic | dedup
    score: float | None = None
    label: str | None = None
    correct: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "route": self.route,
            "variant": self.variant,
            "model": self.model,
            "cache": self.cache,
            "score": self.score,
            "label": self.label,
            "correct": self.correct,
        }


Stored = Literal["new", "changed", "same"]


@dataclass(frozen=True, slots=True)
class VariantRow:
    """One request of an experiment with its feedback, for the per-variant statistics."""

    ts: float
    variant: str
    status: str
    cost_usd: str | None
    escalated: bool
    score: float | None
    label: str | None
    correct: bool | None


@dataclass(frozen=True, slots=True)
class Action:
    ts: float
    route: str
    action: str
    variant: str | None
    reason: str
    details: dict[str, Any] | None


class ExperimentStore(Protocol):
    def close(self) -> None: ...

    def ledger_facts(self, request_id: str) -> LedgerFacts | None:
        """The ledger row's facts for feedback, whichever tenant it belongs to (the caller checks)."""
        ...

    def put_feedback(self, fb: Feedback) -> Stored:
        """One row per request, atomically: the first is "new", a repeat with the same content
        "same" (nothing written), one with other content "changed" (replaced, still one row)."""
        ...

    def feedback_count(self) -> int: ...

    def variant_rows(self, route: str, since: float | None = None) -> list[VariantRow]:
        """The route's requests that had a variant, oldest first, each with its feedback."""
        ...

    def states(self) -> dict[str, dict[str, Any]]:
        """Every route's stored arms (what a gateway applies at start and on each refresh)."""
        ...

    def state(self, route: str) -> dict[str, Any] | None: ...

    def record(
        self,
        route: str,
        action: str,
        reason: str,
        *,
        variant: str | None = None,
        details: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        release: dict[str, Any] | None = None,
        clear_release: bool = False,
    ) -> None:
        """Log an action and, in the same transaction, the arms and release plan it leaves."""
        ...

    def actions(self, route: str) -> list[Action]:
        """The route's recorded actions, oldest first."""
        ...

    def release(self, route: str) -> dict[str, Any] | None: ...


__all__ = ["Action", "ExperimentStore", "Feedback", "LedgerFacts", "Stored", "VariantRow"]
