"""Budgets: reserve a request's worst-case cost before the call, settle to the actual after it.

Hierarchical scopes (org, tenant, tenant feature, route), each with optional USD and token limits
per UTC day and month. `BudgetBook` is the in-process counter store; its check-and-reserve runs
without an await, so within one event loop concurrent requests cannot both take the last dollar.
`stores/redis_state.py` carries the same guarantee across replicas (one Lua script per reserve).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from thrifty.errors import BudgetExceeded
from thrifty.settings import BudgetSettings, Settings
from thrifty.stores.ports import (
    BudgetStore,
    CounterKey,
    Limit,
    Reservation,
    Scope,
    ScopeKind,
    Unit,
    Window,
    window_bounds,
)
from thrifty.types import decimal_text


def limits_of(scope: Scope, budget: BudgetSettings | None) -> list[Limit]:
    if budget is None:
        return []
    out = []
    for window, unit, value in (
        ("day", "usd", budget.usd_per_day),
        ("month", "usd", budget.usd_per_month),
        ("day", "tokens", budget.tokens_per_day),
        ("month", "tokens", budget.tokens_per_month),
    ):
        if value is not None:
            out.append(Limit(scope, window, unit, Decimal(value)))  # type: ignore[arg-type]
    return out


class BudgetPlan:
    """Which limits apply to a (tenant, feature, route), resolved from settings once."""

    def __init__(self, settings: Settings) -> None:
        self._org = limits_of(Scope("org", ""), settings.budget)
        self._tenant = {t: limits_of(Scope("tenant", t), s.budget) for t, s in settings.tenants.items()}
        self._feature = {
            (t, f): limits_of(Scope("feature", f"{t}/{f}"), fs.budget)
            for t, s in settings.tenants.items()
            for f, fs in s.features.items()
        }
        self._route = {r: limits_of(Scope("route", r), s.budget) for r, s in settings.routes.items()}

    @property
    def empty(self) -> bool:
        return not (
            self._org
            or any(self._tenant.values())
            or any(self._feature.values())
            or any(self._route.values())
        )

    def limits_for(self, tenant: str, feature: str | None, route: str | None) -> list[Limit]:
        limits = list(self._org)
        limits += self._tenant.get(tenant, [])
        if feature is not None:
            limits += self._feature.get((tenant, feature), [])
        if route is not None:
            limits += self._route.get(route, [])
        return limits


@dataclass(slots=True)
class BudgetBook:
    """Spent and reserved amounts per scope and window (in-process, single event loop)."""

    spent: dict[CounterKey, Decimal] = field(default_factory=dict)
    reserved: dict[CounterKey, Decimal] = field(default_factory=dict)

    def spent_in_window(self, limit: Limit, ts: float) -> tuple[float, Decimal]:
        start = window_bounds(ts, limit.window)[0]
        return start, self.spent.get((limit.scope, limit.window, start, limit.unit), Decimal(0))

    def remaining(self, limit: Limit, ts: float) -> Decimal:
        key = (limit.scope, limit.window, window_bounds(ts, limit.window)[0], limit.unit)
        return limit.amount - self.spent.get(key, Decimal(0)) - self.reserved.get(key, Decimal(0))

    def reserve(self, limits: Iterable[Limit], ts: float, usd: Decimal, tokens: int) -> Reservation:
        """All-or-nothing: reserve on every limit, or raise BudgetExceeded naming the first too small."""
        keys: list[CounterKey] = []
        for limit in limits:
            start, end = window_bounds(ts, limit.window)
            key = (limit.scope, limit.window, start, limit.unit)
            need = usd if limit.unit == "usd" else Decimal(tokens)
            left = limit.amount - self.spent.get(key, Decimal(0)) - self.reserved.get(key, Decimal(0))
            if need > left:
                raise BudgetExceeded(rejection(limit, left, need, end), resets_in_s=end - ts)
            keys.append(key)
        for key in keys:
            amount = usd if key[3] == "usd" else Decimal(tokens)
            self.reserved[key] = self.reserved.get(key, Decimal(0)) + amount
        return Reservation(keys, usd, tokens)

    def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> None:
        """Replace the reservation by what the request actually cost (zero when it failed early)."""
        if reservation.settled:
            return
        reservation.settled = True
        for key in reservation.keys:
            held = reservation.usd if key[3] == "usd" else Decimal(reservation.tokens)
            self.reserved[key] = self.reserved.get(key, Decimal(0)) - held
            self.spent[key] = self.spent.get(key, Decimal(0)) + (usd if key[3] == "usd" else Decimal(tokens))

    def load(self, spent: dict[CounterKey, Decimal]) -> None:
        """Add counters rebuilt from the ledger (once, at start)."""
        for key, amount in spent.items():
            self.spent[key] = self.spent.get(key, Decimal(0)) + amount


SpendRow = tuple[float, str, str | None, str | None, Any, int]  # ts, tenant, feature, route, cost, tokens


def spend_totals(rows: Iterable[SpendRow], plan: BudgetPlan, now: float) -> dict[CounterKey, Decimal]:
    """This month's (and today's) spent amounts per counter, summed from ledger rows."""
    day_start, _ = window_bounds(now, "day")
    month_start, _ = window_bounds(now, "month")
    out: dict[CounterKey, Decimal] = {}
    for ts, tenant, feature, route, cost, tokens in rows:
        if ts < month_start:
            continue
        for limit in plan.limits_for(tenant, feature, route):
            if limit.window == "day" and ts < day_start:
                continue
            key = (limit.scope, limit.window, window_bounds(ts, limit.window)[0], limit.unit)
            amount = Decimal(cost or 0) if limit.unit == "usd" else Decimal(tokens)
            out[key] = out.get(key, Decimal(0)) + amount
    return out


def rejection(limit: Limit, left: Decimal, need: Decimal, resets: float) -> str:
    when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    per = "daily" if limit.window == "day" else "monthly"
    if limit.unit == "usd":
        amounts = (
            f"limit ${decimal_text(limit.amount)}, ${decimal_text(max(left, Decimal(0)))} left, "
            f"this request may cost up to ${decimal_text(need)}"
        )
    else:
        amounts = (
            f"limit {limit.amount} tokens, {max(left, Decimal(0))} left, this request may use up to {need}"
        )
    return (
        f"{limit.scope.describe()} {per} {limit.unit} budget is exhausted ({amounts}); it resets at {when}. "
        "Lower max_tokens, wait for the reset, or raise the budget."
    )


def tightest_usd(limits: Iterable[Limit], book: BudgetStore, ts: float) -> str | None:
    """The smallest USD amount left among the limits, for the x-thrifty-budget-remaining header."""
    return tightest_of([(limit, book.remaining(limit, ts)) for limit in limits if limit.unit == "usd"])


def tightest_of(left: Iterable[tuple[Limit, Decimal]]) -> str | None:
    """The header text for the smallest USD amount left among (limit, left) pairs."""
    best: tuple[Decimal, Limit] | None = None
    for limit, amount in left:
        if limit.unit == "usd" and (best is None or amount < best[0]):
            best = (amount, limit)
    if best is None:
        return None
    amount, limit = best
    scope = f"{limit.scope.kind}:{limit.scope.name}"
    return f"{decimal_text(max(amount, Decimal(0)))}; scope={scope}; window={limit.window}"


__all__ = [
    "BudgetBook",
    "BudgetPlan",
    "CounterKey",
    "Limit",
    "Reservation",
    "Scope",
    "ScopeKind",
    "Unit",
    "Window",
    "rejection",
    "spend_totals",
    "tightest_of",
    "tightest_usd",
    "window_bounds",
]
