"""`thrifty cache purge` is not undone by a cache write that was still on its way.

SQLite's cache writer commits entries on its own thread, and replicas write PostgreSQL rows after
the response: a purge can run between an entry's making and its row. The entry must not come back
(in this process, another one, or after a restart), while entries of other scopes and entries made
after the purge are stored as ever. Real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.test_semantic_entries_sqlite import EMBEDDING_MODEL, _entry
from tests.test_store_conformance import semantic_entry
from thrifty.cache.exact import SqliteExactCache
from thrifty.cache.semantic.entries import LocalEntries
from thrifty.cache.semantic.store import SqliteSemanticStore
from thrifty.settings import StorageSettings
from thrifty.stores import postgres
from thrifty.stores.factory import purge_caches
from thrifty.stores.sqlite_db import open_database
from thrifty.stores.write_behind import SqliteWriteBehind
from thrifty.types import Usage

ACME = {"tenant": "acme", "route": None, "prompt_version": None, "corpus_version": None}


def _held_writer(path: Path) -> tuple[SqliteWriteBehind, threading.Event]:
    """A started cache writer whose thread is kept busy until the returned event is set, so what is
    submitted now stays queued (as behind a long-held lock) while a purge runs."""
    writer = SqliteWriteBehind(path)
    writer.start()
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        release.wait(30)

    writer.submit("SELECT 1", (), hold)
    assert busy.wait(10)  # the writer is inside the first batch: later writes form the next one
    return writer, release


def _storage(path: Path) -> StorageSettings:
    return StorageSettings(url=f"sqlite:///{path}")


def test_a_semantic_entry_queued_during_a_purge_does_not_come_back(tmp_path: Path):
    path = tmp_path / "ledger.db"

    async def scenario() -> None:
        loop_conn = open_database(path)
        writer, release = _held_writer(path)
        entries = LocalEntries(loop_conn, writer)
        assert [e async for e in entries.start(time.time(), EMBEDDING_MODEL)] == []
        indexed: list[int] = []
        entries.add(_entry("What are your hours?", "9 to 5"), indexed.append)  # tenant acme
        entries.add(replace(_entry("Where are you?", "Main St"), tenant_id="globex"), indexed.append)
        (purged, kept) = indexed
        assert await asyncio.to_thread(purge_caches, _storage(path), ACME, None) == (
            0,
            0,
        )  # nothing stored yet
        release.set()
        writer.close()  # commits what was queued
        await entries.aclose()
        assert await entries.answer(purged, time.time()) is None  # committed as nothing: not served
        assert await entries.answer(kept, time.time()) is not None  # another tenant's: stored
        fresh = SqliteSemanticStore(open_database(path))  # another process, or after a restart
        assert [e.entry_id for e in fresh.live(time.time(), EMBEDDING_MODEL)] == [kept]
        # An entry made after the purge is stored as ever.
        writer = SqliteWriteBehind(path)
        writer.start()
        later = LocalEntries(open_database(path), writer)
        assert [e.entry_id async for e in later.start(time.time(), EMBEDDING_MODEL)] == [kept]
        made: list[int] = []
        later.add(_entry("What are your hours?", "9 to 6"), made.append)
        writer.close()
        await later.aclose()
        assert fresh.answer(made[0], time.time()) is not None

    asyncio.run(scenario())


def test_an_exact_entry_queued_during_a_purge_does_not_come_back(tmp_path: Path):
    path = tmp_path / "ledger.db"
    loop_conn = open_database(path)
    writer, release = _held_writer(path)
    cache = SqliteExactCache(loop_conn, writer)

    def ctx(tenant: str) -> Any:
        tags = SimpleNamespace(tenant_id=tenant, prompt_version=None, corpus_version=None)
        return SimpleNamespace(tags=tags, route="faq", requested_model="gpt-4o-mini")

    usage = Usage(input_tokens=5, output_tokens=2)
    cache.put("acme-key", ctx("acme"), {"answer": 1}, usage, ttl_s=60)
    cache.put("globex-key", ctx("globex"), {"answer": 2}, usage, ttl_s=60)
    assert cache.get("acme-key", time.time()) is not None  # served from memory while queued
    assert purge_caches(_storage(path), ACME, None) == (0, 0)
    release.set()
    writer.close()
    assert cache.get("acme-key", time.time()) is None  # its row was never written: gone
    fresh = SqliteExactCache(open_database(path))
    assert fresh.get("acme-key", time.time()) is None
    assert fresh.get("globex-key", time.time()) == ({"answer": 2}, usage)
    writer = SqliteWriteBehind(path)
    writer.start()
    SqliteExactCache(open_database(path), writer).put("acme-key", ctx("acme"), {"answer": 3}, usage, 60)
    writer.close()
    assert fresh.get("acme-key", time.time()) == ({"answer": 3}, usage)  # made after: stored


def test_a_purge_by_expiry_blocks_no_later_write(tmp_path: Path):
    path = tmp_path / "ledger.db"
    conn = open_database(path)
    assert purge_caches(_storage(path), ACME, time.time()) == (0, 0)
    assert conn.execute("SELECT COUNT(*) FROM cache_purges").fetchone()[0] == 0
    assert purge_caches(_storage(path), ACME, None) == (0, 0)
    assert conn.execute("SELECT cache, tenant_id, route FROM cache_purges ORDER BY cache").fetchall() == [
        ("exact", "acme", None),
        ("semantic", "acme", None),
    ]


async def test_postgres_writes_of_entries_made_before_a_purge_write_nothing(pg_url: str):
    from psycopg_pool import AsyncConnectionPool

    from thrifty.stores.postgres_semantic import PostgresSemanticStore

    conn = postgres.connect(pg_url)
    postgres.migrate(conn)
    conn.close()
    made = time.time()
    await asyncio.sleep(0.01)
    assert await asyncio.to_thread(purge_caches, StorageSettings(url=pg_url), ACME, None) == (0, 0)
    async with AsyncConnectionPool(pg_url, kwargs={"autocommit": True}) as pool:
        store = PostgresSemanticStore(pool, pg_url)
        late = await store.add(semantic_entry("q", tenant="acme", created_at=made))
        other = await store.add(semantic_entry("q", tenant="globex", created_at=made))
        fresh = await store.add(semantic_entry("q", tenant="acme", seed=1))
        assert late is None  # made before the purge, written after it: not written
        assert other is not None and await store.answer(other, time.time()) is not None
        assert fresh is not None and await store.answer(fresh, time.time()) is not None
        await store.close()
        cache = postgres.PostgresExactCache(pool)
        scope = {
            "tenant_id": "acme",
            "route": "r",
            "prompt_version": None,
            "corpus_version": None,
            "model": "m",
        }
        usage = Usage(input_tokens=3, output_tokens=1)
        await cache.put("late", scope, {"answer": 1}, usage, ttl_s=60, made_at=made)
        await cache.put("fresh", scope, {"answer": 2}, usage, ttl_s=60, made_at=time.time())
        await cache.put("other", {**scope, "tenant_id": "globex"}, {"answer": 3}, usage, 60, made)
        assert await cache.get("late", time.time()) is None
        assert await cache.get("fresh", time.time()) == ({"answer": 2}, usage)
        assert await cache.get("other", time.time()) == ({"answer": 3}, usage)
