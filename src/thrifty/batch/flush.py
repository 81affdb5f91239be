"""When queued items become a provider batch: by size or by age (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QueueGroup:
    """Queued items that can share one provider batch (one provider, one model)."""

    provider: str
    model: str
    queue: str  # a file job's own id (its lines stay together), or "defer" (deferred requests share)
    count: int
    flush_at: float  # the earliest time any of them asked to be sent by
    flush_size: int  # the smallest max_batch any of them asked for


def due(groups: Iterable[QueueGroup], now: float) -> list[QueueGroup]:
    return [g for g in groups if g.count >= g.flush_size or g.flush_at <= now]


def next_wake(groups: Iterable[QueueGroup], now: float, ceiling: float) -> float:
    """Seconds until the next group comes due by age (at most `ceiling`)."""
    waits = [max(0.0, g.flush_at - now) for g in groups]
    return min([ceiling, *waits])
