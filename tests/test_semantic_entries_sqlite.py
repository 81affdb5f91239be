"""The semantic cache's entries in the SQLite file under lock contention: a put while another
writer holds the lock is indexed and served at once and committed once the lock is free (ids are
reserved up front, so they never collide with another process's rows). Real SQLite files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from thrifty.cache.semantic.entries import LocalEntries
from thrifty.cache.semantic.store import ID_BLOCK, NewEntry, SqliteSemanticStore, reserve_ids
from thrifty.stores.sqlite_db import open_database
from thrifty.stores.write_behind import SqliteWriteBehind
from thrifty.types import Usage

EMBEDDING_MODEL = "test-embedder"


def _entry(query: str, answer: str, ttl_s: float = 60) -> NewEntry:
    now = time.time()
    vector = np.ones(4, dtype=np.float32) / 2
    return NewEntry(
        partition="p",
        tenant_id="acme",
        route="faq",
        user=None,
        prompt_version=None,
        corpus_version=None,
        model="gpt-4o-mini",
        system_hash="s",
        query=query,
        normalised_query=query.lower(),
        embedding_model=EMBEDDING_MODEL,
        embedding=vector,
        answer_id="a-" + answer,
        response={"answer": answer},
        evidence=(),
        safety_policy_version="1",
        usage=Usage(input_tokens=5, output_tokens=2),
        created_at=now,
        expires_at=now + ttl_s,
    )


def test_an_entry_put_while_another_writer_holds_the_lock_is_served_and_then_stored(tmp_path: Path):
    """The loop never waits for SQLite's lock, and a busy lock no longer loses the entry."""
    path = tmp_path / "ledger.db"

    async def scenario() -> None:
        loop_conn = open_database(path)
        loop_conn.execute("PRAGMA busy_timeout=0")
        writer = SqliteWriteBehind(path)
        writer.start()
        entries = LocalEntries(loop_conn, writer)
        assert [e async for e in entries.start(time.time(), EMBEDDING_MODEL)] == []
        indexed: list[int] = []
        blocker = open_database(path)
        blocker.execute("BEGIN IMMEDIATE")  # another writer (the ledger, a fold) holds the lock
        try:
            started = time.monotonic()
            entries.add(_entry("What are your hours?", "9 to 5"), indexed.append)
            assert time.monotonic() - started < 5  # did not wait for the lock (that would be 30 s)
            (entry_id,) = indexed  # in the index at once, under its reserved id
            assert await entries.answer(entry_id, time.time()) == (
                {"answer": "9 to 5"},
                Usage(input_tokens=5, output_tokens=2),
            )
            assert await entries.answer(entry_id, time.time() + 61) is None  # its TTL holds in memory too
            assert loop_conn.execute("SELECT COUNT(*) FROM semantic_cache").fetchone()[0] == 0
        finally:
            blocker.execute("COMMIT")
        writer.close()
        await entries.aclose()
        assert entries._pending == {}
        fresh = SqliteSemanticStore(open_database(path))
        assert fresh.answer(entry_id, time.time()) == (
            {"answer": "9 to 5"},
            Usage(input_tokens=5, output_tokens=2),
        )
        assert [e.entry_id for e in fresh.live(time.time(), EMBEDDING_MODEL)] == [entry_id]

    asyncio.run(scenario())


def test_reserved_ids_never_meet_another_processs_rows(tmp_path: Path):
    path = tmp_path / "ledger.db"
    conn = open_database(path)
    store = SqliteSemanticStore(conn)
    first = store.add(_entry("q0", "a0"))
    block = reserve_ids(path)
    assert len(block) == ID_BLOCK and first is not None and block.start > first
    # Another process inserting meanwhile gets an id past the block, and so does the next block.
    other = store.add(_entry("q1", "a1"))
    assert other is not None and other > block[-1]
    assert reserve_ids(path).start > other
