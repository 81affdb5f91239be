"""Rollups written with the ledger batch equal a scan of the ledger, to the exact Decimal."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from tests.factories import ledger_entry
from thrifty.report import GROUP_COLUMNS
from thrifty.stores.ledger import INSERT_ENTRY_SQL, LedgerWriter, entry_row
from thrifty.stores.reporting import SqliteReportingStore, Window
from thrifty.stores.rollups import HOUR
from thrifty.stores.sqlite_db import MIGRATIONS, migrate, open_database
from thrifty.types import LedgerEntry, Usage

# 2026-11-30 22:00 UTC: the rows straddle a day boundary, so day and hour edges are both exercised.
T0 = 1_764_540_000.0


def varied_entries(n: int = 120, t0: float = T0) -> list[LedgerEntry]:
    tenants, features, routes, models = (
        ["acme", "globex"],
        ["chat", "search", None],
        ["support", None],
        ["a", "b"],
    )
    out = []
    for i in range(n):
        cost = None if i % 17 == 0 else f"0.{i:03d}000{i % 7}1"
        base = ledger_entry(
            f"req_{i:05d}",
            ts=t0 + i * 173.3,
            tenant=tenants[i % 2],
            feature=features[i % 3],
            prompt_version=f"v{i % 2}",
            cost=cost,
            status="ok" if i % 5 else "error",
            usage=Usage(
                input_tokens=100 + i, cached_input_tokens=i % 10, output_tokens=7 * i, estimated=i % 11 == 0
            ),
            failed_attempt_costs=("0.0000003",) if i % 6 == 0 else (),
        )
        cache = ("miss", "exact", "semantic", "dedup")[i % 4] if i % 3 == 0 else "miss"
        out.append(
            dataclasses.replace(
                base,
                user=f"u{i % 4}" if i % 9 else None,
                route=routes[i % 2],
                model=models[i % 2],
                cache=cache,
                saved_usd=Decimal("0.0125") if cache != "miss" else None,
                escalated=i % 8 == 0,
                http_status=429 if i % 13 == 0 else base.http_status,
                context=None if i % 5 else {"saved": i, "finish_reason": ("length", "stop", None)[i % 3]},
            )
        )
    return out


async def _write(db: Path, entries: list[LedgerEntry]) -> None:
    writer = LedgerWriter(db)
    writer.start(asyncio.get_running_loop())
    for chunk in (entries[:50], entries[50:51], entries[51:]):  # several batches
        await asyncio.gather(*(writer.submit(e) for e in chunk))
    writer.close()


def _json(rows: list) -> list:
    return [r.to_json() for r in rows]


async def test_rollups_equal_the_ledger_scan_for_every_dimension_and_window(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    entries = varied_entries()
    await _write(db, entries)
    store = SqliteReportingStore(db)
    windows = [
        Window(),
        Window(since=T0 + 2 * HOUR),
        Window(until=T0 + 3 * HOUR),
        Window(since=T0 + HOUR, until=T0 + 4 * HOUR, tenant="acme"),
        Window(since=T0 - 86400, until=T0 + 86400, tenant="globex"),
    ]
    for window in windows:
        for by in GROUP_COLUMNS:
            scanned = await store.spend_by(by, window)
            assert _json(await store.rollup_by(by, window)) == _json(scanned), (by, window)
    # A spot check that the sums are real: the acme cost is the Decimal sum of its entries.
    (acme,) = [r for r in await store.rollup_by("tenant", Window()) if r.group == "acme"]
    assert acme.cost_usd == sum(
        (e.cost_usd or Decimal(0) for e in entries if e.tenant_id == "acme"), Decimal(0)
    )


async def test_series_per_hour_and_day_sum_to_the_totals(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    entries = varied_entries()
    await _write(db, entries)
    store = SqliteReportingStore(db)
    for bucket in ("hour", "day"):
        points = await store.rollup_series("model", bucket, Window())
        totals: dict[str | None, Decimal] = {}
        for p in points:
            totals[p.row.group] = totals.get(p.row.group, Decimal(0)) + p.row.cost_usd
        assert totals == {r.group: r.cost_usd for r in await store.spend_by("model", Window())}
    hours = {p.bucket for p in await store.rollup_series("tenant", "hour", Window())}
    assert hours == {int(e.ts // HOUR) * HOUR for e in entries}


async def test_a_resubmitted_request_id_is_rolled_up_once(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    entry = varied_entries(1)[0]
    await _write(db, [entry, entry])
    await _write(db, [entry])
    (row,) = await SqliteReportingStore(db).rollup_by("tenant", Window())
    assert row.requests == 1


async def test_unaligned_windows_are_refused_by_the_rollups(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    with pytest.raises(ValueError, match="on the hour"):
        await SqliteReportingStore(db).rollup_by("tenant", Window(since=T0 + 1))


async def test_existing_ledgers_are_rolled_up_by_the_migration_and_by_rebuild(tmp_path: Path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for version, sql in MIGRATIONS:
        if version == 12:
            continue
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    entries = varied_entries()
    conn.executemany(INSERT_ENTRY_SQL, [entry_row(e) for e in entries])  # written before rollups existed
    assert migrate(conn) == [12]
    store = SqliteReportingStore(db)
    for by in GROUP_COLUMNS:
        assert _json(await store.rollup_by(by, Window())) == _json(await store.spend_by(by, Window())), by
    migrated = conn.execute("SELECT * FROM ledger_rollup ORDER BY grain, bucket, dims").fetchall()
    conn.execute("DELETE FROM ledger_rollup")
    assert await store.rebuild_rollups() == len(entries)
    assert conn.execute("SELECT * FROM ledger_rollup ORDER BY grain, bucket, dims").fetchall() == migrated
    conn.close()


async def test_amounts_finer_than_a_pico_dollar_and_millions_stay_exact(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    costs = ["0.0000000000001234", "0.1", "3000000.000001", "3000000", "2000000.5", "0.00000000000000001"]
    entries = [
        dataclasses.replace(ledger_entry(f"r{i}", ts=T0 + i, cost=c), saved_usd=Decimal(c))
        for i, c in enumerate(costs)
    ]
    await _write(db, entries[:2])
    await _write(db, entries[2:4])  # $6M in one batch: past what fits in 2^62 pico-USD
    await _write(db, entries[4:])
    store = SqliteReportingStore(db)
    (row,) = await store.rollup_by("tenant", Window())
    assert row.cost_usd == sum((Decimal(c) for c in costs), Decimal(0))
    assert row.to_json() == (await store.spend_by("tenant", Window()))[0].to_json()
