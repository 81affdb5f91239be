"""Semantic-cache entries on PostgreSQL: one table for every replica, an in-process index in each.

Why not pgvector: Debian's PostgreSQL (what scripts/services.sh installs) does not ship it, and a
lookup should not leave the process anyway: the cache's lookup (HNSW in-process, p99 under 1 ms
at 10^6 entries) is faster than one database round trip. So the table holds every entry with its
embedding (float32 bytes) and is the truth; each replica's index is a view of it that follows
what the other replicas add:

- `add` is one statement: the INSERT and a `pg_notify` carrying (this replica, the new id). A
  notification is delivered when its transaction commits, so whoever hears an id can read its row.
- each replica LISTENs on one connection of its own; the ids it hears (its own are skipped) are
  read in batches, one SELECT for all that arrived meanwhile, and handed to the stage's index.
- a lost listening connection is reopened, and the ids of the rows created since it was lost
  (less a margin for the replicas' clocks) are read again: a notification missed meanwhile is not
  an entry missed. The stage skips ids it holds already.
- a hit reads its row back (`answer`), so a purge (`thrifty cache purge`) or another replica's
  eviction applies at once, as with SQLite. A database that does not answer is a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import orjson

from thrifty.cache.semantic.store import LiveEntry, NewEntry, insert_params
from thrifty.errors import SharedStateUnavailable
from thrifty.stores.cache_purges import SCOPE, not_purged
from thrifty.stores.postgres import conninfo, unreachable
from thrifty.types import Usage

log = logging.getLogger(__name__)

CHANNEL = "thrifty_semantic"
_COLUMNS = (
    "partition",
    "tenant_id",
    "route",
    '"user"',
    "prompt_version",
    "corpus_version",
    "model",
    "system_hash",
    "query",
    "normalised_query",
    "embedding_model",
    "embedding",
    "answer_id",
    "response",
    "evidence",
    "safety_policy_version",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "created_at",
    "expires_at",
)
_NAMES = tuple(column.strip('"') for column in _COLUMNS)
# Named parameters: the purge check reads the entry's own scope and time again. An entry made
# before a purge covering it (written after the response, so possibly after the purge) is not.
_INSERT = (
    f"WITH added AS (INSERT INTO semantic_cache ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(f'%({name})s' for name in _NAMES)} WHERE "
    + not_purged("semantic", "%(created_at)s", {name: f"%({name})s" for name in SCOPE})
    + " RETURNING entry_id) "
    "SELECT entry_id, pg_notify(%(channel)s, %(origin)s || ':' || entry_id)::text FROM added"
)
_LIVE = "entry_id, partition, route, query, normalised_query, answer_id, expires_at, embedding"
_RECONNECT_S = 0.5
_CATCH_UP_MARGIN_S = 60.0  # rows created this long before a lost connection are read again
_READ_BATCH = 1000


def _live_entry(row: tuple[Any, ...]) -> LiveEntry:
    entry_id, partition, route, query, normalised, answer_id, expires_at, blob = row
    vector = np.frombuffer(bytes(blob), dtype=np.float32)
    return LiveEntry(int(entry_id), partition, route, query, normalised, answer_id, expires_at, vector)


class PostgresSemanticStore:
    """The SharedSemanticStore port on PostgreSQL (see the module's docstring)."""

    def __init__(self, pool: Any, url: str, *, timeout_s: float = 1.0, origin: str | None = None) -> None:
        self._pool = pool
        self._url = url
        self._timeout_s = timeout_s  # a hit waits at most this long for a pooled connection
        self.origin = origin or os.urandom(6).hex()  # this replica, in the notifications it sends
        self._embedding_model: str | None = None
        self._listener: Any = None
        self._heard: set[int] = set()  # ids other replicas added, not read yet
        self._wake = asyncio.Event()
        self._on_entries: Callable[[list[LiveEntry]], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lost_at: float | None = None
        self.followed = 0  # entries of other replicas handed to the index (a metric)

    # -- following the other replicas ----------------------------------------------------------

    async def listen(self) -> None:
        try:
            self._listener = await self._open_listener()
        except Exception as err:
            raise unreachable(self._url, err) from err
        self._tasks.append(asyncio.ensure_future(self._listen_forever()))

    async def _open_listener(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(conninfo(self._url), autocommit=True, connect_timeout=2)
        await conn.execute(f"LISTEN {CHANNEL}")
        return conn

    async def _listen_forever(self) -> None:
        import psycopg

        while True:
            try:
                if self._listener is None:
                    self._listener = await self._open_listener()
                    await self._catch_up()
                async for note in self._listener.notifies():
                    self._hear(note.payload)
                raise psycopg.OperationalError("the listening connection ended")
            except (psycopg.Error, OSError) as err:
                if self._lost_at is None:
                    self._lost_at = time.time()
                    log.warning("semantic cache: lost PostgreSQL notifications (%s); reconnecting", err)
                await self._close_listener()
                await asyncio.sleep(_RECONNECT_S)

    async def _catch_up(self) -> None:
        """After a lost connection: what was created meanwhile, as if it had been heard."""
        if self._lost_at is None:
            return
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                "SELECT entry_id FROM semantic_cache WHERE created_at >= %s AND expires_at > %s",
                (self._lost_at - _CATCH_UP_MARGIN_S, time.time()),
            )
            ids = [int(i) for (i,) in await cur.fetchall()]
        log.warning("semantic cache: notifications back; reading %d entries created meanwhile", len(ids))
        self._lost_at = None
        self._heard.update(ids)
        self._wake.set()

    def _hear(self, payload: str) -> None:
        origin, _, entry_id = payload.partition(":")
        if origin != self.origin and entry_id.isdigit():
            self._heard.add(int(entry_id))
            self._wake.set()

    def follow(self, on_entries: Callable[[list[LiveEntry]], None]) -> None:
        self._on_entries = on_entries
        self._tasks.append(asyncio.ensure_future(self._deliver_forever()))
        self._wake.set()  # whatever was heard since listen()

    async def _deliver_forever(self) -> None:
        failing = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._heard:
                ids = sorted(self._heard)[:_READ_BATCH]
                self._heard.difference_update(ids)
                try:
                    entries = await self._read(ids)
                except Exception as err:  # noqa: BLE001 - the database is away: keep the ids, retry
                    self._heard.update(ids)
                    if not failing:
                        log.warning("semantic cache: entries of other replicas not read yet: %s", err)
                    failing = True
                    await asyncio.sleep(_RECONNECT_S)
                    continue
                failing = False
                if entries and self._on_entries is not None:
                    self.followed += len(entries)
                    self._on_entries(entries)

    async def _read(self, ids: list[int]) -> list[LiveEntry]:
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                f"SELECT {_LIVE} FROM semantic_cache WHERE entry_id = ANY(%s) AND expires_at > %s "
                "AND embedding_model = %s ORDER BY entry_id",
                (ids, time.time(), self._embedding_model),
            )
            return [_live_entry(row) for row in await cur.fetchall()]

    async def live(self, now: float, embedding_model: str) -> AsyncIterator[LiveEntry]:
        self._embedding_model = embedding_model
        # A server-side cursor: a million entries are read in batches, not held twice.
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="semantic_live") as cur,
        ):
            cur.itersize = 2000
            await cur.execute(
                f"SELECT {_LIVE} FROM semantic_cache WHERE expires_at > %s AND embedding_model = %s "
                "ORDER BY entry_id",
                (now, embedding_model),
            )
            async for row in cur:
                yield _live_entry(row)

    # -- entries ---------------------------------------------------------------------------------

    async def add(self, entry: NewEntry) -> int | None:
        # The SQLite store's row: the same columns in the same order.
        values = dict(zip(_NAMES, insert_params(entry), strict=True), channel=CHANNEL, origin=self.origin)
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                cur = await conn.execute(_INSERT, values)
                row = await cur.fetchone()
        except Exception as err:  # noqa: BLE001 - a cache write is optional
            log.warning("semantic cache entry not stored: %s", err)
            return None
        return None if row is None else int(row[0])

    async def answer(self, entry_id: int, now: float) -> tuple[dict[str, Any], Usage] | None:
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                cur = await conn.execute(
                    "SELECT response, input_tokens, cached_input_tokens, output_tokens FROM semantic_cache "
                    "WHERE entry_id = %s AND expires_at > %s",
                    (entry_id, now),
                )
                row = await cur.fetchone()
        except Exception as err:
            raise SharedStateUnavailable(
                f"PostgreSQL (storage.url) did not answer a semantic cache read: {err}"
            ) from err
        if row is None:
            return None
        usage = Usage(input_tokens=row[1], cached_input_tokens=row[2], output_tokens=row[3])
        return orjson.loads(row[0]), usage

    async def delete(self, entry_ids: list[int]) -> None:
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                await conn.execute("DELETE FROM semantic_cache WHERE entry_id = ANY(%s)", (entry_ids,))
        except Exception as err:  # noqa: BLE001 - they expire by TTL
            log.warning("semantic cache entries not deleted (they expire by TTL): %s", err)

    async def drop_expired(self, now: float) -> None:
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                await conn.execute("DELETE FROM semantic_cache WHERE expires_at <= %s", (now,))
        except Exception as err:  # noqa: BLE001 - the next sweep does it
            log.warning("expired semantic cache entries not removed yet: %s", err)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._close_listener()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


__all__ = ["CHANNEL", "PostgresSemanticStore"]
