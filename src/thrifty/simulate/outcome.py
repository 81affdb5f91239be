"""What one step of a replay says about one traffic line (from its ledger entry)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

_MISSING_OUTPUT = re.compile(r"no output of model '([^']+)'")


def context_saved(report: dict[str, Any] | None) -> int:
    """Prompt tokens a context report says the stage took out (0 without a report or a change)."""
    if not report:
        return 0
    before, after = report.get("before") or {}, report.get("after") or {}
    if not after:
        return 0
    return max(
        0,
        sum(v for v in before.values() if isinstance(v, int))
        - sum(v for v in after.values() if isinstance(v, int)),
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the ledger says about one traffic line in one step."""

    cost: Decimal | None
    ok: bool
    cache: str
    model: str | None
    escalated: bool
    batch: bool
    error: str | None
    context_saved: int  # prompt tokens the context stage took out
    # The label of the answer served (the traffic's label of the request whose recorded answer it
    # is): what scores cache hits. The text itself is not kept (100,000 answers x every step).
    answer_label: str | None

    @property
    def unrecorded(self) -> bool:
        """Failed because no recording answers it: the replay cannot say what this would cost."""
        return not self.ok and self.error is not None and "replay provider" in self.error

    @property
    def missing_model(self) -> str | None:
        if not self.unrecorded or self.error is None:
            return None
        found = _MISSING_OUTPUT.search(self.error)
        return found.group(1) if found else (self.model or "any model")


__all__ = ["Outcome", "context_saved"]
