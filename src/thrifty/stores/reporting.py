"""The read port of reports and the dashboard, and its SQLite implementation.

`ReportingStore` is everything `thrifty report` and the dashboard read: exact spend from the
ledger, the same measures from the rollups (stores/rollups.py), the request explorer, alerts and
budget use. A PostgreSQL implementation provides the same methods over the same tables.

Rollup reads take hour-aligned windows (`Window.aligned`); a report over any other window scans
the ledger. Every method is async: the SQLite implementation runs each query on a worker thread
with its own connection, so a slow page never stalls the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import orjson

from thrifty.report import GROUP_COLUMNS, ReportRow, build_report
from thrifty.stores.rollups import (
    DAY,
    HOUR,
    INT_FIELDS,
    MONEY_FIELDS,
    fold_pending,
    measures_sql,
    rebuild_rollups,
    tail_sql,
)
from thrifty.stores.sqlite_db import connect
from thrifty.stores.sqlite_money import EXACT, join_money
from thrifty.stores.user_totals import window_totals

T = TypeVar("T")
Bucket = Literal["hour", "day"]
BUCKET_WIDTH: dict[str, int] = {"hour": HOUR, "day": DAY}


@dataclass(frozen=True, slots=True)
class Window:
    """since <= ts < until (None: unbounded), of one tenant when `tenant` is set."""

    since: float | None = None
    until: float | None = None
    tenant: str | None = None

    @property
    def aligned(self) -> bool:
        return all(t is None or t % HOUR == 0 for t in (self.since, self.until))


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket: int  # start of the UTC hour or day, unix seconds
    row: ReportRow  # row.group: the dimension's value


@dataclass(frozen=True, slots=True)
class BudgetUse:
    usd: Decimal
    tokens: int  # input + output, as budgets count them


class ReportingStore(Protocol):
    async def spend_by(self, by: str, window: Window) -> list[ReportRow]:
        """Exact, from the ledger rows themselves (what `thrifty report` prints)."""
        ...

    async def rollup_by(self, by: str, window: Window) -> list[ReportRow]:
        """The same rows as spend_by for an hour-aligned window, from the rollups."""
        ...

    async def rollup_top(self, by: str, window: Window, limit: int) -> list[ReportRow]:
        """The `limit` most expensive groups; only requests, ok and cost_usd are filled in."""
        ...

    async def rollup_series(self, by: str, bucket: Bucket, window: Window) -> list[SeriesPoint]: ...

    async def budget_use(
        self, since: float, *, tenant: str | None, feature: str | None, route: str | None
    ) -> BudgetUse:
        """Spend since a day boundary of one scope (None: any value), from the daily rollups."""
        ...

    async def requests(
        self, window: Window, *, limit: int, before: tuple[float, str] | None = None
    ) -> list[dict[str, Any]]:
        """Newest ledger rows first, with their attempts; `before`: the (ts, request_id) of the
        last row of the previous page (keyset pagination: no row is skipped or repeated)."""
        ...

    async def alerts(self, since: float, *, limit: int) -> list[dict[str, Any]]: ...

    async def rebuild_rollups(self) -> int: ...

    async def fold(self, min_rows: int = 0) -> int:
        """Fold the ledger rows past the rollups' watermark; return how many (a timer calls this).
        While fewer than `min_rows` wait, do nothing: readers add them from the ledger anyway."""
        ...

    async def aclose(self) -> None: ...


def _plan(since: float | None, until: float | None, width: int) -> list[tuple[str, int | None, int | None]]:
    """Split [since, until) into ranges served by the daily grain and hourly edges ('h'/'d')."""
    if width == HOUR:
        return [("h", _int(since), _int(until))]
    day_lo = None if since is None else -(-int(since) // DAY) * DAY
    day_hi = None if until is None else int(until) // DAY * DAY
    if day_lo is not None and day_hi is not None and day_lo >= day_hi:
        return [("h", _int(since), _int(until))]
    parts: list[tuple[str, int | None, int | None]] = [("d", day_lo, day_hi)]
    if since is not None and day_lo is not None and since < day_lo:
        parts.append(("h", int(since), day_lo))
    if until is not None and day_hi is not None and day_hi < until:
        parts.append(("h", day_hi, int(until)))
    return parts


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _day_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _sums(int_sum: str) -> str:
    money = [
        f"{int_sum}({f}_pico), MIN({f}_exp), thrifty_dec_sum({f}_rest) FILTER (WHERE {f}_rest IS NOT NULL)"
        for f in MONEY_FIELDS
    ]
    return ", ".join([f"SUM({f})" for f in INT_FIELDS] + money)


_SUMS = _sums("SUM")
# Beyond 2^63 pico-USD ($9.2M) in one answer SQLite's SUM overflows; Python's integers do not.
_BIG_SUMS = _sums("thrifty_int_sum")
# Rankings need requests, successes and cost only: a fifth of the work on the large user grain.
_TOP_SUMS, _BIG_TOP_SUMS = (
    f"SUM(requests), SUM(ok), {int_sum}(cost_usd_pico), MIN(cost_usd_exp), "
    "thrifty_dec_sum(cost_usd_rest) FILTER (WHERE cost_usd_rest IS NOT NULL)"
    for int_sum in ("SUM", "thrifty_int_sum")
)


def _merge_top(row: ReportRow, values: tuple[Any, ...]) -> None:
    requests, ok, *money = values
    row.requests += requests
    row.ok += ok
    row.cost_usd += join_money(*money)


# ReportRow attributes of the rollups' integer measures (`retries` has none: the report counts
# retry cost, not retries); money measures are named as ReportRow's.
_INT_ATTRIBUTES = tuple(
    {"budget_rejections": "rejected_budget", "retries": None}.get(f, f) for f in INT_FIELDS
)


def add_measures(row: ReportRow, ints: Sequence[Any], money: Sequence[Decimal]) -> None:
    """Add one rollup-shaped set of sums (INT_FIELDS, MONEY_FIELDS) to a report row."""
    for name, value in zip(_INT_ATTRIBUTES, ints, strict=True):
        if name is not None and value:
            setattr(row, name, getattr(row, name) + int(value))
    row.cache_hits = row.exact_hits + row.semantic_hits
    for name, amount in zip(MONEY_FIELDS, money, strict=True):
        setattr(row, name, getattr(row, name) + amount)


def _merge(row: ReportRow, values: tuple[Any, ...]) -> None:
    n = len(INT_FIELDS)
    money = values[n:]
    add_measures(row, values[:n], [join_money(*money[i : i + 3]) for i in range(0, len(money), 3)])


def _order(row: ReportRow) -> tuple[bool, str]:
    return row.group is None, row.group or ""


def _sorted(rows: list[ReportRow]) -> list[ReportRow]:
    # The report's order: most expensive first, then by name, unset last.
    return sorted(rows, key=lambda r: (-r.cost_usd, *_order(r)))


def _fetch(
    conn: sqlite3.Connection, make_sql: Callable[[bool], str], params: list[Any]
) -> list[tuple[Any, ...]]:
    """Run an aggregate; past 2^63 pico-USD SQLite's SUM overflows, thrifty_int_sum does not."""
    try:
        return conn.execute(make_sql(False), params).fetchall()
    except sqlite3.OperationalError as err:
        if "overflow" not in str(err):
            raise
        return conn.execute(make_sql(True), params).fetchall()


