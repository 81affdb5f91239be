"""What the dashboard shows, as JSON-ready dicts: read through the ReportingStore port, never
formatted here. The HTML page and the /dashboard/api endpoints are both built from these, so
what a chart draws and what the API returns are the same numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from thrifty.errors import InvalidRequest, PermissionDenied
from thrifty.guard.budgets import Limit, Scope, limits_of, window_bounds
from thrifty.report import ReportRow, totals
from thrifty.settings import Settings
from thrifty.stores.reporting import Bucket, BudgetUse, ReportingStore, SeriesPoint, Window
from thrifty.stores.rollups import DAY, HOUR
from thrifty.types import decimal_text

DIMENSIONS = ("tenant", "feature", "route", "prompt_version", "model", "user")
TOP_DIMENSIONS = ("feature", "tenant", "user")
RANGES: dict[str, int | None] = {"24h": 24, "7d": 7 * 24, "30d": 30 * 24, "90d": 90 * 24, "all": None}
# Stacks beyond this many groups are drawn as one "other" band (the tables list every group).
MAX_STACKS = 8


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: an admin (every tenant) or one tenant's virtual key."""

    tenant: str | None  # None: admin

    @property
    def admin(self) -> bool:
        return self.tenant is None


@dataclass(frozen=True, slots=True)
class Query:
    by: str
    bucket: Bucket
    range_name: str
    window: Window
    top_n: int
    limit: int
    before: tuple[float, str] | None  # the explorer's keyset cursor: (ts, request_id) of the last row


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hour_param(params: Mapping[str, str], name: str, *, up: bool) -> float | None:
    text = params.get(name)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{name}={text!r} is not a time; give an ISO time such as 2026-11-30T14:00Z", param=name
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ts = parsed.timestamp()
    # Rollups answer whole hours: a window is widened to the hours it touches (shown on the page).
    return (-(-ts // HOUR) if up else ts // HOUR) * HOUR


def parse_query(params: Mapping[str, str], viewer: Viewer, settings: Settings, now: float) -> Query:
    by = params.get("by") or "feature"
    if by not in DIMENSIONS:
        raise InvalidRequest(f"by must be one of {', '.join(DIMENSIONS)}", param="by")
    range_name = params.get("range") or "7d"
    if range_name not in RANGES:
        raise InvalidRequest(f"range must be one of {', '.join(RANGES)}", param="range")
    hours = RANGES[range_name]
    until: float | None = (now // HOUR + 1) * HOUR
    since: float | None = None if hours is None or until is None else until - hours * HOUR
    if hours is None:
        until = None
    given_since, given_until = _hour_param(params, "from", up=False), _hour_param(params, "to", up=True)
    if given_since is not None or given_until is not None:
        range_name = "custom"
        since, until = given_since, given_until
        if since is not None and until is not None and since >= until:
            raise InvalidRequest("from must be before to", param="from")
    bucket = params.get("bucket") or ("hour" if hours is not None and hours <= 48 else "day")
    if bucket not in ("hour", "day"):
        raise InvalidRequest("bucket must be hour or day", param="bucket")
    tenant = params.get("tenant") or None
    if not viewer.admin:
        if tenant is not None and tenant != viewer.tenant:
            raise PermissionDenied(
                "a tenant's key sees its own tenant only; use an admin key to see others",
                code="tenant_not_allowed",
            )
        tenant = viewer.tenant
    elif tenant is not None and tenant not in settings.tenants:
        raise InvalidRequest(f"unknown tenant {tenant!r}", param="tenant")
    return Query(
        by=by,
        bucket="day" if bucket == "day" else "hour",
        range_name=range_name,
        window=Window(since, until, tenant),
        top_n=_int_param(params, "n", settings.dashboard.top_n),
        limit=_int_param(params, "limit", settings.dashboard.explorer_rows),
        before=_cursor(params),
    )


def _int_param(params: Mapping[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise InvalidRequest(f"{name} must be a whole number from 1 to 1000", param=name)
    return int(text)


def _cursor(params: Mapping[str, str]) -> tuple[float, str] | None:
    ts = _float_param(params, "before")
    if ts is None:
        return None
    # Without before_id (an older link): every row at that very time counts as shown.
    return ts, params.get("before_id") or ""


def _float_param(params: Mapping[str, str], name: str) -> float | None:
    text = params.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a unix time in seconds", param=name) from None


def window_json(query: Query) -> dict[str, Any]:
    w = query.window
    return {
        "since": w.since,
        "until": w.until,
        "since_iso": _iso(w.since),
        "until_iso": _iso(w.until),
        "tenant": w.tenant,
        "range": query.range_name,
    }


def _summary_of(points: list[SeriesPoint]) -> list[ReportRow]:
    """The series' points summed per group: the summary rows, without reading the rollups again."""
    per_group: dict[str | None, list[ReportRow]] = {}
    for p in points:
        per_group.setdefault(p.row.group, []).append(p.row)
    rows = []
    for group, parts in per_group.items():
        row = totals(parts)
        row.group = group
        rows.append(row)
    return sorted(rows, key=lambda r: (-r.cost_usd, r.group is None, r.group or ""))


async def summary(
    store: ReportingStore, query: Query, by: str | None = None, points: list[SeriesPoint] | None = None
) -> dict[str, Any]:
    """Rows by one dimension and their total: the shape and numbers of `thrifty report --format json`."""
    by = by or query.by
    rows = _summary_of(points) if points is not None else await store.rollup_by(by, query.window)
    return {
        "window": window_json(query),
        "by": by,
        "rows": [r.to_json() for r in rows],
        "total": totals(rows).to_json(),
    }


async def series(
    store: ReportingStore, query: Query, by: str | None = None, points: list[SeriesPoint] | None = None
) -> dict[str, Any]:
    """Spend, requests and 429s per hour or day, one series per group (all groups; the chart
    merges the smallest into one band)."""
    by = by or query.by
    if points is None:
        points = await store.rollup_series(by, query.bucket, query.window)
    buckets = sorted({p.bucket for p in points})
    index = {b: i for i, b in enumerate(buckets)}
    groups: dict[str | None, dict[str, Any]] = {}
    spend: dict[str | None, Decimal] = {}
    for p in points:
        g = groups.get(p.row.group)
        if g is None:
            g = groups[p.row.group] = {
                "group": p.row.group,
                "cost_usd": ["0"] * len(buckets),
                "requests": [0] * len(buckets),
                "budget_rejections": [0] * len(buckets),
            }
            spend[p.row.group] = Decimal(0)
        i = index[p.bucket]
        g["cost_usd"][i] = decimal_text(p.row.cost_usd)
        g["requests"][i] = p.row.requests
        g["budget_rejections"][i] = p.row.rejected_budget
        spend[p.row.group] += p.row.cost_usd
    ordered = sorted(
        groups.values(), key=lambda g: (-spend[g["group"]], g["group"] is None, g["group"] or "")
    )
    for g in ordered:
        g["total_cost_usd"] = decimal_text(spend[g["group"]])
    return {
        "window": window_json(query),
        "by": by,
        "bucket": query.bucket,
        "buckets": buckets,
        "buckets_iso": [_iso(b) for b in buckets],
        "series": ordered,
        "budget_rejections": [sum(g["budget_rejections"][i] for g in ordered) for i in range(len(buckets))],
    }


def _top_json(row: ReportRow) -> dict[str, Any]:
    full = row.to_json()
    return {k: full[k] for k in ("group", "requests", "ok", "cost_usd", "cost_per_success_usd")}


async def top(store: ReportingStore, query: Query) -> dict[str, Any]:
    """The most expensive features, tenants and users: requests, successes, cost, cost per success."""
    found = await asyncio.gather(*(store.rollup_top(by, query.window, query.top_n) for by in TOP_DIMENSIONS))
    return {
        "window": window_json(query),
        "n": query.top_n,
        **{by: [_top_json(r) for r in rows] for by, rows in zip(TOP_DIMENSIONS, found, strict=True)},
    }


def visible_limits(settings: Settings, viewer: Viewer) -> list[Limit]:
    """Budgets a viewer may see: an admin all; a tenant its own and its features' (org and route
    budgets sum other tenants' spend, so they are not shown to a tenant)."""
    limits: list[Limit] = []
    if viewer.admin:
        limits += limits_of(Scope("org", ""), settings.budget)
    for tenant, t in settings.tenants.items():
        if not viewer.admin and tenant != viewer.tenant:
            continue
        limits += limits_of(Scope("tenant", tenant), t.budget)
        for feature, f in t.features.items():
            limits += limits_of(Scope("feature", f"{tenant}/{feature}"), f.budget)
    if viewer.admin:
        for route, r in settings.routes.items():
            limits += limits_of(Scope("route", route), r.budget)
    return limits


async def budgets(store: ReportingStore, settings: Settings, viewer: Viewer, now: float) -> dict[str, Any]:
    limits = visible_limits(settings, viewer)
    uses = await asyncio.gather(*(_budget_use(store, settings, limit, now) for limit in limits))
    out = []
    for limit, use in zip(limits, uses, strict=True):
        start, end = window_bounds(now, limit.window)
        used = use.usd if limit.unit == "usd" else Decimal(use.tokens)
        out.append(
            {
                "scope": f"{limit.scope.kind}:{limit.scope.name}",
                "window": limit.window,
                "unit": limit.unit,
                "limit": decimal_text(limit.amount),
                "used": decimal_text(used),
                "remaining": decimal_text(max(limit.amount - used, Decimal(0))),
                "used_share": round(float(used / limit.amount), 6) if limit.amount else None,
                "window_start_iso": _iso(start),
                "resets_at_iso": _iso(end),
            }
        )
    return {"budgets": out}


async def _budget_use(store: ReportingStore, settings: Settings, limit: Limit, now: float) -> BudgetUse:
    """One budget's use in its current window (all budgets of a page are read at once)."""
    start, _ = window_bounds(now, limit.window)
    tenant = feature = route = None
    if limit.scope.kind == "tenant":
        tenant = limit.scope.name
    elif limit.scope.kind == "feature":
        tenant, _, feature = limit.scope.name.partition("/")
        # A tenant id may itself hold a "/": the settings know which split is real.
        for t, ts in settings.tenants.items():
            if limit.scope.name.startswith(t + "/") and limit.scope.name[len(t) + 1 :] in ts.features:
                tenant, feature = t, limit.scope.name[len(t) + 1 :]
    elif limit.scope.kind == "route":
        route = limit.scope.name
    return await store.budget_use(start, tenant=tenant, feature=feature, route=route)


def alert_tenant(scope: str, tenants: Mapping[str, Any]) -> str | None:
    """The tenant an alert's scope belongs to (None: org or route, admins only)."""
    kind, _, name = scope.partition(":")
    if kind == "tenant":
        return name
    if kind == "feature":
        matches = [t for t in tenants if name.startswith(t + "/")]
        return max(matches, key=len) if matches else None
    return None


async def alerts(store: ReportingStore, settings: Settings, viewer: Viewer, query: Query) -> dict[str, Any]:
    rows = await store.alerts(query.window.since or 0, limit=500)
    out = []
    for row in rows:
        owner = alert_tenant(row["scope"], settings.tenants)
        if not viewer.admin and owner != viewer.tenant:
            continue
        if query.window.tenant is not None and owner != query.window.tenant:
            continue
        if row["delivered_at"]:
            status = "delivered"
        elif row["delivery_error"]:
            status = "failed: " + row["delivery_error"]
        elif settings.alerts.webhook_url:
            status = "pending"
        else:
            status = "stored (no webhook)"
        out.append({**row, "ts_iso": _iso(row["ts"]), "delivery": status})
    return {"alerts": out[:100]}


async def requests(store: ReportingStore, query: Query) -> dict[str, Any]:
    rows = await store.requests(query.window, limit=query.limit, before=query.before)
    for row in rows:
        row["ts_iso"] = _iso(row["ts"])
    return {
        "window": window_json(query),
        "requests": rows,
        "next_before": rows[-1]["ts"] if len(rows) == query.limit else None,
        "next_before_id": rows[-1]["request_id"] if len(rows) == query.limit else None,
    }


async def page(
    store: ReportingStore, settings: Settings, viewer: Viewer, query: Query, now: float
) -> dict[str, Any]:
    """Everything the page shows, in one dict (also GET /dashboard/api/page)."""
    # A dimension's summary is its series summed: one read of the rollups serves both.
    by_points, pv_points = await asyncio.gather(
        store.rollup_series(query.by, query.bucket, query.window),
        store.rollup_series("prompt_version", query.bucket, query.window),
    )
    parts = await asyncio.gather(
        summary(store, query, points=by_points),
        series(store, query, points=by_points),
        summary(store, query, "route"),
        summary(store, query, "prompt_version", points=pv_points),
        series(store, query, "prompt_version", points=pv_points),
        top(store, query),
        budgets(store, settings, viewer, now),
        alerts(store, settings, viewer, query),
        requests(store, query),
    )
    keys = ("summary", "series", "routes", "prompt_versions", "prompt_series", "top", "budgets", "alerts")
    data: dict[str, Any] = dict(zip(keys, parts, strict=False))
    data["requests"] = parts[-1]
    data["viewer"] = {"admin": viewer.admin, "tenant": viewer.tenant}
    data["tenants"] = sorted(settings.tenants) if viewer.admin else [viewer.tenant]
    data["query"] = {"by": query.by, "bucket": query.bucket, "range": query.range_name}
    return data


def day_or_hour(ts: int, bucket: str) -> str:
    fmt = "%Y-%m-%d" if bucket == "day" else "%m-%d %H:00"
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


__all__ = ["DAY", "DIMENSIONS", "ReportRow", "Viewer", "page", "parse_query"]
