"""The semantic cache's stored hits (``semantic_hits``), as ``verify.Verifier`` uses them for
feedback: matched past what memory holds, once per hit, own tenant only, written judged when judged
mid-write, and forgotten after the retention. Real SQLite file."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from thrifty.cache.semantic.hit_log import HitRecord, SqliteHitLog
from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
from thrifty.cache.semantic.verify import Verifier
from thrifty.settings import CacheVerifySettings
from thrifty.stores.sqlite_db import open_database


def _hit(request_id: str, tenant: str = "acme", ts: float | None = None) -> Any:
    return SimpleNamespace(
        request_id=request_id,
        ts=time.time() if ts is None else ts,
        route="support",
        tags=SimpleNamespace(tenant_id=tenant),
        saved_usd=Decimal("0.001"),
    )


async def _verifier(path: Path, **kw: Any) -> tuple[Verifier, Any]:
    conn = open_database(path)
    conn.execute("PRAGMA busy_timeout=0")
    verifier = Verifier({"support": CacheVerifySettings()}, flush_every_s=3600, **kw)
    verifier.start(SqlitePartitionStateStore(conn), SqliteHitLog(conn))
    return verifier, conn


def test_feedback_on_a_hit_older_than_memory_holds_is_matched_once_for_its_tenant(tmp_path):
    async def scenario() -> None:
        verifier, conn = await _verifier(tmp_path / "t.db", remember_hits=2)
        verifier.served(_hit("g0", tenant="globex"), "p-globex", 0.8, None, "answer-1")
        for i in range(5):
            verifier.served(_hit(f"r{i}"), "p-acme", 0.8, None, "answer-1")
            await verifier.write_hits()  # as the periodic writes do
        assert verifier._hits == {}  # written: memory holds none of them
        assert not await verifier.feedback("globex", "r0", wrong=True)  # not globex's hit
        assert await verifier.feedback("acme", "r0", wrong=True)  # the oldest, 4 hits ago
        assert not await verifier.feedback("acme", "r0", wrong=True)  # counted already
        assert not await verifier.feedback("acme", "g0", wrong=True)  # globex's
        assert not await verifier.feedback("acme", "nope", wrong=True)
        (state,) = [s for p, s in verifier.states() if p == "p-acme"]
        assert (state.feedback, state.feedback_wrong, sum(state.wrong)) == (1, 1, 1)
        await verifier.stop_hits()
        conn.close()

    asyncio.run(scenario())


def test_feedback_on_a_hit_whose_write_is_under_way_waits_for_it_and_claims_the_row(tmp_path):
    async def scenario() -> None:
        verifier, conn = await _verifier(tmp_path / "t.db")
        log = verifier._hit_log
        assert log is not None
        written: list[list[HitRecord]] = []
        real_write = log.write

        async def slow_write(hits: Any) -> None:
            written.append(list(hits))
            await asyncio.sleep(0.05)  # the feedback arrives meanwhile
            await real_write(hits)

        log.write = slow_write  # type: ignore[method-assign]
        verifier.served(_hit("r1"), "p", 0.8, None, "a")
        writing = asyncio.ensure_future(verifier.write_hits())
        await asyncio.sleep(0.01)
        assert await verifier.feedback("acme", "r1", wrong=False)  # waited for the write, claimed
        assert writing.done()
        await verifier.write_hits()  # nothing more to write
        assert [h.feedback for batch in written for h in batch] == [False]
        assert conn.execute("SELECT feedback FROM semantic_hits").fetchall() == [(1,)]
        assert not await verifier.feedback("acme", "r1", wrong=False)
        await verifier.stop_hits()
        conn.close()

    asyncio.run(scenario())


def test_stored_hits_older_than_the_retention_are_forgotten(tmp_path):
    async def scenario() -> None:
        verifier, conn = await _verifier(tmp_path / "t.db", hit_retention_s=3600)
        now = time.time()
        verifier.served(_hit("old", ts=now - 7200), "p", 0.8, None, "a")
        verifier.served(_hit("new", ts=now - 60), "p", 0.8, None, "a")
        await verifier.write_hits(now)
        assert conn.execute("SELECT request_id FROM semantic_hits").fetchall() == [("new",)]
        assert not await verifier.feedback("acme", "old", wrong=True)
        assert await verifier.feedback("acme", "new", wrong=True)
        await verifier.stop_hits()
        conn.close()

    asyncio.run(scenario())


def test_stored_hits_are_capped_at_the_newest_max_rows(tmp_path):
    async def scenario() -> None:
        verifier, conn = await _verifier(tmp_path / "t.db", hit_max_rows=3)
        now = time.time()
        for i in range(5):
            verifier.served(_hit(f"r{i}", ts=now - 50 + i), "p", 0.8, None, "a")
        await verifier.write_hits(now)
        rows = conn.execute("SELECT request_id FROM semantic_hits ORDER BY served_at").fetchall()
        assert rows == [("r2",), ("r3",), ("r4",)]
        assert not await verifier.feedback("acme", "r0", wrong=True)  # past the cap: not matched
        assert await verifier.feedback("acme", "r4", wrong=True)
        await verifier.stop_hits()
        conn.close()

    asyncio.run(scenario())


async def test_postgres_hits_are_pruned_by_age_and_capped_at_the_newest(pg_url: str):
    from psycopg_pool import AsyncConnectionPool

    from thrifty.stores import postgres
    from thrifty.stores.postgres_semantic_hits import PostgresHitLog

    conn = postgres.connect(pg_url)
    postgres.migrate(conn)
    conn.close()
    now = time.time()
    async with AsyncConnectionPool(pg_url, kwargs={"autocommit": True}) as pool:
        log_ = PostgresHitLog(pool)
        hits = [HitRecord("acme", f"r{i}", "support", "p", 0.8, "a", now - 100 + i, False) for i in range(6)]
        await log_.write([HitRecord("acme", "ancient", "support", "p", 0.8, "a", now - 9000, False), *hits])
        assert await log_.prune(now - 3600, 10) == 1  # by age only
        assert await log_.prune(now - 3600, 4) == 2  # then the two oldest past the cap
        assert await log_.claim("acme", "r1") is None
        claimed = await log_.claim("acme", "r2")
        assert claimed is not None and claimed.request_id == "r2"
        assert await log_.prune(now - 3600, 4) == 0


def test_a_busy_lock_is_retried_quietly_and_said_once_it_lasts(tmp_path, caplog):
    """The ledger or a fold holding SQLite's lock makes a flush fail now and then: the hits wait and
    the next flush writes them; the log speaks only when it lasts (HIT_WRITE_PATIENCE flushes)."""
    import sqlite3

    from thrifty.cache.semantic import verify

    class Busy:
        def __init__(self, fail: int) -> None:
            self.fail, self.rows = fail, 0

        async def write(self, hits: Any) -> None:
            if self.fail:
                self.fail -= 1
                raise sqlite3.OperationalError("database is locked")
            self.rows += len(hits)

        async def claim(self, tenant_id: str, request_id: str) -> None:
            return None

        async def prune(self, before: float, max_rows: int) -> int:
            return 0

    async def scenario(fail: int) -> int:
        conn = open_database(tmp_path / f"busy{fail}.db")
        verifier = Verifier({"support": CacheVerifySettings()}, flush_every_s=0.01)
        log_ = Busy(fail)
        verifier.start(SqlitePartitionStateStore(conn), log_)
        verifier.served(_hit("r1"), "p-acme", 0.8, None, "answer-1")
        for _ in range(400):
            if log_.rows:
                break
            await asyncio.sleep(0.01)
        await verifier.stop_hits()
        conn.close()
        return log_.rows

    caplog.set_level("WARNING", logger=verify.__name__)
    assert asyncio.run(scenario(fail=3)) == 1  # written on the fourth flush
    assert not [r for r in caplog.records if "not written yet" in r.getMessage()]
    assert asyncio.run(scenario(fail=verify.HIT_WRITE_PATIENCE)) == 1
    (said,) = [r for r in caplog.records if "not written yet" in r.getMessage()]
    assert (
        f"({verify.HIT_WRITE_PATIENCE} tries)" in said.getMessage()
        and "1 wait in memory" in said.getMessage()
    )
