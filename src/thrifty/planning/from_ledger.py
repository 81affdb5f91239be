"""`thrifty estimate --from-ledger --feature F`: the feature's averages and month to date, read from
the ledger through the LedgerReader port, and the month's forecast against the feature budgets."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.planning import calculators as calc
from thrifty.planning.estimate import ForecastRow
from thrifty.planning.ledger_usage import month_bounds, spec_values, summarise
from thrifty.settings import Settings
from thrifty.stores.ports import LedgerReader


@dataclass(frozen=True, slots=True)
class LedgerInputs:
    values: dict[str, Any]  # feature spec fields measured in the ledger
    forecasts: tuple[ForecastRow, ...]
    note: str


def _budget(settings: Settings | None, tenant: str, feature: str) -> Decimal | None:
    if settings is None or tenant not in settings.tenants:
        return None
    found = settings.tenants[tenant].features.get(feature)
    return None if found is None or found.budget is None else found.budget.usd_per_month


def ledger_inputs(
    reader: LedgerReader, settings: Settings | None, feature: str, tenant: str | None, as_of: float
) -> LedgerInputs:
    start, _end, days = month_bounds(as_of)
    rows = [r for r in reader.usage_rows(start, as_of, feature) if tenant is None or r[1] == tenant]
    usage = summarise(rows)
    if usage.requests == 0:
        who = f" of tenant {tenant!r}" if tenant else ""
        raise ThriftyError(
            f"no requests of feature {feature!r}{who} in the ledger this month (since "
            f"{_day(start)}): check --feature (the x-thrifty-feature header), --tenant and --as-of"
        )
    if usage.upstream == 0:
        raise ThriftyError(
            f"every request of feature {feature!r} this month was answered without an upstream call "
            "(cache hits, repeats): there are no token averages to estimate from"
        )
    elapsed = Decimal(str(as_of - start)) / Decimal(86_400)
    tenants = sorted(usage.cost_by_tenant)
    forecasts = tuple(
        ForecastRow(
            t, calc.month_forecast(usage.cost_by_tenant[t], elapsed, days, _budget(settings, t, feature))
        )
        for t in tenants
    )
    note = (
        f"from the ledger: {usage.requests:,} requests of {feature!r} since {_day(start)} "
        f"({usage.upstream:,} upstream, {usage.requests - usage.upstream:,} answered by caches or repeats)"
    )
    if usage.unpriced:
        note += f"; {usage.unpriced:,} unpriced (cost NULL) are not in the month to date"
    return LedgerInputs(spec_values(usage, elapsed, days), forecasts, note)


def _day(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
