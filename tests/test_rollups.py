"""Rollups (folded behind a watermark, plus the ledger rows past it) equal a scan of the ledger,
to the exact Decimal, however much of the ledger is folded."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from tests.factories import ledger_entry
from thrifty.report import GROUP_COLUMNS
from thrifty.stores.ledger import INSERT_ENTRY_SQL, LedgerWriter, entry_row
from thrifty.stores.reporting import SqliteReportingStore, Window
from thrifty.stores.rollups import HOUR, fold_pending, rebuild_rollups
from thrifty.stores.sqlite_db import MIGRATIONS, connect, migrate, open_database
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
                batch=i % 7 == 3,
            )
        )
    return out


async def _write(db: Path, entries: list[LedgerEntry], *, fold_after: int | None = None) -> None:
    """Several batches; `fold_after`: fold the rollups once after that many batches (0: before any)."""
    writer = LedgerWriter(db)
    writer.start(asyncio.get_running_loop())
    for n, chunk in enumerate((entries[:50], entries[50:51], entries[51:])):
        if n == fold_after:
            await SqliteReportingStore(db).fold()
        await asyncio.gather(*(writer.submit(e) for e in chunk))
    writer.close()
    if fold_after == 3:
        await SqliteReportingStore(db).fold()


def _rollup_table(db: Path) -> list[tuple]:
    conn = connect(db)
    try:
        return conn.execute("SELECT * FROM ledger_rollup ORDER BY grain, bucket, dims").fetchall()
    finally:
        conn.close()


def _json(rows: list) -> list:
    return [r.to_json() for r in rows]


@pytest.mark.parametrize("fold_after", [None, 1, 3], ids=["all-tail", "half-folded", "all-folded"])
async def test_rollups_equal_the_ledger_scan_for_every_dimension_and_window(tmp_path: Path, fold_after):
    db = tmp_path / "l.db"
    open_database(db).close()
    entries = varied_entries()
    await _write(db, entries, fold_after=fold_after)
    folded = len(_rollup_table(db))
    assert (folded == 0) == (fold_after is None)
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
    await _write(db, [entry, entry], fold_after=3)
    await _write(db, [entry], fold_after=3)
    (row,) = await SqliteReportingStore(db).rollup_by("tenant", Window())
    assert row.requests == 1


async def test_folding_in_any_chunks_gives_the_same_rollups_and_folds_each_row_once(tmp_path: Path):
    one, many = tmp_path / "one.db", tmp_path / "many.db"
    entries = varied_entries()
    for db in (one, many):
        open_database(db).close()
        await _write(db, entries)
    conn = connect(one)
    assert fold_pending(conn, min_rows=len(entries) + 1) == 0  # too few waiting: left for later
    assert fold_pending(conn, min_rows=len(entries)) == len(entries)
    assert rebuild_rollups(conn) == len(entries)  # everything folded again from the ledger
    assert fold_pending(conn) == 0  # nothing past the watermark: a second fold adds nothing
    conn.close()
    conn = connect(many)
    assert fold_pending(conn, chunk=7) == len(entries)
    conn.close()
    assert _rollup_table(one) == _rollup_table(many)


async def test_rows_written_while_two_folders_run_are_folded_exactly_once(tmp_path: Path):
    """Two processes' folders racing each other and a writer: every row in the rollups once."""
    db = tmp_path / "l.db"
    open_database(db).close()
    entries = varied_entries(400)
    done = threading.Event()
    errors: list[BaseException] = []

    def fold_until_done() -> None:
        conn = connect(db)
        try:
            while not done.is_set():
                fold_pending(conn, chunk=13)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            conn.close()

    folders = [threading.Thread(target=fold_until_done) for _ in range(2)]
    for t in folders:
        t.start()
    writer = LedgerWriter(db)
    writer.start(asyncio.get_running_loop())
    for i in range(0, len(entries), 9):
        await asyncio.gather(*(writer.submit(e) for e in entries[i : i + 9]))
        await asyncio.sleep(0.001)
    writer.close()
    done.set()
    for t in folders:
        t.join()
    assert not errors
    store = SqliteReportingStore(db)
    await store.fold()
    for by in ("tenant", "user", "day"):
        assert _json(await store.rollup_by(by, Window())) == _json(await store.spend_by(by, Window()))
    conn = connect(db)
    (folded,) = conn.execute("SELECT SUM(requests) FROM ledger_rollup WHERE grain = 'h'").fetchone()
    conn.close()
    assert folded == len(entries)


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
        if version >= 12:
            break
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    entries = varied_entries()
    # Written before rollups existed, in the columns the ledger had then (later migrations add some).
    columns = INSERT_ENTRY_SQL.split("(", 1)[1].split(")", 1)[0].split(", ")
    old = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    keep = [i for i, c in enumerate(columns) if c in old]
    conn.executemany(
        f"INSERT INTO ledger ({', '.join(columns[i] for i in keep)}) VALUES ({', '.join('?' * len(keep))})",
        [tuple(entry_row(e)[i] for i in keep) for e in entries],
    )
    applied = migrate(conn)
    assert applied[0] == 12 and 17 in applied
    store = SqliteReportingStore(db)
    for by in GROUP_COLUMNS:  # nothing folded yet: all of it from the ledger
        assert _json(await store.rollup_by(by, Window())) == _json(await store.spend_by(by, Window())), by
    assert await store.fold() == len(entries)
    for by in GROUP_COLUMNS:
        assert _json(await store.rollup_by(by, Window())) == _json(await store.spend_by(by, Window())), by
    folded = conn.execute("SELECT * FROM ledger_rollup ORDER BY grain, bucket, dims").fetchall()
    assert await store.rebuild_rollups() == len(entries)
    assert conn.execute("SELECT * FROM ledger_rollup ORDER BY grain, bucket, dims").fetchall() == folded
    conn.close()


