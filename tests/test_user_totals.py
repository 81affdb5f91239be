"""Rankings of users from the running user totals (stores/user_totals.py) equal the ledger scan,
to the exact Decimal and its written exponent, for any window of whole hours, however much is
folded, when rows arrive for hours older than a user's last total, and after the migration that
builds the totals from an existing database's hourly rollups."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest

from tests.factories import ledger_entry
from tests.test_rollups import T0, _write, varied_entries
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.reporting import ReportingStore, SqliteReportingStore, Window
from thrifty.stores.rollups import DAY, HOUR, fold_pending
from thrifty.stores.sqlite_db import connect, migrate, open_database
from thrifty.types import LedgerEntry

TOP_FIELDS = ("group", "requests", "ok", "cost_usd", "cost_per_success_usd")
DAY0 = T0 - T0 % DAY  # the UTC day T0 falls in (T0 is 22:00)


def spread_entries(n: int = 147) -> list[LedgerEntry]:
    """varied_entries over ~3.5 days (users u0-u3 and unset, two tenants), so windows have whole
    days in the middle and partial days at both ends."""
    spread = [dataclasses.replace(e, ts=T0 + i * 2011.7) for i, e in enumerate(varied_entries(n))]
    # A user whose first amount has 17 decimals and later ones 2 and 0: a window over the later
    # ones is written with 2 decimals, though the user's running total has 17.
    finer = [(T0 + 600, "0.00000000000000001"), (DAY0 + DAY + 5 * HOUR, "0.10"), (DAY0 + 2 * DAY, "7")]
    return spread + [
        dataclasses.replace(ledger_entry(f"s{i}", ts=ts, tenant="acme", cost=c), user="u9", saved_usd=None)
        for i, (ts, c) in enumerate(finer)
    ]


def windows() -> list[Window]:
    out = [Window(), Window(tenant="acme")]
    for lo, hi in [
        (None, DAY0 + DAY + 5 * HOUR),
        (DAY0 + DAY + 3 * HOUR, None),
        (DAY0 + 23 * HOUR, DAY0 + DAY + 2 * HOUR),  # across midnight, no whole day
        (DAY0 + DAY + 4 * HOUR, DAY0 + DAY + 9 * HOUR),  # inside one day
        (DAY0 + 22 * HOUR, DAY0 + 3 * DAY + 7 * HOUR),  # two whole days and both edges
        (DAY0 + DAY, DAY0 + 3 * DAY),  # whole days only
        (DAY0 - 5 * DAY, DAY0 - 4 * DAY),  # before anything
    ]:
        out += [Window(lo, hi), Window(lo, hi, tenant="globex")]
    return out


def _top(rows: list) -> list[dict]:
    return [{k: r.to_json()[k] for k in TOP_FIELDS} for r in rows]


async def assert_rankings_exact(store: ReportingStore) -> None:
    for window in windows():
        scanned = await store.spend_by("user", window)
        for limit in (1, 3, 100):
            ranked = await store.rollup_top("user", window, limit)
            assert _top(ranked) == _top(scanned[:limit]), (window, limit)


def _totals(db: Path) -> list[tuple]:
    conn = connect(db)
    try:
        rows = conn.execute(
            "SELECT k.tenant_id, k.user, c.bucket, c.requests, c.ok, c.cost_usd FROM ledger_user_cum AS c "
            "JOIN ledger_user_key AS k ON k.id = c.key"
        ).fetchall()
    finally:
        conn.close()
    return sorted((t or "", u or "", b, r, o, Decimal(c)) for t, u, b, r, o, c in rows)


@pytest.mark.parametrize("fold_after", [None, 1, 3], ids=["all-tail", "half-folded", "all-folded"])
async def test_user_rankings_equal_the_ledger_scan_for_any_window(tmp_path: Path, fold_after):
    db = tmp_path / "l.db"
    open_database(db).close()
    await _write(db, spread_entries(), fold_after=fold_after)
    await assert_rankings_exact(SqliteReportingStore(db))


async def test_rows_for_hours_before_a_users_last_total_rewrite_its_later_totals(tmp_path: Path):
    entries = spread_entries()
    late, db = tmp_path / "late.db", tmp_path / "in_order.db"
    for path in (late, db):
        open_database(path).close()
    # The newer half first and folded; then the older half (an import, batch results), folded.
    await _write(late, entries[75:], fold_after=3)
    await _write(late, entries[:75], fold_after=3)
    await assert_rankings_exact(SqliteReportingStore(late))
    await _write(db, entries, fold_after=3)
    assert _totals(late) == _totals(db)
    assert await SqliteReportingStore(late).rebuild_rollups() == len(entries)
    assert _totals(late) == _totals(db)


async def test_the_migration_builds_the_totals_from_the_hourly_user_rollups(tmp_path: Path):
    db = tmp_path / "l.db"
    conn = open_database(db)
    entries = spread_entries()
    conn.executemany(INSERT_ENTRY_SQL, [entry_row(e) for e in entries[:100]])
    assert fold_pending(conn) == 100
    conn.executemany(INSERT_ENTRY_SQL, [entry_row(e) for e in entries[100:]])  # past the watermark
    folded = _totals(db)
    # A database from before the totals: their tables and migration gone, the rollups kept.
    conn.execute("DROP TABLE ledger_user_cum")
    conn.execute("DROP TABLE ledger_user_key")
    conn.execute("DELETE FROM schema_migrations WHERE version = 20")
    assert migrate(conn) == [20]
    conn.close()
    assert _totals(db) == folded
    await assert_rankings_exact(SqliteReportingStore(db))


async def test_rankings_stay_exact_past_2_63_pico_dollars_and_below_a_pico_dollar(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    costs = ["999999.999999999999"] * 12 + ["0.00000000000000001", "0.10", "7"]
    entries = [
        dataclasses.replace(ledger_entry(f"r{i}", ts=T0 + i * 600, cost=c), user=f"u{i % 2}", saved_usd=None)
        for i, c in enumerate(costs)
    ]
    await _write(db, entries, fold_after=1)
    store = SqliteReportingStore(db)
    await assert_rankings_exact(store)
    await store.fold()
    await assert_rankings_exact(store)
    (top,) = await store.rollup_top("user", Window(), 1)
    assert top.cost_usd == sum((Decimal(c) for c in costs[::2]), Decimal(0))
