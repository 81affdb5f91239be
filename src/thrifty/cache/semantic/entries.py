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
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from thrifty.cache.semantic.store import LiveEntry, NewEntry, SharedSemanticStore, SqliteSemanticStore
from thrifty.errors import SharedStateUnavailable
from thrifty.types import Usage

log = logging.getLogger(__name__)

Stored = tuple[dict[str, Any], Usage]
# The entry could not be read (a shared store that does not answer): a miss, not a purge.
UNREADABLE = object()


class LocalEntries:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._store = SqliteSemanticStore(conn)

    async def start(self, now: float, embedding_model: str) -> AsyncIterator[LiveEntry]:
        self._store.drop_expired(now)
        for entry in self._store.live(now, embedding_model):
            yield entry

    def follow(self, on_entries: Callable[[list[LiveEntry]], None]) -> None:
        """One process: nobody else adds entries."""

    async def answer(self, entry_id: int, now: float) -> Stored | None:
        return self._store.answer(entry_id, now)

    def with_answer(self, entry_id: int, now: float, then: Callable[[dict[str, Any]], None]) -> None:
        """Call ``then`` with the entry's stored response (now: it is a local read)."""
        stored = self._store.answer(entry_id, now)
        if stored is not None:
            then(stored[0])

    def add(self, entry: NewEntry, index: Callable[[int], None]) -> None:
        entry_id = self._store.add(entry)
        if entry_id is not None:
            index(entry_id)

    def delete(self, entry_ids: list[int]) -> None:
        self._store.delete(entry_ids)

    def drop_expired(self, now: float) -> None:
        self._store.drop_expired(now)

    async def aclose(self) -> None:
        return None


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
