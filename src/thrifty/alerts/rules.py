"""Pure alert rules: which alerts the numbers call for. Storage and delivery live elsewhere."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.stores.ports import Limit
from thrifty.types import decimal_text

_PER = {"day": "daily", "month": "monthly"}


@dataclass(frozen=True, slots=True)
class Alert:
    key: str  # unique per alert and window: the same key never fires twice
    kind: str
    scope: str
    message: str
    data: Mapping[str, Any]

    def payload(self) -> dict[str, Any]:
        # Slack's incoming webhooks read `text`; other receivers get the structured part too.
        return {
            "text": f"thrifty: {self.message}",
            "thrifty": {"kind": self.kind, "scope": self.scope, **self.data},
        }


def budget_alerts(
    limit: Limit, window_start: float, spent: Decimal, thresholds: Iterable[float]
) -> list[Alert]:
    """An alert for every threshold the spent share of a budget has reached in this window."""
    if limit.amount <= 0:
        return []
    share = spent / limit.amount
    scope = f"{limit.scope.kind}:{limit.scope.name}"
    out = []
    for threshold in sorted(thresholds):
        if share >= Decimal(str(threshold)):
            pct = int(threshold * 100)
            amount = (
                f"${decimal_text(spent)} of ${decimal_text(limit.amount)}"
                if limit.unit == "usd"
                else (f"{spent} of {limit.amount} tokens")
            )
            out.append(
                Alert(
                    key=f"budget|{scope}|{limit.window}|{limit.unit}|{window_start:.0f}|{pct}",
                    kind="budget_threshold",
                    scope=scope,
                    message=f"{limit.scope.describe()} has used {pct}% of its {_PER[limit.window]} "
                    f"{limit.unit} budget ({amount})",
                    data={
                        "threshold": threshold,
                        "window": limit.window,
                        "unit": limit.unit,
                        "spent": decimal_text(spent) if limit.unit == "usd" else str(spent),
                        "limit": decimal_text(limit.amount),
                    },
                )
            )
    return out


def spike(
    kind: str,
    scope: str,
    hour_start: float,
    current: float,
    same_hour_before: list[float],
    factor: float,
    what: str,
    *,
    min_current: float = 0.0,
) -> Alert | None:
    """`current` above `factor` x the median of the same hour on previous days (zeros included)."""
    if len(same_hour_before) < 3 or current <= min_current:
        return None  # too little history to call anything unusual
    median = statistics.median(same_hour_before)
    if median <= 0 or current <= factor * median:
        return None
    return Alert(
        key=f"{kind}|{scope}|{hour_start:.0f}",
        kind=kind,
        scope=scope,
        message=f"{scope}: {what} in the last hour is {current:g}, {current / median:.1f}x the median of "
        f"the same hour over the previous {len(same_hour_before)} days ({median:g})",
        data={"current": current, "median": median, "factor": factor, "hour_start": hour_start},
    )


def escalation_drift(
    route: str,
    window_start: float,
    escalated: int,
    total: int,
    expected: float,
    margin: float,
    *,
    min_requests: int,
) -> Alert | None:
    """A trained route escalating far more (or less) than it was calibrated to: its traffic no
    longer looks like the labels it was trained on, and it needs new ones. None below
    `min_requests` in the window (a handful of requests says nothing about a rate)."""
    if total < min_requests or total <= 0:
        return None
    rate = escalated / total
    if abs(rate - expected) <= margin:
        return None
    direction = "more" if rate > expected else "less"
    return Alert(
        key=f"escalation_drift|route:{route}|{window_start:.0f}",
        kind="escalation_drift",
        scope=f"route:{route}",
        message=f"route {route!r} escalated {rate:.1%} of {total} requests, {direction} than the "
        f"{expected:.1%} its router was calibrated for (margin {margin:.0%}): relabel recent traffic "
        "and retrain (`thrifty route train`)",
        data={
            "rate": rate,
            "expected": expected,
            "margin": margin,
            "requests": total,
            "escalated": escalated,
            "window_start": window_start,
        },
    )
