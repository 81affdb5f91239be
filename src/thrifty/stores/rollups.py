"""Hourly and daily rollups of the ledger, maintained by the ledger writer as it commits a batch.

The dashboard reads these instead of the ledger, so a page over ten million rows reads a few
thousand. The writer folds its batch in Python first (one dict update per row), then writes one
UPSERT per distinct (grain, bucket, dimensions) key, inside the batch's own transaction: a row is
in the rollups exactly when it is in the ledger. Money stays exact decimal text
(whole pico-USD summed by SQLite, see migration 12).

Grains: `h` and `d` (hour, UTC day) by tenant, feature, route, prompt version and model; `hu` and
`du` by tenant and user, kept apart so that many users do not multiply the main grain's rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from thrifty.stores.sqlite_db import split_money

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
)
MONEY_FIELDS = (
    "cost_usd",
    "error_cost_usd",
    "retry_cost_usd",
    "saved_usd",
    "exact_saved_usd",
    "semantic_saved_usd",
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
_STATUS, _HTTP, _CONTEXT = 22, 23, 30


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
        cost = row[_COST]
        if cost is None:
            acc[10] += 1
        else:
            amount = Decimal(cost)
            acc[16] = amount if acc[16] is None else acc[16] + amount
            if not ok:
                acc[17] = amount if acc[17] is None else acc[17] + amount
        if row[_RETRY_COST] is not None:
            acc[18] = _add(acc[18], Decimal(row[_RETRY_COST]))
        if row[_SAVED] is not None:
            saved = Decimal(row[_SAVED])
            acc[19] = _add(acc[19], saved)
            if cache == "exact":
                acc[20] = _add(acc[20], saved)
            elif cache == "semantic":
                acc[21] = _add(acc[21], saved)
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


def add_rollups(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
    """Fold committed-to-be ledger rows into the rollups; call inside the batch's transaction."""
    if rows:
        conn.executemany(UPSERT_SQL, fold_rows(rows))


def rebuild_rollups(conn: sqlite3.Connection, *, chunk: int = 50_000) -> int:
    """Recompute every rollup from the ledger (an existing ledger, or after a repair); returns the
    number of ledger rows read. One transaction: readers see the old rollups or the new ones."""
    from thrifty.stores.ledger import _COLUMNS

    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM ledger_rollup")
        count = 0
        cursor = conn.execute(f"SELECT {_COLUMNS} FROM ledger")
        while batch := cursor.fetchmany(chunk):
            add_rollups(conn, batch)
            count += len(batch)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return count


__all__ = ["DAY", "HOUR", "MEASURES", "MONEY_FIELDS", "add_rollups", "fold_rows", "rebuild_rollups"]