def _formatter(sql: str, sums: str, big_sums: str) -> Callable[[bool], str]:
    def make(big: bool) -> str:
        return sql.format(big_sums if big else sums)

    return make


def _most_of_history(conn: sqlite3.Connection, lo: int | None, hi: int | None) -> bool:
    first, last = conn.execute(
        "SELECT MIN(bucket), MAX(bucket) FROM ledger_rollup WHERE grain = 'du'"
    ).fetchone()
    if first is None:
        return False
    span = last - first + DAY
    covered = min(hi if hi is not None else last + DAY, last + DAY) - max(
        lo if lo is not None else first, first
    )
    return bool(covered * 2 >= span)


def _tail_where(window: Window) -> tuple[str, list[Any]]:
    # `+ts`: never the ts index for the tail; the rowid range past the watermark is the small set.
    clauses, params = ["1"], []
    for clause, value in (
        ("+ts >= ?", window.since),
        ("+ts < ?", window.until),
        ("+tenant_id = ?", window.tenant),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def _top_users(conn: sqlite3.Connection, window: Window, limit: int) -> list[ReportRow]:
    """The `limit` most expensive users: the running user totals (stores/user_totals.py, two rows
    per user) plus the ledger rows past the watermark; each winner's cost written with the decimal
    exponent of its window's amounts, from the rollups (the totals do not keep it)."""
    if not window.aligned:
        raise ValueError("rollups answer whole hours: since and until must be on the hour")
    rows: dict[str | None, ReportRow] = {}
    exponents: dict[str | None, int] = {}
    for user, (requests, ok, cost) in window_totals(conn, window.since, window.until, window.tenant).items():
        row = rows[user] = ReportRow(user)
        row.requests, row.ok, row.cost_usd = requests, ok, cost
    where, params = _tail_where(window)
    tail = _fetch(
        conn,
        lambda big: tail_sql(
            "user", where, "1", measures_sql(top=True, int_sum="thrifty_int_sum" if big else "SUM")
        ),
        params,
    )
    for user, requests, ok, pico, exponent, rest in tail:
        row = rows.get(user) or rows.setdefault(user, ReportRow(user))
        row.requests += requests
        row.ok += ok
        row.cost_usd = EXACT.add(row.cost_usd, join_money(pico, exponent, rest))
        exponents[user] = min(exponent or 0, 0)
    winners = _sorted(list(rows.values()))[:limit]
    for row in winners:
        exponent = min(exponents.get(row.group, 0), _rollup_exponent(conn, row.group, window))
        row.cost_usd = row.cost_usd.quantize(Decimal(1).scaleb(exponent), context=EXACT)
    return winners


def _rollup_exponent(conn: sqlite3.Connection, user: str | None, window: Window) -> int:
    """The smallest decimal exponent of a user's amounts in the window's folded rows (at most 0)."""
    exponent = 0
    for grain, lo, hi in _plan(window.since, window.until, DAY):
        clauses = ["grain = ?", "user IS ?"]
        params: list[Any] = [grain + "u", user]
        for clause, value in (("bucket >= ?", lo), ("bucket < ?", hi), ("tenant_id = ?", window.tenant)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        (found,) = conn.execute(
            f"SELECT MIN(cost_usd_exp) FROM ledger_rollup INDEXED BY ledger_rollup_by_user "
            f"WHERE {' AND '.join(clauses)}",
            params,
        ).fetchone()
        exponent = min(exponent, found or 0)
    return exponent


_REQUEST_COLUMNS = (
    "request_id, ts, tenant_id, user, feature, route, prompt_version, model, provider, attempts, "
    "input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_usd, "
    "saved_usd, cache, escalated, retries, retry_cost_usd, status, http_status, error, latency_ms, ttft_ms"
)


class SqliteReportingStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        # Read connections kept between queries (one per worker thread in use at a time): a new
        # connection reads the schema and prepares every statement again, ~1 ms of CPU a query.
        self._idle: list[sqlite3.Connection] = []
        # The folder's own connection, kept: its statements stay compiled from one fold to the next
        # (a fold of nothing new is two indexed reads). Used by one fold at a time, on any thread.
        self._fold_conn: sqlite3.Connection | None = None
        self._fold_lock = threading.Lock()

    async def _run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._query, query)

    def _query(self, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = connect(self._path, check_same_thread=False)
        try:
            # One read transaction: the rollups, their watermark and the ledger's tail past it are
            # read in one snapshot, so a fold committing meanwhile is seen whole or not at all.
            conn.execute("BEGIN")
            try:
                return query(conn)
            finally:
                conn.execute("COMMIT")
        except BaseException:
            conn.close()  # (not handed out again in an unknown state)
            raise
        else:
            self._idle.append(conn)

    def _write(self, action: Callable[[sqlite3.Connection], T]) -> T:
        conn = connect(self._path)
        try:
            return action(conn)
        finally:
            conn.close()

    async def spend_by(self, by: str, window: Window) -> list[ReportRow]:
        return await self._run(
            lambda conn: build_report(conn, by, window.since, until=window.until, tenant=window.tenant)
        )

    async def rollup_by(self, by: str, window: Window) -> list[ReportRow]:
        width = DAY if by == "day" else 0
        points = await self._run(lambda conn: self._rollup(conn, by, width, window))
        return _sorted([p.row for p in points])

    async def rollup_top(self, by: str, window: Window, limit: int) -> list[ReportRow]:
        if by == "user":
            return await self._run(lambda conn: _top_users(conn, window, limit))
        points = await self._run(lambda conn: self._rollup(conn, by, 0, window, top=True))
        return _sorted([p.row for p in points])[:limit]

    async def rollup_series(self, by: str, bucket: Bucket, window: Window) -> list[SeriesPoint]:
        width = BUCKET_WIDTH[bucket]
        points = await self._run(lambda conn: self._rollup(conn, by, width, window))
        return sorted(
            points, key=lambda p: (p.bucket, -p.row.cost_usd, p.row.group is None, p.row.group or "")
        )

    def _rollup(
        self, conn: sqlite3.Connection, by: str, width: int, window: Window, *, top: bool = False
    ) -> list[SeriesPoint]:
        """Rows per (bucket of `width` seconds, or 0 = the whole window; group) from the rollups and
        the ledger rows not folded yet; `top`: requests, successes and cost only."""
        sums, big_sums, merge = (_TOP_SUMS, _BIG_TOP_SUMS, _merge_top) if top else (_SUMS, _BIG_SUMS, _merge)
        if by not in GROUP_COLUMNS:
            raise ValueError(f"by must be one of {', '.join(GROUP_COLUMNS)}")
        if not window.aligned:
            raise ValueError("rollups answer whole hours: since and until must be on the hour")
        user = by == "user"
        column = "bucket" if by == "day" else GROUP_COLUMNS[by]
        found: dict[tuple[int, str | None], ReportRow] = {}

        def add(found_rows: list[tuple[Any, ...]]) -> None:
            for bucket, key, *values in found_rows:
                group = _day_text(key) if by == "day" else (None if key is None else str(key))
                row = found.get((bucket, group))
                if row is None:
                    row = found[(bucket, group)] = ReportRow(group)
                merge(row, tuple(values))

        for grain, lo, hi in _plan(window.since, window.until, HOUR if width == HOUR else DAY):
            clauses = ["grain = ?"]
            params: list[Any] = [grain + ("u" if user else "")]
            for clause, value in (("bucket >= ?", lo), ("bucket < ?", hi), ("tenant_id = ?", window.tenant)):
                if value is not None:
                    clauses.append(clause)
                    params.append(value)
            bucket_sql = "0" if width == 0 else f"bucket / {width} * {width}"
            group_sql = f"bucket / {DAY} * {DAY}" if by == "day" else column
            source = "ledger_rollup"
            if top and grain == "d" and user and _most_of_history(conn, lo, hi):
                # Read in user order: no sort of every (day, user) row; scans the user days of all
                # time, so only when the window holds most of them.
                source += " INDEXED BY ledger_rollup_by_user"
            where = " AND ".join(clauses)
            sql = f"SELECT {bucket_sql}, {group_sql}, {{}} FROM {source} WHERE {where} GROUP BY 1, 2"
            add(_fetch(conn, _formatter(sql, sums, big_sums), params))
        # The tail: ledger rows past the watermark, summed the same way.
        where, params = _tail_where(window)
        bucket_sql = "0" if width == 0 else f"ts_i - ts_i % {width}"
        group_sql = f"ts_i - ts_i % {DAY}" if by == "day" else GROUP_COLUMNS[by]
        add(
            _fetch(
                conn,
                lambda big: tail_sql(
                    f"{bucket_sql}, {group_sql}",
                    where,
                    "1, 2",
                    measures_sql(top=top, int_sum="thrifty_int_sum" if big else "SUM"),
                ),
                params,
            )
        )
        return [SeriesPoint(bucket, row) for (bucket, _), row in found.items()]

    async def budget_use(
        self, since: float, *, tenant: str | None, feature: str | None, route: str | None
    ) -> BudgetUse:
        def query(conn: sqlite3.Connection) -> BudgetUse:
            clauses = ["grain = 'd'", "bucket >= ?"]
            tail_clauses = ["+ts >= ?"]  # the rowid range past the watermark, not the ts index
            params: list[Any] = [int(since)]
            for column, value in (("tenant_id", tenant), ("feature", feature), ("route", route)):
                if value is not None:
                    clauses.append(f"{column} = ?")
                    tail_clauses.append(f"+{column} = ?")
                    params.append(value)
            pico, exponent, rest, tokens = conn.execute(
                "SELECT thrifty_int_sum(cost_usd_pico), MIN(cost_usd_exp), "
                "thrifty_dec_sum(cost_usd_rest) FILTER (WHERE cost_usd_rest IS NOT NULL), "
                f"SUM(input_tokens + output_tokens) FROM ledger_rollup WHERE {' AND '.join(clauses)}",
                params,
            ).fetchone()
            usd, total_tokens = join_money(pico, exponent, rest), int(tokens or 0)
            tail = conn.execute(
                tail_sql(
                    "1",
                    " AND ".join(tail_clauses),
                    "1",
                    "thrifty_int_sum(c_pico), MIN(c_exp), thrifty_dec_sum(c_rest) "
                    "FILTER (WHERE c_rest IS NOT NULL), SUM(input_tokens + output_tokens)",
                ),
                params,
            ).fetchone()
            if tail is not None:
                usd += join_money(*tail[1:4])
                total_tokens += int(tail[4] or 0)
            return BudgetUse(usd, total_tokens)

        return await self._run(query)

    async def requests(
        self, window: Window, *, limit: int, before: tuple[float, str] | None = None
    ) -> list[dict[str, Any]]:
        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            clauses: list[str] = []
            params: list[Any] = []
            for clause, value in (
                ("ts >= ?", window.since),
                ("ts < ?", window.until),
                ("tenant_id = ?", window.tenant),
            ):
                if value is not None:
                    clauses.append(clause)
                    params.append(value)
            if before is not None:
                # Keyset: older than the last row shown, ties on ts broken by request_id.
                clauses.append("ts <= ? AND (ts < ? OR request_id < ?)")
                params.extend([before[0], before[0], before[1]])
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            cursor = conn.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM ledger{where} ORDER BY ts DESC, request_id DESC LIMIT ?",
                [*params, limit],
            )
            names = [d[0] for d in cursor.description]
            out = []
            for values in cursor:
                record = dict(zip(names, values, strict=True))
                record["attempts"] = orjson.loads(record["attempts"])
                record["escalated"] = bool(record["escalated"])
                out.append(record)
            return out

        return await self._run(query)

    async def alerts(self, since: float, *, limit: int) -> list[dict[str, Any]]:
        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(
                "SELECT ts, kind, scope, message, delivered_at, delivery_error FROM alerts "
                "WHERE ts >= ? ORDER BY ts DESC LIMIT ?",
                (since, limit),
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor]

        return await self._run(query)

    async def rebuild_rollups(self) -> int:
        return await asyncio.to_thread(self._write, rebuild_rollups)

    async def fold(self, min_rows: int = 0) -> int:
        return await asyncio.to_thread(self._fold, min_rows)

    def _fold(self, min_rows: int) -> int:
        with self._fold_lock:
            if self._fold_conn is None:
                self._fold_conn = connect(self._path, check_same_thread=False)
            return fold_pending(self._fold_conn, min_rows=min_rows)

    async def aclose(self) -> None:
        def close() -> None:
            with self._fold_lock:
                if self._fold_conn is not None:
                    self._fold_conn.close()
                    self._fold_conn = None
            while self._idle:
                self._idle.pop().close()

        await asyncio.to_thread(close)


__all__ = ["BudgetUse", "ReportingStore", "SeriesPoint", "SqliteReportingStore", "Window"]
