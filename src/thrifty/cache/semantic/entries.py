"""Where the semantic cache's entries live, behind one small interface for the stage.

``LocalEntries``: the SQLite file, every call synchronous on the loop (a local read is cheaper than
a task). ``SharedEntries``: one PostgreSQL table for every replica; reads are awaited, writes run
off the response path, and the replica's index follows what the others add (the store's
notifications, ``follow``). The stage keeps the index; this keeps the rows.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from thrifty.cache.semantic.store import (
    ID_BLOCK,
    QUEUED_INSERT_SQL,
    LiveEntry,
    NewEntry,
    SharedSemanticStore,
    SqliteSemanticStore,
    insert_params,
    reserve_ids,
)
from thrifty.errors import SharedStateUnavailable
from thrifty.stores.write_behind import SqliteWriteBehind
from thrifty.types import Usage

log = logging.getLogger(__name__)

Stored = tuple[dict[str, Any], Usage]
# The entry could not be read (a shared store that does not answer): a miss, not a purge.
UNREADABLE = object()


class LocalEntries:
    """With a ``writer``, a new entry gets an id reserved up front (``reserve_ids``), is indexed and
    served from memory at once, and its row is committed on the writer's thread, which waits for
    the lock (the ledger, a fold or recordings may hold it) instead of losing the entry. Without
    one, or when no reserved id is left, the row is written on the loop and lost if the lock is
    busy (the entry is then not indexed either)."""

    def __init__(self, conn: sqlite3.Connection, writer: SqliteWriteBehind | None = None) -> None:
        self._store = SqliteSemanticStore(conn)
        self._writer = writer
        # entry id -> (expires at, response, usage): added, its row not committed yet
        self._pending: dict[int, tuple[float, dict[str, Any], Usage]] = {}
        self._ids: deque[int] = deque()
        self._refill: asyncio.Future[range] | None = None

    async def start(self, now: float, embedding_model: str) -> AsyncIterator[LiveEntry]:
        self._store.drop_expired(now)
        if self._writer is not None:
            try:
                self._ids.extend(await asyncio.to_thread(reserve_ids, self._writer.path))
            except sqlite3.Error as err:
                log.warning(
                    "semantic cache entry ids not reserved (entries are written on the loop): %s", err
                )
        for entry in self._store.live(now, embedding_model):
            yield entry

    def follow(self, on_entries: Callable[[list[LiveEntry]], None]) -> None:
        """One process: nobody else adds entries."""

    async def answer(self, entry_id: int, now: float) -> Stored | None:
        return self._read(entry_id, now)

    def with_answer(self, entry_id: int, now: float, then: Callable[[dict[str, Any]], None]) -> None:
        """Call ``then`` with the entry's stored response (now: it is a local read)."""
        stored = self._read(entry_id, now)
        if stored is not None:
            then(stored[0])

    def _read(self, entry_id: int, now: float) -> Stored | None:
        pending = self._pending.get(entry_id)
        if pending is not None:
            return (pending[1], pending[2]) if pending[0] > now else None
        return self._store.answer(entry_id, now)

    def add(self, entry: NewEntry, index: Callable[[int], None]) -> None:
        entry_id = self._take_id()
        if entry_id is None or self._writer is None:
            stored = self._store.add(entry)
            if stored is not None:
                index(stored)
            return
        self._pending[entry_id] = (entry.expires_at, entry.response, entry.usage)

        def committed() -> None:
            # From the writer's thread: one dict operation, atomic under the GIL. Committed or
            # not (a failed batch is logged there), the row is now what answers.
            self._pending.pop(entry_id, None)

        self._writer.submit(QUEUED_INSERT_SQL, (entry_id, *insert_params(entry)), committed)
        index(entry_id)

    def _take_id(self) -> int | None:
        if self._writer is None:
            return None
        if len(self._ids) < ID_BLOCK // 2 and self._refill is None:
            self._refill = asyncio.ensure_future(asyncio.to_thread(reserve_ids, self._writer.path))
            self._refill.add_done_callback(self._refilled)
        return self._ids.popleft() if self._ids else None

    def _refilled(self, done: asyncio.Future[range]) -> None:
        self._refill = None
        if done.cancelled():
            return
        err = done.exception()
        if err is not None:
            log.warning("semantic cache entry ids not reserved yet: %r", err)
            return
        self._ids.extend(done.result())

    def delete(self, entry_ids: list[int]) -> None:
        if self._writer is None:
            self._store.delete(entry_ids)
            return
        # After the inserts queued before it: an entry evicted before its row was committed goes too.
        for entry_id in entry_ids:
            self._writer.submit("DELETE FROM semantic_cache WHERE entry_id = ?", (entry_id,))
            self._pending.pop(entry_id, None)

    def drop_expired(self, now: float) -> None:
        self._store.drop_expired(now)

    async def aclose(self) -> None:
        if self._refill is not None:
            await asyncio.gather(self._refill, return_exceptions=True)


class SharedEntries:
    def __init__(self, remote: SharedSemanticStore) -> None:
        self._remote = remote
        self._writes: set[asyncio.Future[None]] = set()

    async def start(self, now: float, embedding_model: str) -> AsyncIterator[LiveEntry]:
        await self._remote.drop_expired(now)
        await self._remote.listen()  # before the load: an entry added meanwhile is heard, not lost
        async for entry in self._remote.live(now, embedding_model):
            yield entry

    def follow(self, on_entries: Callable[[list[LiveEntry]], None]) -> None:
        self._remote.follow(on_entries)

    async def answer(self, entry_id: int, now: float) -> Stored | object | None:
        try:
            return await self._remote.answer(entry_id, now)
        except SharedStateUnavailable as err:
            log.warning("semantic cache lookup missed: %s", err.message)
            return UNREADABLE

    def with_answer(self, entry_id: int, now: float, then: Callable[[dict[str, Any]], None]) -> None:
        """Call ``then`` with the entry's stored response once read: a round trip away, so off the
        response path (nothing is called when the store does not answer)."""

        async def read() -> None:
            try:
                stored = await self._remote.answer(entry_id, now)
            except SharedStateUnavailable:
                return
            if stored is not None:
                then(stored[0])

        self._spawn(read())

    def add(self, entry: NewEntry, index: Callable[[int], None]) -> None:
        async def write() -> None:
            entry_id = await self._remote.add(entry)
            if entry_id is not None:
                index(entry_id)

        self._spawn(write())

    def delete(self, entry_ids: list[int]) -> None:
        self._spawn(self._remote.delete(entry_ids))

    def drop_expired(self, now: float) -> None:
        self._spawn(self._remote.drop_expired(now))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def aclose(self) -> None:
        """Finish the pending writes and reads, and stop following the store."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._remote.close()


Entries = LocalEntries | SharedEntries

__all__ = ["UNREADABLE", "Entries", "LocalEntries", "SharedEntries", "Stored"]
