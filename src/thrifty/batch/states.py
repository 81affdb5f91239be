"""The states of a batch job (OpenAI's) and of its items, and how counts decide the job's state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

JobStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]
ItemState = Literal["queued", "submitted", "done", "failed", "expired", "cancelled"]

JOB_FINAL: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
ITEM_OPEN: frozenset[str] = frozenset({"queued", "submitted"})
ITEM_FINAL: frozenset[str] = frozenset({"done", "failed", "expired", "cancelled"})
# The timestamp column each job status sets when entered.
STATUS_TIME = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


def next_status(current: str, counts: Mapping[str, int]) -> str:
    """The job's status once its items are as counted (a final status never changes)."""
    if current in JOB_FINAL or current == "validating":
        return current
    open_items = sum(counts.get(s, 0) for s in ITEM_OPEN)
    if open_items:
        return current
    if current == "cancelling":
        return "cancelled"
    if counts.get("expired", 0):
        return "expired"
    return "completed"


def request_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """OpenAI's request_counts: completed are the answered lines, failed everything else that ended."""
    total = sum(counts.values())
    return {
        "total": total,
        "completed": counts.get("done", 0),
        "failed": counts.get("failed", 0) + counts.get("expired", 0) + counts.get("cancelled", 0),
    }
