"""SQLite's side of the durable-storage ports that are not the ledger writer: what reports, alert
listings, the budget rebuild and the alert checks read, and where alerts are stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

# The report's columns; the last two come from the context stage's JSON record, in each dialect.
REPORT_SELECT = (
    "SELECT {column}, status, input_tokens, cached_input_tokens, output_tokens, cost_usd, "
    "retry_cost_usd, usage_estimated, saved_usd, http_status, cache, escalated, {context}, batch FROM ledger"
)
ESCALATIONS_SQL = (
    "SELECT route, COUNT(*), SUM(escalated) FROM ledger WHERE ts >= {mark} AND route IS NOT NULL "
    "AND status = 'ok' GROUP BY route"
)
SQLITE_CONTEXT = "COALESCE(json_extract(context, '$.saved'), 0), json_extract(context, '$.finish_reason')"
POSTGRES_CONTEXT = "COALESCE((context->>'saved')::bigint, 0), context->>'finish_reason'"
# What the estimator and the reconciliation read: each request with its upstream attempts.
USAGE_SELECT = (
    "SELECT ts, tenant_id, feature, model, cache, batch, status, cost_usd, input_tokens, "
    "cached_input_tokens, output_tokens, retries, attempts FROM ledger WHERE ts >= {mark} AND ts < {mark}"
)


ROUTE_REQUESTS_SQL = "SELECT COUNT(*) FROM ledger WHERE route = {mark} AND ts >= {mark}"
_COSTS_CHUNK = 500  # request ids per statement (SQLite's parameter limit is far above)


def route_requests_query(
    mark: str, route: str, since: float, prompt_version: str | None
) -> tuple[str, list[Any]]:
    sql = ROUTE_REQUESTS_SQL.format(mark=mark)
    params: list[Any] = [route, since]
    if prompt_version is not None:
        sql += f" AND prompt_version = {mark}"
        params.append(prompt_version)
    return sql, params


def chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), _COSTS_CHUNK):
        yield list(ids[start : start + _COSTS_CHUNK])


def usage_query(mark: str, since: float, until: float, feature: str | None) -> tuple[str, list[Any]]:
    sql = USAGE_SELECT.format(mark=mark)
    params: list[Any] = [since, until]
    if feature is not None:
        sql += f" AND feature = {mark}"
        params.append(feature)
    return sql + " ORDER BY ts", params


def report_query(
    select: str, mark: str, since: float | None, until: float | None, tenant: str | None
) -> tuple[str, list[Any]]:
    """The report's SELECT with since <= ts < until and the tenant (each optional)."""
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in ((f"ts >= {mark}", since), (f"ts < {mark}", until), (f"tenant_id = {mark}", tenant)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (select + (" WHERE " + " AND ".join(clauses) if clauses else "")), params


class SqliteLedgerReader:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def report_rows(
        self, column: str, since: float | None, until: float | None = None, tenant: str | None = None
    ) -> Iterable[tuple[Any, ...]]:
        sql, params = report_query(
            REPORT_SELECT.format(column=column, context=SQLITE_CONTEXT), "?", since, until, tenant
        )
        return self._conn.execute(sql, params)

    def spend_rows(self, since: float) -> Iterable[tuple[float, str, str | None, str | None, Any, int]]:
        return self._conn.execute(
            "SELECT ts, tenant_id, feature, route, cost_usd, input_tokens + output_tokens FROM ledger "
            "WHERE ts >= ?",
            (since,),
        )

    def usage_rows(self, since: float, until: float, feature: str | None = None) -> Iterable[tuple[Any, ...]]:
        sql, params = usage_query("?", since, until, feature)
        return self._conn.execute(sql, params)

    def alerts_since(self, since: float) -> list[tuple[float, str, str, str, float | None, str | None]]:
        return self._conn.execute(
            "SELECT ts, kind, scope, message, delivered_at, delivery_error FROM alerts "
            "WHERE ts >= ? ORDER BY ts DESC",
            (since,),
        ).fetchall()

    def route_requests(self, route: str, since: float, prompt_version: str | None = None) -> int:
        sql, params = route_requests_query("?", route, since, prompt_version)
        return int(self._conn.execute(sql, params).fetchone()[0])

    def costs(self, request_ids: Sequence[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for part in chunks(request_ids):
            marks = ", ".join("?" * len(part))
            found.update(
                self._conn.execute(
                    f"SELECT request_id, cost_usd FROM ledger WHERE request_id IN ({marks})", part
                )
            )
        return found

    def close(self) -> None:
        self._conn.close()


class SqliteAlertStore:
    remote = False

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def insert_once(self, key: str, ts: float, kind: str, scope: str, message: str, payload: str) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO alerts (alert_key, ts, kind, scope, message, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, ts, kind, scope, message, payload),
        )
        return cur.rowcount == 1

    def mark_delivery(self, key: str, delivered_at: float | None, error: str | None) -> None:
        self._conn.execute(
            "UPDATE alerts SET delivered_at = ?, delivery_error = ? WHERE alert_key = ?",
            (delivered_at, error, key),
        )

    def recent_spend(self, since: float) -> list[tuple[float, str, str | None, Any]]:
        return self._conn.execute(
            "SELECT ts, tenant_id, feature, cost_usd FROM ledger WHERE ts >= ?", (since,)
        ).fetchall()

    def escalations(self, since: float) -> list[tuple[str, int, int | None]]:
        """(route, answered requests, escalated) since `since` (escalation-drift alerts)."""
        return self._conn.execute(ESCALATIONS_SQL.format(mark="?"), (since,)).fetchall()


__all__ = ["SqliteAlertStore", "SqliteLedgerReader"]
