"""Hourly and daily rollups of the ledger, folded behind a watermark, off the requests' path.

The dashboard reads these instead of the ledger, so a page over ten million rows reads a few
thousand. Nothing folds on the commit path: whoever writes ledger rows (the ledger writer, the
batch store, a bulk import) only INSERTs them. `fold_pending` later aggregates every ledger row past
the watermark (`ledger_rollup_state.folded_rowid`) in one SQL statement, computed outside the write
lock, then UPSERTs the few aggregated rows and moves the watermark in one short transaction. The
gateway runs it on a timer (`dashboard.fold_interval_s`) on a worker thread, and once at start, so a
killed process loses nothing: the next fold starts from the watermark.

Readers stay exact however far behind the folder is: a rollup read adds the rows past the
watermark, aggregated from the ledger itself with the same SQL, in the same read transaction
(`tail_sql`). SQLite's rowids grow with every insert (one writer at a time, the ledger is
append-only), so "rowid > watermark" is exactly the rows not folded yet.

Money stays exact: whole pico-USD summed by SQLite, the rest (amounts finer than a pico-USD or of a
million dollars and more) as decimal text summed in Python (see migration 12).

Grains: `h` and `d` (hour, UTC day) by tenant, feature, route, prompt version and model; `hu` and
`du` by tenant and user, kept apart so that many users do not multiply the main grain's rows. The
same fold keeps running totals per user (stores/user_totals.py), which rank users over any window.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from thrifty.stores.sqlite_money import join_money, split_money
from thrifty.stores.user_totals import HourlySums, fold_user_totals, reset_user_totals

log = logging.getLogger(__name__)

HOUR = 3600
DAY = 86400
GRAINS: dict[str, tuple[int, bool]] = {
    "h": (HOUR, False),
    "d": (DAY, False),
    "hu": (HOUR, True),
    "du": (DAY, True),
}

# Measures in table order; the first block is integers, MONEY_FIELDS exact decimals.
INT_FIELDS = (
    "requests",
    "ok",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "budget_rejections",
    "exact_hits",
    "semantic_hits",
    "escalated",
    "retries",
    "unpriced",
    "estimated",
    "dedup_hits",
    "context_tokens_saved",
    "output_budgeted",
    "length_cutoffs",
    "batch_requests",
)
MONEY_FIELDS = (
    "cost_usd",
    "error_cost_usd",
    "retry_cost_usd",
    "saved_usd",
    "exact_saved_usd",
    "semantic_saved_usd",
    "batch_cost_usd",
    "batch_saved_usd",
)
MEASURES = INT_FIELDS + MONEY_FIELDS
MONEY_COLUMNS = tuple(f"{f}_{part}" for f in MONEY_FIELDS for part in ("pico", "exp", "rest"))
_KEY_COLUMNS = "grain, bucket, dims, tenant_id, feature, route, prompt_version, model, user"
_N_VALUES = 8 + len(INT_FIELDS) + len(MONEY_COLUMNS)

UPSERT_SQL = (
    f"INSERT INTO ledger_rollup ({_KEY_COLUMNS}, {', '.join(INT_FIELDS)}, {', '.join(MONEY_COLUMNS)}) "
    "VALUES (?1, ?2, "
    "CASE WHEN ?1 IN ('hu', 'du') THEN json_array(?3, ?8) ELSE json_array(?3, ?4, ?5, ?6, ?7) END, "
    f"?3, ?4, ?5, ?6, ?7, ?8, {', '.join(f'?{i}' for i in range(9, _N_VALUES + 1))}) "
    "ON CONFLICT (grain, bucket, dims) DO UPDATE SET "
    + ", ".join(f"{f} = {f} + excluded.{f}" for f in INT_FIELDS)
    + ", "
    + ", ".join(
        f"{f}_pico = {f}_pico + excluded.{f}_pico, {f}_exp = min({f}_exp, excluded.{f}_exp), "
        # Python is called only for an amount finer than a pico-USD (an override's odd price).
        f"{f}_rest = CASE WHEN excluded.{f}_rest IS NULL THEN {f}_rest "
        f"ELSE thrifty_dec_add({f}_rest, excluded.{f}_rest) END"
        for f in MONEY_FIELDS
    )
)

# Positions in a ledger row tuple (stores/ledger.py `_COLUMNS`).
_TS, _TENANT, _USER, _FEATURE, _ROUTE, _PV, _MODEL = 1, 2, 3, 4, 5, 6, 7
_IN, _CACHED, _OUT, _ESTIMATED, _COST, _SAVED, _CACHE, _ESCALATED, _RETRIES, _RETRY_COST = (
    10,
    11,
    13,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
)
_STATUS, _HTTP, _BATCH, _CONTEXT = 22, 23, 28, 30
# Positions of the money measures in an accumulator (after INT_FIELDS).
_M_COST, _M_ERROR, _M_RETRY, _M_SAVED, _M_EXACT, _M_SEMANTIC, _M_BATCH_COST, _M_BATCH_SAVED = (
    len(INT_FIELDS) + i for i in range(len(MONEY_FIELDS))
)


def _add(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def fold_rows(rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """A batch of ledger rows -> UPSERT parameter tuples, one per distinct grain key."""
    # First per (hour, all dimensions): one dict update per row, whatever the grains.
    fine: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        hour = int(row[_TS] // HOUR) * HOUR
        key = (hour, row[_TENANT], row[_FEATURE], row[_ROUTE], row[_PV], row[_MODEL], row[_USER])
        acc = fine.get(key)
        if acc is None:
            acc = fine[key] = [0] * len(INT_FIELDS) + [None] * len(MONEY_FIELDS)
        ok = row[_STATUS] == "ok"
        cache = row[_CACHE]
        acc[0] += 1
        acc[1] += ok
        acc[2] += row[_IN]
        acc[3] += row[_CACHED]
        acc[4] += row[_OUT]
        acc[5] += row[_HTTP] == 429
        acc[6] += cache == "exact"
        acc[7] += cache == "semantic"
        acc[8] += row[_ESCALATED]
        acc[9] += row[_RETRIES]
        acc[11] += row[_ESTIMATED]
        acc[12] += cache == "dedup"
        context = row[_CONTEXT]
        if context is not None:  # only on routes with context or output budgets
            budgets = orjson.loads(context)
            acc[13] += budgets.get("saved") or 0
            finish = budgets.get("finish_reason")
            if finish is not None:
                acc[14] += 1
                acc[15] += finish == "length"
        batch = bool(row[_BATCH])
        acc[16] += batch
        cost = row[_COST]
        if cost is None:
            acc[10] += 1
        else:
            amount = Decimal(cost)
            acc[_M_COST] = _add(acc[_M_COST], amount)
            if not ok:
                acc[_M_ERROR] = _add(acc[_M_ERROR], amount)
            if batch:
                acc[_M_BATCH_COST] = _add(acc[_M_BATCH_COST], amount)
        if row[_RETRY_COST] is not None:
            acc[_M_RETRY] = _add(acc[_M_RETRY], Decimal(row[_RETRY_COST]))
        if row[_SAVED] is not None:
            saved = Decimal(row[_SAVED])
            acc[_M_SAVED] = _add(acc[_M_SAVED], saved)
            if cache == "exact":
                acc[_M_EXACT] = _add(acc[_M_EXACT], saved)
            elif cache == "semantic":
                acc[_M_SEMANTIC] = _add(acc[_M_SEMANTIC], saved)
            if batch:
                acc[_M_BATCH_SAVED] = _add(acc[_M_BATCH_SAVED], saved)
    coarse: dict[tuple[Any, ...], list[Any]] = {}
    for (hour, tenant, feature, route, pv, model, user), acc in fine.items():
        day = hour // DAY * DAY
        grain_key: tuple[Any, ...]
        for grain_key in (
            ("h", hour, tenant, feature, route, pv, model, None),
            ("d", day, tenant, feature, route, pv, model, None),
            ("hu", hour, tenant, None, None, None, None, user),
            ("du", day, tenant, None, None, None, None, user),
        ):
            into = coarse.get(grain_key)
            if into is None:
                coarse[grain_key] = list(acc)
                continue
            for i in range(len(INT_FIELDS)):
                into[i] += acc[i]
            for i in range(len(INT_FIELDS), len(MEASURES)):
                into[i] = _add(into[i], acc[i])
    n_int = len(INT_FIELDS)
    out = []
    for key, acc in coarse.items():
        values = [*key, *acc[:n_int]]
        for amount in acc[n_int:]:
            values.extend(split_money(amount))
        out.append(tuple(values))
    return out


# -- SQL aggregation -------------------------------------------------------------------------------


def _parts(column: str, prefix: str) -> str:
    """A decimal text column as (whole pico-USD, exponent, rest), cheaply. Below $1,000 with at most
    12 decimals (every real amount) the pico-USD are round(value * 1e12) in binary floating point,
    and that is exact: the value P * 1e-12 is parsed to within one ulp and the product rounded to
    within another, so the result is within P * 3.4e-16 < 0.35 of the integer P < 1e15. Any other
    amount goes whole into `rest`, summed exactly in Python. The exponent is minus the decimals."""
    point = f"instr({column}, '.')"
    exponent = f"(CASE WHEN {point} THEN {point} - length({column}) ELSE 0 END)"
    simple = f"(abs({column}) < 1000 AND {exponent} >= -12)"
    return (
        f"CASE WHEN {column} IS NOT NULL AND {simple} THEN CAST(round({column} * 1e12) AS INTEGER) "
        f"ELSE 0 END AS {prefix}_pico, "
        f"CASE WHEN {column} IS NULL THEN 0 ELSE {exponent} END AS {prefix}_exp, "
        f"CASE WHEN {column} IS NOT NULL AND NOT {simple} THEN {column} END AS {prefix}_rest"
    )


_PICO = 10**12  # (the Python fallback's unit, see sqlite_money.split_money)


# One ledger row as the measures need it; `{where}` selects the rows.
ROW_PARTS_SQL = (
    "SELECT CAST(ts AS INTEGER) AS ts_i, ts, tenant_id, feature, route, prompt_version, model, user, "
    "status, input_tokens, cached_input_tokens, output_tokens, http_status, cache, escalated, retries, "
    "batch, "
    "cost_usd IS NULL AS unpriced, usage_estimated, "
    "COALESCE(json_extract(context, '$.saved'), 0) AS ctx_saved, "
    "json_extract(context, '$.finish_reason') AS ctx_finish, "
    f"{_parts('cost_usd', 'c')}, {_parts('saved_usd', 's')}, {_parts('retry_cost_usd', 'r')} "
    "FROM ledger WHERE {where}"
)


def _money_sums(prefix: str, condition: str | None, int_sum: str) -> str:
    if condition is None:
        return (
            f"{int_sum}({prefix}_pico), MIN({prefix}_exp), "
            f"thrifty_dec_sum({prefix}_rest) FILTER (WHERE {prefix}_rest IS NOT NULL)"
        )
    return (
        f"{int_sum}(CASE WHEN {condition} THEN {prefix}_pico ELSE 0 END), "
        f"MIN(CASE WHEN {condition} THEN {prefix}_exp ELSE 0 END), "
        f"thrifty_dec_sum({prefix}_rest) FILTER (WHERE {prefix}_rest IS NOT NULL AND {condition})"
    )


def measures_sql(*, top: bool = False, int_sum: str = "SUM") -> str:
    """Aggregates over ROW_PARTS_SQL rows, in the rollup's measure order (INT_FIELDS, then each of
    MONEY_FIELDS as pico, exponent, rest): what a rollup row holds for the same rows. `top`: what
    rankings need (requests, successes, cost); `int_sum`: thrifty_int_sum past 2^63 pico-USD."""
    if top:
        return f"COUNT(*), SUM(status = 'ok'), {_money_sums('c', None, int_sum)}"
    return ", ".join(
        [
            "COUNT(*)",
            "SUM(status = 'ok')",
            "SUM(input_tokens)",
            "SUM(cached_input_tokens)",
            "SUM(output_tokens)",
            "SUM(http_status = 429)",
            "SUM(cache = 'exact')",
            "SUM(cache = 'semantic')",
            "SUM(escalated)",
            "SUM(retries)",
            "SUM(unpriced)",
            "SUM(usage_estimated)",
            "SUM(cache = 'dedup')",
            "SUM(ctx_saved)",
            "SUM(ctx_finish IS NOT NULL)",
            "SUM(COALESCE(ctx_finish = 'length', 0))",
            "SUM(batch != 0)",
            _money_sums("c", None, int_sum),
            _money_sums("c", "status != 'ok'", int_sum),
            _money_sums("r", None, int_sum),
            _money_sums("s", None, int_sum),
            _money_sums("s", "cache = 'exact'", int_sum),
            _money_sums("s", "cache = 'semantic'", int_sum),
            _money_sums("c", "batch != 0", int_sum),
            _money_sums("s", "batch != 0", int_sum),
        ]
    )


_GRAINS_SQL = " UNION ALL ".join(
    f"SELECT '{grain}' AS grain, {width} AS width, {int(by_user)} AS by_user"
    for grain, (width, by_user) in GRAINS.items()
)
_N_SUMS = len(INT_FIELDS) + 3 * len(MONEY_FIELDS)


def _resum(i: int) -> str:
    """Summing measure column m{i} of already-summed rows again (ints, then pico/exp/rest triples)."""
    if i < len(INT_FIELDS) or (i - len(INT_FIELDS)) % 3 == 0:
        return f"SUM(m{i})"
    if (i - len(INT_FIELDS)) % 3 == 1:
        return f"MIN(m{i})"
    return f"thrifty_dec_sum(m{i}) FILTER (WHERE m{i} IS NOT NULL)"


def _named(measures: str) -> str:
    # The measures as columns m0, m1, ... (split on the top-level commas of measures_sql()).
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(measures):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(measures[start:k].strip())
            start = k + 1
    parts.append(measures[start:].strip())
    assert len(parts) == _N_SUMS
    return ", ".join(f"{p} AS m{i}" for i, p in enumerate(parts))


# Ledger rows with ?1 < rowid <= ?2 as UPSERT_SQL parameters, one per grain key. Each row's money
# is parsed once (`t`), summed per hour and every dimension (`fine`), and only those sums are
# rolled into the four grains: a row costs one pass, not one per grain.
FOLD_SQL = (
    "WITH t AS MATERIALIZED ("
    + ROW_PARTS_SQL.format(where="rowid > ?1 AND rowid <= ?2")
    + "), fine AS MATERIALIZED (SELECT ts_i - ts_i % 3600 AS hour, tenant_id, feature, route, "
    f"prompt_version, model, user, {_named(measures_sql())} FROM t GROUP BY 1, 2, 3, 4, 5, 6, 7) "
    "SELECT g.grain, f.hour - f.hour % g.width, f.tenant_id, "
    "CASE WHEN g.by_user THEN NULL ELSE f.feature END, CASE WHEN g.by_user THEN NULL ELSE f.route END, "
    "CASE WHEN g.by_user THEN NULL ELSE f.prompt_version END, "
    "CASE WHEN g.by_user THEN NULL ELSE f.model END, CASE WHEN g.by_user THEN f.user END, "
    + ", ".join(_resum(i) for i in range(_N_SUMS))
    + f" FROM fine AS f CROSS JOIN ({_GRAINS_SQL}) AS g GROUP BY 1, 2, 3, 4, 5, 6, 7, 8"
)
WATERMARK_SQL = "SELECT folded_rowid FROM ledger_rollup_state"


def tail_sql(select: str, where: str, group_by: str, measures: str) -> str:
    """An aggregate over the ledger rows not folded yet (past the watermark) that also match
    `where` (over the ledger's columns, each written `+column` so that SQLite scans the rowid range
    past the watermark rather than, say, 30 days of the ts index): `select`, then `measures`."""
    rows = ROW_PARTS_SQL.format(where=f"rowid > ({WATERMARK_SQL}) AND {where}")
    return f"SELECT {select}, {measures} FROM ({rows}) GROUP BY {group_by}"


def _aggregate(conn: sqlite3.Connection, after: int, upto: int) -> list[tuple[Any, ...]]:
    try:
        return conn.execute(FOLD_SQL, (after, upto)).fetchall()
    except sqlite3.OperationalError as err:
        if "overflow" not in str(err):
            raise
    # Over 2^63 pico-USD ($9.2M) in one key of one fold: Python's integers do not overflow.
    from thrifty.stores.ledger import _COLUMNS

    rows = conn.execute(f"SELECT {_COLUMNS} FROM ledger WHERE rowid > ? AND rowid <= ?", (after, upto))
    return fold_rows(rows.fetchall())


_COST = 8 + len(INT_FIELDS)  # cost_usd's (pico, exponent, rest) in an UPSERT's parameters


def hourly_user_sums(params: Iterable[Sequence[Any]]) -> list[HourlySums]:
    """The (hour, tenant, user) keys of a fold's UPSERT parameters, for the running user totals."""
    return [
        (p[2], p[7], p[1], int(p[8]), int(p[9]), join_money(p[_COST], p[_COST + 1], p[_COST + 2]))
        for p in params
        if p[0] == "hu"
    ]


