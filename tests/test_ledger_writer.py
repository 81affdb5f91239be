"""Group commit: every submitted entry is committed before its future resolves, in both modes."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.factories import ledger_entry
from thrifty.stores.ledger import LedgerWriter
from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry


def _entry(i: int) -> LedgerEntry:
    return ledger_entry(f"req_{i:06d}")


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    (n,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
    conn.close()
    return int(n)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_each_future_resolves_only_after_its_row_is_committed(tmp_path: Path, synchronous: str):
    db = tmp_path / "l.db"
    writer = LedgerWriter(db, synchronous=synchronous)
    writer.start(asyncio.get_running_loop())
    try:
        futures = [writer.submit(_entry(i)) for i in range(300)]
        await asyncio.gather(*futures)
        # Read from another connection: committed, not merely queued.
        assert _count(db) == 300
        await writer.submit(_entry(1000))
        assert _count(db) == 301
    finally:
        writer.close()


async def test_close_commits_what_is_still_pending(tmp_path: Path):
    db = tmp_path / "l.db"
    writer = LedgerWriter(db)
    writer.start(asyncio.get_running_loop())
    futures = [writer.submit(_entry(i)) for i in range(5)]
    writer.close()  # before the loop had a turn to flush
    assert _count(db) == 5 and all(f.done() for f in futures)


async def test_a_lock_held_elsewhere_delays_the_commit_without_blocking_the_loop(tmp_path: Path):
    db = tmp_path / "l.db"
    writer = LedgerWriter(db)
    writer.start(asyncio.get_running_loop())
    other = open_database(db)
    other.execute("BEGIN IMMEDIATE")  # another process (e.g. a second gateway) holds the write lock
    try:
        future = writer.submit(_entry(1))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not future.done()  # the loop kept running; the entry waits
        other.execute("COMMIT")
        await asyncio.wait_for(future, 5)
        assert _count(db) == 1
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
        writer.close()
