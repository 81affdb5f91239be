"""Ledger entries for tests that write the ledger directly (reports, alerts, the writer)."""

from __future__ import annotations

import time
from decimal import Decimal

from thrifty.types import Attempt, LedgerEntry, RequestStatus, Usage


def ledger_entry(
    request_id: str,
    *,
    ts: float | None = None,
    tenant: str = "t",
    feature: str | None = None,
    prompt_version: str | None = None,
    usage: Usage | None = None,
    cost: str | None = "0.1",
    failed_attempt_costs: tuple[str, ...] = (),
    status: RequestStatus = "ok",
) -> LedgerEntry:
    """One request: failed attempts (if any) costing what is given, then the one that answered."""
    usage = usage or Usage(input_tokens=10, output_tokens=2)
    failed = [Attempt("m", "p", 500, Usage(), Decimal(c), 1.0, "boom") for c in failed_attempt_costs]
    last = Attempt("m", "p", 200, usage, None if cost is None else Decimal(cost), 1.0)
    total = (
        None if cost is None else Decimal(cost) + sum((Decimal(c) for c in failed_attempt_costs), Decimal(0))
    )
    return LedgerEntry(
        request_id=request_id,
        ts=time.time() if ts is None else ts,
        tenant_id=tenant,
        user=None,
        feature=feature,
        route=None,
        prompt_version=prompt_version,
        model="m",
        provider="p",
        attempts=(*failed, last),
        usage=usage,
        cost_usd=total,
        saved_usd=None,
        cache="miss",
        escalated=False,
        retries=len(failed_attempt_costs),
        status=status,
        error=None,
        http_status=200 if status == "ok" else 502,
        latency_ms=1.0,
        ttft_ms=None,
        idempotency_key=None,
    )