def fold_pending(conn: sqlite3.Connection, *, chunk: int = 200_000, min_rows: int = 0) -> int:
    """Fold every ledger row past the watermark into the rollups; return how many rows it read.
    `min_rows`: do nothing while fewer rows than that are waiting (a fold has a fixed cost).

    The aggregate is computed in a read transaction (the ledger writer keeps writing); only the
    UPSERT of its few rows and the watermark's move hold the write lock. Safe to run from several
    processes at once: a fold whose watermark moved meanwhile is dropped and recomputed."""
    folded = 0
    while True:
        (mark,) = conn.execute(WATERMARK_SQL).fetchone()
        (top,) = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM ledger").fetchone()
        if top < mark:
            # Rowids renumbered under the watermark (rows deleted, then VACUUM): start again.
            log.warning("ledger rowids are below the rollup watermark; rebuilding the rollups")
            _reset(conn)
            continue
        if top == mark or (folded == 0 and top - mark < min_rows):
            return folded
        upto = min(top, mark + chunk)
        conn.execute("BEGIN")  # one snapshot for the aggregate
        try:
            params = _aggregate(conn, mark, upto)
        finally:
            conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute(WATERMARK_SQL).fetchone()[0] != mark:
                conn.execute("ROLLBACK")  # another process folded these rows meanwhile
                continue
            conn.executemany(UPSERT_SQL, params)
            fold_user_totals(conn, hourly_user_sums(params))
            conn.execute("UPDATE ledger_rollup_state SET folded_rowid = ?", (upto,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        folded += sum(p[8] for p in params if p[0] == "h")  # each row is in one hourly key


def _reset(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM ledger_rollup")
        reset_user_totals(conn)
        conn.execute("UPDATE ledger_rollup_state SET folded_rowid = 0")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def rebuild_rollups(conn: sqlite3.Connection) -> int:
    """Recompute every rollup from the ledger (after a repair); returns the ledger rows read.
    Readers stay exact meanwhile: the rows not folded again yet are read from the ledger."""
    _reset(conn)
    return fold_pending(conn)


__all__ = [
    "DAY",
    "HOUR",
    "MEASURES",
    "MONEY_FIELDS",
    "fold_pending",
    "fold_rows",
    "measures_sql",
    "rebuild_rollups",
    "tail_sql",
]
