"""A feature's month-to-date from the ledger: the averages `thrifty estimate --from-ledger` uses and
the spend the month is forecast from. Pure: it folds the rows the LedgerReader port returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson


def attempts_of(stored: Any) -> list[dict[str, Any]]:
    """A ledger row's attempts: JSON text (SQLite) or an already parsed list (PostgreSQL)."""
    if isinstance(stored, str | bytes):
        parsed = orjson.loads(stored)
        return parsed if isinstance(parsed, list) else []
    return list(stored or [])


@dataclass(slots=True)
class FeatureUsage:
    requests: int = 0
    upstream: int = 0  # requests that called a provider (not answered by a cache or a repeat)
    semantic: int = 0  # answered by the semantic cache
    input_tokens: int = 0  # of the upstream requests
    cached_input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    batch: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)
    unpriced: int = 0
    models: Counter[str] = field(default_factory=Counter)
    cost_by_tenant: dict[str, Decimal] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        """The model that answered most of the upstream requests."""
        common = self.models.most_common(1)
        return common[0][0] if common else None


def summarise(rows: Iterable[tuple[Any, ...]]) -> FeatureUsage:
    usage = FeatureUsage()
    for ts, tenant, _feature, model, cache, batch, _status, cost, inp, cached, out, retries, _att in rows:
        del ts
        usage.requests += 1
        amount = Decimal(cost) if cost is not None else Decimal(0)
        if cost is None:
            usage.unpriced += 1
        usage.cost_usd += amount
        usage.cost_by_tenant[tenant] = usage.cost_by_tenant.get(tenant, Decimal(0)) + amount
        if cache != "miss":
            usage.semantic += cache == "semantic"
            continue
        usage.upstream += 1
        usage.input_tokens += inp
        usage.cached_input_tokens += cached
        usage.output_tokens += out
        usage.retries += retries
        usage.batch += bool(batch)
        if model is not None:
            usage.models[model] += 1
    return usage


def month_bounds(as_of: float) -> tuple[float, float, int]:
    """(start of as_of's UTC month, start of the next, days in the month)."""
    moment = datetime.fromtimestamp(as_of, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.timestamp(), nxt.timestamp(), (nxt - start).days


def spec_values(usage: FeatureUsage, elapsed_days: Decimal, days_in_month: int) -> dict[str, Any]:
    """The feature spec's measured fields, from the month to date."""
    if usage.upstream == 0:
        return {}
    upstream = Decimal(usage.upstream)
    values: dict[str, Any] = {
        "avg_input_tokens": Decimal(usage.input_tokens) / upstream,
        "avg_output_tokens": Decimal(usage.output_tokens) / upstream,
        "requests_per_day": Decimal(usage.requests) / elapsed_days,
        "days_per_month": Decimal(days_in_month),
        "cache_hit_rate": Decimal(usage.requests - usage.upstream - usage.semantic) / Decimal(usage.requests),
        "semantic_hit_rate": Decimal(usage.semantic) / Decimal(usage.upstream + usage.semantic),
        "retry_factor": 1 + Decimal(usage.retries) / upstream,
        "prompt_cache_share": Decimal(usage.cached_input_tokens) / Decimal(usage.input_tokens)
        if usage.input_tokens
        else Decimal(0),
    }
    if usage.batch:
        values["batch_share"] = Decimal(usage.batch) / upstream
        values["latency_class"] = "deferrable"
    if usage.model is not None:
        values["model"] = usage.model
    return values