async def test_amounts_finer_than_a_pico_dollar_and_millions_stay_exact(tmp_path: Path):
    db = tmp_path / "l.db"
    open_database(db).close()
    costs = ["0.0000000000001234", "0.1", "3000000.000001", "3000000", "2000000.5", "0.00000000000000001"]
    entries = [
        dataclasses.replace(ledger_entry(f"r{i}", ts=T0 + i, cost=c), saved_usd=Decimal(c))
        for i, c in enumerate(costs)
    ]
    store = SqliteReportingStore(db)
    await _write(db, entries[:2], fold_after=3)
    await _write(db, entries[2:4], fold_after=3)  # $6M in one fold: past what fits in 2^62 pico-USD
    await _write(db, entries[4:])  # in the tail
    (row,) = await store.rollup_by("tenant", Window())
    assert row.cost_usd == sum((Decimal(c) for c in costs), Decimal(0))
    assert row.to_json() == (await store.spend_by("tenant", Window()))[0].to_json()
    await store.fold()
    (row,) = await store.rollup_by("tenant", Window())
    assert row.to_json() == (await store.spend_by("tenant", Window()))[0].to_json()
    # $9.2M+ in one key of one fold and of one read: SQLite's integers would overflow.
    big = [
        dataclasses.replace(ledger_entry(f"big{i}", ts=T0 + i, cost="999999.999999999999"), saved_usd=None)
        for i in range(12)
    ]
    await _write(db, big, fold_after=3)
    await _write(db, [dataclasses.replace(b, request_id=b.request_id + "t") for b in big])
    (row,) = await store.rollup_by("tenant", Window())
    assert row.to_json() == (await store.spend_by("tenant", Window()))[0].to_json()


async def test_pico_dollars_parsed_in_floating_point_are_exact_for_every_digit_pattern(tmp_path: Path):
    """The fold reads amounts below $1,000 with at most 12 decimals as round(value * 1e12):
    exact by the error bound in rollups._parts; checked here on 3,000 seeded worst-case patterns
    (all nines, long fractions, the bounds) one key each, against Python's Decimal."""
    import random

    rng = random.Random(5)
    amounts = ["999.999999999999", "-999.999999999999", "0.000000000001", "1000", "999.9999999999995", "0"]
    for _ in range(3000):
        decimals = rng.randrange(0, 13)
        whole = rng.choice([0, rng.randrange(1000), 999])
        frac = "".join(rng.choice("09" if rng.random() < 0.3 else "0123456789") for _ in range(decimals))
        amounts.append(f"{'-' if rng.random() < 0.1 else ''}{whole}{'.' + frac if decimals else ''}")
    db = tmp_path / "l.db"
    conn = open_database(db)
    rows = [
        entry_row(dataclasses.replace(ledger_entry(f"p{i}", ts=T0, tenant=f"t{i}", cost=a), saved_usd=None))
        for i, a in enumerate(amounts)
    ]
    conn.executemany(INSERT_ENTRY_SQL, rows)
    assert fold_pending(conn) == len(amounts)
    conn.close()
    store = SqliteReportingStore(db)
    rolled = {r.group: r.cost_usd for r in await store.rollup_by("tenant", Window())}
    for i, a in enumerate(amounts):
        assert str(rolled[f"t{i}"]) == str(Decimal(0) + Decimal(a)), a  # as the report sums it


async def test_the_request_explorer_pages_through_rows_at_the_same_instant_without_gaps(tmp_path: Path):
    """Keyset pagination on (ts, request_id): seven rows share one timestamp across a page edge."""
    db = tmp_path / "l.db"
    conn = open_database(db)
    entries = [ledger_entry(f"r{i:02d}", ts=T0 + (0 if 5 <= i < 12 else i)) for i in range(20)]
    conn.executemany(INSERT_ENTRY_SQL, [entry_row(e) for e in entries])
    conn.close()
    store = SqliteReportingStore(db)
    seen: list[str] = []
    before = None
    while True:
        page = await store.requests(Window(), limit=4, before=before)
        seen += [r["request_id"] for r in page]
        if len(page) < 4:
            break
        before = (page[-1]["ts"], page[-1]["request_id"])
    assert sorted(seen) == sorted(e.request_id for e in entries) and len(seen) == len(set(seen))
