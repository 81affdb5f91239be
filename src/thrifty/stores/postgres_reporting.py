"""The dashboard's read port (`ReportingStore`) on PostgreSQL, and its rollups' folder.

The same rollups as SQLite's (stores/rollups.py): hourly and daily grains by the attribution
dimensions and by user, folded behind a watermark, off the requests' path. PostgreSQL's sequences
do not grow in commit order (a transaction may commit a lower id after a higher one), so the
watermark is a transaction id instead: each ledger row carries the id of the transaction that wrote
it (`txid`, the column's default). A fold takes, in one statement (one snapshot), the rows with
folded_xid <= txid < xmin, where xmin is the oldest transaction still running: every transaction
below it has committed or rolled back for good, so no row can still appear below the new
watermark. Readers add the rows with txid >= folded_xid, aggregated from the ledger itself in the
same snapshot, so every number is exact however far behind the folder is (a transaction left open
elsewhere only makes that tail longer). Replicas fold in turn: the watermark row is locked, and a
replica finding it locked skips its turn.

Writers of ledger rows only INSERT them without naming `txid`; nothing else is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from thrifty.report import GROUP_COLUMNS, ReportRow, build_report
from thrifty.stores.reporting import (
    BUCKET_WIDTH,
    Bucket,
    BudgetUse,
    SeriesPoint,
    Window,
    _day_text,
    _plan,
    _sorted,
    add_measures,
)
from thrifty.stores.rollups import DAY, GRAINS, HOUR, INT_FIELDS, MONEY_FIELDS
from thrifty.types import decimal_text

_N_INT = len(INT_FIELDS)
# A ledger row as an hourly rollup row: (bucket, dimensions, INT_FIELDS, MONEY_FIELDS).
_ROW_AS_ROLLUP = (
    "floor(ts)::bigint / 3600 * 3600 AS bucket, tenant_id, feature, route, prompt_version, model, "
    "\"user\", 1 AS requests, (status = 'ok')::int AS ok, input_tokens, cached_input_tokens, "
    "output_tokens, (http_status = 429)::int AS budget_rejections, (cache = 'exact')::int AS exact_hits, "
    "(cache = 'semantic')::int AS semantic_hits, escalated, retries, (cost_usd IS NULL)::int AS unpriced, "
    "usage_estimated AS estimated, (cache = 'dedup')::int AS dedup_hits, "
    "COALESCE((context->>'saved')::bigint, 0) AS context_tokens_saved, "
    "(context->>'finish_reason' IS NOT NULL)::int AS output_budgeted, "
    "COALESCE((context->>'finish_reason' = 'length')::int, 0) AS length_cutoffs, "
    "(batch != 0)::int AS batch_requests, cost_usd, "
    "CASE WHEN status != 'ok' THEN cost_usd END AS error_cost_usd, retry_cost_usd, saved_usd, "
    "CASE WHEN cache = 'exact' THEN saved_usd END AS exact_saved_usd, "
    "CASE WHEN cache = 'semantic' THEN saved_usd END AS semantic_saved_usd, "
    "CASE WHEN batch != 0 THEN cost_usd END AS batch_cost_usd, "
    "CASE WHEN batch != 0 THEN saved_usd END AS batch_saved_usd"
)
_ROLLUP_COLUMNS = (
    'bucket, tenant_id, feature, route, prompt_version, model, "user", '
    + ", ".join(INT_FIELDS)
    + ", "
    + ", ".join(MONEY_FIELDS)
)
_SUMS = ", ".join([f"SUM({f})" for f in INT_FIELDS] + [f"COALESCE(SUM({f}), 0)" for f in MONEY_FIELDS])
_TOP_SUMS = "SUM(requests), SUM(ok), COALESCE(SUM(cost_usd), 0)"
# The watermark is read first and written into the statement as a number, in one REPEATABLE READ
# transaction (one snapshot): the planner then sees how few rows are past it and takes the txid
# index, not (say) a day of the ts index.
_TAIL = "txid >= {mark}"
_GRAINS_SQL = " UNION ALL ".join(
    f"SELECT '{grain}' AS grain, {width} AS width, {str(by_user).lower()} AS by_user"
    for grain, (width, by_user) in GRAINS.items()
)
_KEY = 'grain, bucket, tenant_id, feature, route, prompt_version, model, "user"'
# The running user totals (SQLite: stores/user_totals.py), in the fold's statement: the fold's sums
# per key ((tenant, user) and (NULL, user)) and hour; a key's totals from its first such hour on
# rebuilt from the total before it (`base`), the increments of the totals already there (normally
# none: a fold appends the current hour) and the new sums, then upserted.
_USER_TOTALS_CTES = (
    'sums AS (SELECT tenant_id, "user", bucket, SUM(requests) AS requests, SUM(ok) AS ok, '
    "COALESCE(SUM(cost_usd), 0) AS cost_usd FROM rows GROUP BY 1, 2, 3), "
    'deltas AS (SELECT tenant_id, "user", bucket, requests, ok, cost_usd FROM sums UNION ALL '
    'SELECT NULL, "user", bucket, SUM(requests), SUM(ok), SUM(cost_usd) FROM sums GROUP BY 2, 3), '
    'scoped AS (SELECT json_build_array(tenant_id, "user")::text AS scope, * FROM deltas), '
    'new_keys AS (INSERT INTO ledger_user_key (scope, tenant_id, "user") '
    'SELECT DISTINCT scope, tenant_id, "user" FROM scoped ON CONFLICT (scope) DO NOTHING '
    "RETURNING id, scope), "
    "dk AS (SELECT COALESCE(k.id, n.id) AS key, d.bucket, d.requests, d.ok, d.cost_usd FROM scoped AS d "
    "LEFT JOIN ledger_user_key AS k ON k.scope = d.scope LEFT JOIN new_keys AS n ON n.scope = d.scope), "
    "base AS (SELECT m.key, m.first, COALESCE(b.requests, 0) AS requests, COALESCE(b.ok, 0) AS ok, "
    "COALESCE(b.cost_usd, 0) AS cost_usd FROM (SELECT key, MIN(bucket) AS first FROM dk GROUP BY key) AS m "
    "LEFT JOIN LATERAL (SELECT requests, ok, cost_usd FROM ledger_user_cum AS c WHERE c.key = m.key "
    "AND c.bucket < m.first ORDER BY c.bucket DESC LIMIT 1) AS b ON true), "
    "later AS (SELECT c.key, c.bucket, "
    "c.requests - COALESCE(LAG(c.requests) OVER w, b.requests) AS requests, "
    "c.ok - COALESCE(LAG(c.ok) OVER w, b.ok) AS ok, "
    "c.cost_usd - COALESCE(LAG(c.cost_usd) OVER w, b.cost_usd) AS cost_usd "
    "FROM ledger_user_cum AS c JOIN base AS b ON c.key = b.key AND c.bucket >= b.first "
    "WINDOW w AS (PARTITION BY c.key ORDER BY c.bucket)), "
    "increments AS (SELECT key, bucket, SUM(requests) AS requests, SUM(ok) AS ok, SUM(cost_usd) AS cost_usd "
    "FROM (SELECT * FROM later UNION ALL SELECT * FROM dk) AS u GROUP BY key, bucket), "
    "totals AS (INSERT INTO ledger_user_cum (key, bucket, requests, ok, cost_usd) "
    "SELECT i.key, i.bucket, b.requests + SUM(i.requests) OVER w, b.ok + SUM(i.ok) OVER w, "
    "b.cost_usd + SUM(i.cost_usd) OVER w FROM increments AS i JOIN base AS b ON b.key = i.key "
    "WINDOW w AS (PARTITION BY i.key ORDER BY i.bucket) "
    "ON CONFLICT (key, bucket) DO UPDATE SET requests = EXCLUDED.requests, ok = EXCLUDED.ok, "
    "cost_usd = EXCLUDED.cost_usd) "
)
FOLD_SQL = (
    "WITH hi AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin), "
    "rows AS (SELECT " + _ROW_AS_ROLLUP + " FROM ledger "
    "WHERE txid >= %(mark)s AND txid < (SELECT xmin FROM hi)), "
    "folded AS (INSERT INTO ledger_rollup ("
    + _KEY
    + ", "
    + ", ".join(INT_FIELDS)
    + ", "
    + ", ".join(MONEY_FIELDS)
    + ") SELECT g.grain, r.bucket / g.width * g.width, r.tenant_id, "
    "CASE WHEN g.by_user THEN NULL ELSE r.feature END, CASE WHEN g.by_user THEN NULL ELSE r.route END, "
    "CASE WHEN g.by_user THEN NULL ELSE r.prompt_version END, "
    'CASE WHEN g.by_user THEN NULL ELSE r.model END, CASE WHEN g.by_user THEN r."user" END, '
    + _SUMS
    + f" FROM rows AS r CROSS JOIN ({_GRAINS_SQL}) AS g GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 "
    "ON CONFLICT ON CONSTRAINT ledger_rollup_key DO UPDATE SET "
    + ", ".join(f"{f} = ledger_rollup.{f} + EXCLUDED.{f}" for f in (*INT_FIELDS, *MONEY_FIELDS))
    + "), "
    + _USER_TOTALS_CTES
    + "UPDATE ledger_rollup_state SET folded_xid = GREATEST(folded_xid, (SELECT xmin FROM hi)) "
    "WHERE id = 1 RETURNING (SELECT COUNT(*) FROM rows)"
)
_REQUEST_COLUMNS = (
    'request_id, ts, tenant_id, "user", feature, route, prompt_version, model, provider, attempts, '
    "input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_usd, "
    "saved_usd, cache, escalated, retries, retry_cost_usd, status, http_status, error, latency_ms, ttft_ms"
)


# A key's running totals before a bound: one seek of the (key, bucket) primary key.
_LAST_TOTAL = (
    "(SELECT requests, ok, cost_usd FROM ledger_user_cum AS c WHERE c.key = k.id {bound} "
    "ORDER BY c.bucket DESC LIMIT 1)"
)


def _tail_clauses(window: Window) -> tuple[list[str], list[Any]]:
    clauses, params = [_TAIL], []
    bounds: tuple[tuple[str, float | str | None], ...] = (
        ("ts >= %s", window.since),
        ("ts < %s", window.until),
        ("tenant_id = %s", window.tenant),
    )
    for clause, value in bounds:
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return clauses, params


async def _rollup_scale(conn: Any, user: str | None, window: Window) -> int:
    """The largest scale of a user's amounts in the window's folded rows (its user rollup rows)."""
    scale = 0
    for grain, lo, hi in _plan(window.since, window.until, DAY):
        clauses = ["grain = %s", '"user" = %s' if user is not None else '"user" IS NULL']
        params: list[Any] = [grain + "u"] + ([user] if user is not None else [])
        for clause, value in (("bucket >= %s", lo), ("bucket < %s", hi), ("tenant_id = %s", window.tenant)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        cur = await conn.execute(
            f"SELECT MAX(scale(cost_usd)) FROM ledger_rollup WHERE {' AND '.join(clauses)}", params
        )
        (found,) = await cur.fetchone()
        scale = max(scale, int(found or 0))
    return scale


def _psycopg_pool() -> Any:
    from psycopg_pool import AsyncConnectionPool

    return AsyncConnectionPool


class PostgresReportingStore:
    """Reads through a small pool of its own, opened on first use."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self._url = url
        self._pool_size = pool_size
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def _connection(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    from thrifty.stores.postgres import conninfo

                    pool = _psycopg_pool()(
                        conninfo(self._url),
                        min_size=1,
                        max_size=self._pool_size,
                        open=False,
                        kwargs={"autocommit": True},
                        check=_psycopg_pool().check_connection,
                    )
                    await pool.open(wait=True, timeout=10)
                    self._pool = pool
        return self._pool.connection()

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[tuple[Any, int]]:
        """A connection in one REPEATABLE READ transaction (one snapshot), and the watermark in it."""
        async with await self._connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await conn.execute("SELECT folded_xid FROM ledger_rollup_state")
            (mark,) = await cur.fetchone()
            yield conn, int(mark)

    async def _all(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """Run `sql` with `{mark}` replaced by the watermark, both in one snapshot."""
        async with self._snapshot() as (conn, mark):
            cur = await conn.execute(sql.replace("{mark}", str(mark)), params)
            return list(await cur.fetchall())

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close(timeout=1.0)
            self._pool = None

    # -- the port ------------------------------------------------------------------------------

    async def spend_by(self, by: str, window: Window) -> list[ReportRow]:
        from thrifty.stores.postgres import PostgresLedgerReader

        def scan() -> list[ReportRow]:
            reader = PostgresLedgerReader(self._url)
            try:
                return build_report(reader, by, window.since, until=window.until, tenant=window.tenant)
            finally:
                reader.close()

        return await asyncio.to_thread(scan)

    async def rollup_by(self, by: str, window: Window) -> list[ReportRow]:
        points = await self._rollup(by, DAY if by == "day" else 0, window)
        return _sorted([p.row for p in points])

    async def rollup_top(self, by: str, window: Window, limit: int) -> list[ReportRow]:
        if by == "user":
            return await self._top_users(window, limit)
        points = await self._rollup(by, 0, window, top=True)
        return _sorted([p.row for p in points])[:limit]

    async def rollup_series(self, by: str, bucket: Bucket, window: Window) -> list[SeriesPoint]:
        points = await self._rollup(by, BUCKET_WIDTH[bucket], window)
        return sorted(
            points, key=lambda p: (p.bucket, -p.row.cost_usd, p.row.group is None, p.row.group or "")
        )

    async def _rollup(self, by: str, width: int, window: Window, *, top: bool = False) -> list[SeriesPoint]:
        """One statement in one snapshot (`_all`): the rollup rows of the plan's parts and the ledger rows
        past the watermark, as hourly rollup rows, summed per (bucket, group)."""
        if by not in GROUP_COLUMNS:
            raise ValueError(f"by must be one of {', '.join(GROUP_COLUMNS)}")
        if not window.aligned:
            raise ValueError("rollups answer whole hours: since and until must be on the hour")
        user = by == "user"
        branches: list[str] = []
        params: list[Any] = []
        for grain, lo, hi in _plan(window.since, window.until, HOUR if width == HOUR else DAY):
            clauses = ["grain = %s"]
            params.append(grain + ("u" if user else ""))
            for clause, value in (
                ("bucket >= %s", lo),
                ("bucket < %s", hi),
                ("tenant_id = %s", window.tenant),
            ):
                if value is not None:
                    clauses.append(clause)
                    params.append(value)
            branches.append(f"SELECT {_ROLLUP_COLUMNS} FROM ledger_rollup WHERE {' AND '.join(clauses)}")
        clauses = [_TAIL]
        tail: tuple[tuple[str, float | str | None], ...] = (
            ("ts >= %s", window.since),
            ("ts < %s", window.until),
            ("tenant_id = %s", window.tenant),
        )
        for clause, tail_value in tail:
            if tail_value is not None:
                clauses.append(clause)
                params.append(tail_value)
        branches.append(f"SELECT {_ROW_AS_ROLLUP} FROM ledger WHERE {' AND '.join(clauses)}")
        column = '"user"' if user else GROUP_COLUMNS[by]
        bucket_sql = "0" if width == 0 else f"bucket / {width} * {width}"
        group_sql = f"bucket / {DAY} * {DAY}" if by == "day" else column
        sql = (
            f"SELECT {bucket_sql}, {group_sql}, {_TOP_SUMS if top else _SUMS} "
            f"FROM ({' UNION ALL '.join(branches)}) AS u GROUP BY 1, 2"
        )
        points = []
        for bucket, key, *values in await self._all(sql, params):
            group = _day_text(key) if by == "day" else (None if key is None else str(key))
            row = ReportRow(group)
            if top:
                row.requests, row.ok, row.cost_usd = int(values[0]), int(values[1]), Decimal(0) + values[2]
            else:
                add_measures(row, values[:_N_INT], [Decimal(0) + v for v in values[_N_INT:]])
            points.append(SeriesPoint(int(bucket), row))
        return points

    async def _top_users(self, window: Window, limit: int) -> list[ReportRow]:
        """The `limit` most expensive users from the running totals (two rows per user) and the ledger
        rows past the watermark; each winner's cost at the scale of its window's amounts (the totals
        keep the largest scale of all time), read from its own rollup rows, all in one snapshot."""
        if not window.aligned:
            raise ValueError("rollups answer whole hours: since and until must be on the hour")
        params: list[Any] = []
        upper = _LAST_TOTAL.format(bound="" if window.until is None else "AND c.bucket < %s")
        if window.until is not None:
            params.append(int(window.until))
        lower = ""
        if window.since is not None:
            lower = f"LEFT JOIN LATERAL {_LAST_TOTAL.format(bound='AND c.bucket < %s')} AS l ON true "
            params.append(int(window.since))
        scope = "k.tenant_id IS NULL"
        if window.tenant is not None:
            scope = "k.tenant_id = %s"
            params.append(window.tenant)
        if lower:
            measures = "h.requests - COALESCE(l.requests, 0), h.ok - COALESCE(l.ok, 0), "
            measures += "h.cost_usd - COALESCE(l.cost_usd, 0)"
        else:
            measures = "h.requests, h.ok, h.cost_usd"
        totals_sql = (
            f'SELECT k."user", {measures} FROM ledger_user_key AS k '
            f"CROSS JOIN LATERAL {upper} AS h {lower}WHERE {scope}"
        )
        tail_clauses, tail_params = _tail_clauses(window)
        tail_sql = (
            "SELECT \"user\", COUNT(*), SUM((status = 'ok')::int), COALESCE(SUM(cost_usd), 0), "
            f"MAX(scale(cost_usd)) FROM ledger WHERE {' AND '.join(tail_clauses)} GROUP BY 1"
        )
        async with self._snapshot() as (conn, mark):
            cur = await conn.execute(totals_sql, params)
            rows: dict[str | None, ReportRow] = {}
            for user, requests, ok, cost in await cur.fetchall():
                if requests:
                    row = rows[user] = ReportRow(user)
                    row.requests, row.ok, row.cost_usd = int(requests), int(ok), Decimal(0) + cost
            cur = await conn.execute(tail_sql.replace("{mark}", str(int(mark))), tail_params)
            scales: dict[str | None, int] = {}
            for user, requests, ok, cost, scale in await cur.fetchall():
                row = rows.get(user) or rows.setdefault(user, ReportRow(user))
                row.requests += int(requests)
                row.ok += int(ok)
                row.cost_usd += cost
                scales[user] = int(scale or 0)
            winners = _sorted(list(rows.values()))[:limit]
            for row in winners:
                scale = max(scales.get(row.group, 0), await _rollup_scale(conn, row.group, window))
                row.cost_usd = row.cost_usd.quantize(Decimal(1).scaleb(-scale))
        return winners

    async def budget_use(
        self, since: float, *, tenant: str | None, feature: str | None, route: str | None
    ) -> BudgetUse:
        rollup = ["grain = 'd'", "bucket >= %s"]
        tail = [_TAIL, "ts >= %s"]
        values: list[Any] = []
        for column, value in (("tenant_id", tenant), ("feature", feature), ("route", route)):
            if value is not None:
                rollup.append(f"{column} = %s")
                tail.append(f"{column} = %s")
                values.append(value)
        sql = (
            "SELECT COALESCE(SUM(c), 0), COALESCE(SUM(t), 0) FROM ("
            "SELECT cost_usd AS c, input_tokens + output_tokens AS t FROM ledger_rollup "
            f"WHERE {' AND '.join(rollup)} UNION ALL "
            f"SELECT cost_usd, input_tokens + output_tokens FROM ledger WHERE {' AND '.join(tail)}) AS u"
        )
        ((usd, tokens),) = await self._all(sql, [int(since), *values, since, *values])
        return BudgetUse(Decimal(0) + usd, int(tokens))

    async def requests(
        self, window: Window, *, limit: int, before: tuple[float, str] | None = None
    ) -> list[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("ts >= %s", window.since),
            ("ts < %s", window.until),
            ("tenant_id = %s", window.tenant),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if before is not None:
            clauses.append("(ts, request_id) < (%s, %s)")
            params.extend(before)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        async with await self._connection() as conn:
            cur = await conn.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM ledger{where} ORDER BY ts DESC, request_id DESC LIMIT %s",
                [*params, limit],
            )
            names = [d.name for d in cur.description]
            found = await cur.fetchall()
        out = []
        for values in found:
            record = dict(zip(names, values, strict=True))
            for money in ("cost_usd", "saved_usd", "retry_cost_usd"):
                if record[money] is not None:
                    record[money] = decimal_text(record[money])  # as SQLite stores it: exact text
            record["escalated"] = bool(record["escalated"])
            out.append(record)
        return out

    async def alerts(self, since: float, *, limit: int) -> list[dict[str, Any]]:
        async with await self._connection() as conn:
            cur = await conn.execute(
                "SELECT ts, kind, scope, message, delivered_at, delivery_error FROM alerts "
                "WHERE ts >= %s ORDER BY ts DESC LIMIT %s",
                (since, limit),
            )
            names = [d.name for d in cur.description]
            return [dict(zip(names, values, strict=True)) for values in await cur.fetchall()]

    async def fold(self, min_rows: int = 0) -> int:
        """Fold the committed rows past the watermark; 0 when another replica is folding, or
        fewer than `min_rows` wait."""
        async with await self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT folded_xid FROM ledger_rollup_state WHERE id = 1 FOR UPDATE SKIP LOCKED"
            )
            locked = await cur.fetchone()
            if locked is None:
                return 0
            if min_rows:
                cur = await conn.execute(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM ledger WHERE txid >= %s LIMIT %s) AS w",
                    (locked[0], min_rows),
                )
                if (await cur.fetchone())[0] < min_rows:
                    return 0
            cur = await conn.execute(FOLD_SQL, {"mark": locked[0]})
            (folded,) = await cur.fetchone()
            return int(folded)

    async def rebuild_rollups(self) -> int:
        async with await self._connection() as conn, conn.transaction():
            await conn.execute("SELECT folded_xid FROM ledger_rollup_state WHERE id = 1 FOR UPDATE")
            await conn.execute("DELETE FROM ledger_rollup")
            await conn.execute("DELETE FROM ledger_user_cum")
            await conn.execute("DELETE FROM ledger_user_key")
            await conn.execute("UPDATE ledger_rollup_state SET folded_xid = 0 WHERE id = 1")
        return await self.fold()


__all__ = ["FOLD_SQL", "PostgresReportingStore"]
