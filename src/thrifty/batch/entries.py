"""The ledger rows of batch items: one per item, priced at batch rates, `batch = true`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from thrifty.batch.lines import LineError
from thrifty.batch.store import Item
from thrifty.types import Attempt, LedgerEntry, Usage

_ZERO = Decimal(0)


def refused_entry(
    request_id: str, tenant: str, tags: dict[str, Any], err: LineError, ts: float
) -> LedgerEntry:
    """The ledger row of a line refused before any call: every line is accounted for."""
    return LedgerEntry(
        request_id=request_id,
        ts=ts,
        tenant_id=tenant,
        user=tags.get("user"),
        feature=tags.get("feature"),
        route=tags.get("route"),
        prompt_version=tags.get("prompt_version"),
        model=None,
        provider=None,
        attempts=(),
        usage=Usage(),
        cost_usd=_ZERO,
        saved_usd=None,
        cache="miss",
        escalated=False,
        retries=0,
        status="error",
        error=err.message,
        http_status=403 if err.code == "model_not_allowed" else 400,
        latency_ms=0.0,
        ttft_ms=None,
        idempotency_key=None,
        batch=True,
    )


def result_entry(
    item: Item,
    tenant: str,
    tags: dict[str, Any],
    *,
    ok: bool,
    status_code: int,
    usage: Usage,
    cost: Decimal | None,
    realtime: Decimal | None,
    error: str | None,
    ts: float,
) -> LedgerEntry:
    assert item.model is not None and item.provider is not None
    latency = (ts - item.created_at) * 1000.0
    attempts = (
        (Attempt(item.model, item.provider, status_code, usage, cost, latency, error),) if status_code else ()
    )
    return LedgerEntry(
        request_id=item.request_id,
        ts=item.created_at,
        tenant_id=tenant,
        user=tags.get("user"),
        feature=tags.get("feature"),
        route=item.route,
        prompt_version=tags.get("prompt_version"),
        model=item.model,
        provider=item.provider,
        attempts=attempts,
        usage=usage,
        cost_usd=cost,
        # What batch pricing saved against the same call in real time.
        saved_usd=None if cost is None or realtime is None else realtime - cost,
        cache="miss",
        escalated=False,
        retries=0,
        status="ok" if ok else "error",
        error=error,
        http_status=status_code or 499,
        latency_ms=latency,
        ttft_ms=None,
        idempotency_key=tags.get("idempotency_key"),
        batch=True,
    )
