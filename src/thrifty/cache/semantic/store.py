"""Where the semantic cache's entries are kept: each with its embedding, so a restart rebuilds the index.

The in-process index (``partitions``) is a view of these rows; the store is the truth. An entry is
served only after its row is read back unexpired, so a purge from another process (``thrifty cache
purge``) takes effect at once even though that process cannot reach this one's index.

Two implementations: ``SqliteSemanticStore`` (the embedded default; plain calls, no await) and,
with several replicas, a ``SharedSemanticStore`` (PostgreSQL, ``thrifty.stores.postgres_semantic``):
async, and it tells each replica about the entries the others add, so their indexes follow.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from thrifty.stores.cache_purges import not_purged, purge_sqlite
from thrifty.stores.sqlite_db import connect, scope_where
from thrifty.types import Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NewEntry:
    partition: str
    tenant_id: str
    route: str
    user: str | None
    prompt_version: str | None
    corpus_version: str | None
    model: str
    system_hash: str
    query: str
    normalised_query: str
    embedding_model: str
    embedding: npt.NDArray[np.float32]
    answer_id: str
    response: dict[str, Any]
    evidence: tuple[str, ...]
    safety_policy_version: str
    usage: Usage
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class LiveEntry:
    """What the index needs of a stored entry (the answer itself stays in SQLite until served)."""

    entry_id: int
    partition: str
    route: str
    query: str
    normalised_query: str
    answer_id: str
    expires_at: float
    embedding: npt.NDArray[np.float32]


class SharedSemanticStore(Protocol):
    """Entries shared by several replicas. Reads and writes cross the network (async); lookups
    stay in each replica's in-process index, which `follow` keeps in step with the others' adds."""

    async def listen(self) -> None:
        """Start hearing of other replicas' entries (before `live`, so none falls in between)."""
        ...

    def live(self, now: float, embedding_model: str) -> AsyncIterator[LiveEntry]:
        """Every unexpired entry made with `embedding_model`, oldest first (to build the index)."""
        ...

    def follow(self, on_entries: Callable[[list[LiveEntry]], None]) -> None:
        """Call `on_entries` (on the loop) with the entries other replicas add from now on, and
        with those added since `listen`; an entry may come twice (callers skip ids they hold)."""
        ...

    async def add(self, entry: NewEntry) -> int | None:
        """Store an entry; its id, or None when the store could not take it (a write is optional)."""
        ...

    async def answer(self, entry_id: int, now: float) -> tuple[dict[str, Any], Usage] | None:
        """The stored response of an unexpired entry, None when it expired or was purged; raises
        SharedStateUnavailable when the store does not answer (a miss, not a purge)."""
        ...

    async def delete(self, entry_ids: list[int]) -> None: ...

    async def drop_expired(self, now: float) -> None: ...

    async def close(self) -> None: ...


INSERT_SQL = (
    "INSERT INTO semantic_cache (entry_id, partition, tenant_id, route, user, prompt_version, "
    "corpus_version, model, system_hash, query, normalised_query, embedding_model, embedding, "
    "answer_id, response, evidence, safety_policy_version, input_tokens, cached_input_tokens, "
    "output_tokens, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# The writer thread's insert of an entry made earlier: nothing when a purge since covers it (the
# numbers are INSERT_SQL's placeholders: 21 created_at, 3 tenant, 4 route, 6 and 7 the versions).
QUEUED_INSERT_SQL = (
    INSERT_SQL.split(" VALUES ")[0]
    + " SELECT "
    + ", ".join(f"?{i}" for i in range(1, 23))
    + " WHERE "
    + not_purged(
        "semantic",
        "?21",
        {"tenant_id": "?3", "route": "?4", "prompt_version": "?6", "corpus_version": "?7"},
    )
)
# Ids handed out before their rows are written (``reserve_ids``) are taken from this many at once.
ID_BLOCK = 1024


def insert_params(entry: NewEntry) -> tuple[object, ...]:
    """The row of ``entry`` for ``INSERT_SQL``, after its id (None: SQLite picks one)."""
    u = entry.usage
    return (
        entry.partition,
        entry.tenant_id,
        entry.route,
        entry.user,
        entry.prompt_version,
        entry.corpus_version,
        entry.model,
        entry.system_hash,
        entry.query,
        entry.normalised_query,
        entry.embedding_model,
        np.asarray(entry.embedding, dtype=np.float32).tobytes(),
        entry.answer_id,
        orjson.dumps(entry.response).decode(),
        orjson.dumps(list(entry.evidence)).decode() if entry.evidence else None,
        entry.safety_policy_version,
        u.input_tokens,
        u.cached_input_tokens,
        u.output_tokens,
        entry.created_at,
        entry.expires_at,
    )


def reserve_ids(path: Path, count: int = ID_BLOCK) -> range:
    """Take ``count`` entry ids no other process will use: the table's AUTOINCREMENT counter is
    moved past them in one write transaction (waiting for the lock: call it off the loop), so an
    insert elsewhere, or a later block, starts above them. Entries can then be indexed and served
    under their id before their rows are committed (``entries.LocalEntries``)."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (top,) = conn.execute(
                "SELECT MAX(COALESCE((SELECT MAX(entry_id) FROM semantic_cache), 0), "
                "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'semantic_cache'), 0))"
            ).fetchone()
            end = int(top) + count
            if not conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = 'semantic_cache'", (end,)
            ).rowcount:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('semantic_cache', ?)", (end,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return range(int(top) + 1, end + 1)


class SqliteSemanticStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def add(self, entry: NewEntry) -> int | None:
        """Store an entry; its id, or None when the database is busy (a cache write is optional)."""
        try:
            cursor = self._conn.execute(INSERT_SQL, (None, *insert_params(entry)))
        except sqlite3.OperationalError as err:
            log.warning("semantic cache entry not stored: %s", err)
            return None
        return cursor.lastrowid

    def answer(self, entry_id: int, now: float) -> tuple[dict[str, Any], Usage] | None:
        """The stored response of an unexpired entry, or None when it expired or was purged."""
        row = self._conn.execute(
            "SELECT response, input_tokens, cached_input_tokens, output_tokens FROM semantic_cache "
            "WHERE entry_id = ? AND expires_at > ?",
            (entry_id, now),
        ).fetchone()
        if row is None:
            return None
        usage = Usage(input_tokens=row[1], cached_input_tokens=row[2], output_tokens=row[3])
        return orjson.loads(row[0]), usage

    def live(self, now: float, embedding_model: str) -> Iterator[LiveEntry]:
        """Every unexpired entry made with `embedding_model`, oldest first (to rebuild the index)."""
        rows = self._conn.execute(
            "SELECT entry_id, partition, route, query, normalised_query, answer_id, expires_at, embedding "
            "FROM semantic_cache "
            "WHERE expires_at > ? AND embedding_model = ? ORDER BY entry_id",
            (now, embedding_model),
        )
        for entry_id, partition, route, query, normalised, answer_id, expires_at, blob in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            yield LiveEntry(entry_id, partition, route, query, normalised, answer_id, expires_at, vector)

    def delete(self, entry_ids: list[int]) -> None:
        try:
            self._conn.executemany("DELETE FROM semantic_cache WHERE entry_id = ?", [(i,) for i in entry_ids])
        except sqlite3.OperationalError as err:
            log.warning("semantic cache entries not deleted (they expire by TTL): %s", err)

    def drop_expired(self, now: float) -> None:
        try:
            self.purge(expired_before=now)
        except sqlite3.OperationalError as err:
            log.warning("expired semantic cache entries not removed yet: %s", err)

    def purge(
        self,
        *,
        tenant: str | None = None,
        route: str | None = None,
        prompt_version: str | None = None,
        corpus_version: str | None = None,
        expired_before: float | None = None,
    ) -> int:
        scope = {
            "tenant_id": tenant,
            "route": route,
            "prompt_version": prompt_version,
            "corpus_version": corpus_version,
        }
        where, params = scope_where(scope, expired_before=expired_before)
        if expired_before is not None:  # expired entries are never served: nothing to record
            return self._conn.execute(f"DELETE FROM semantic_cache{where}", params).rowcount
        return purge_sqlite(self._conn, "semantic", where, params, scope)


__all__ = [
    "ID_BLOCK",
    "INSERT_SQL",
    "QUEUED_INSERT_SQL",
    "LiveEntry",
    "NewEntry",
    "SharedSemanticStore",
    "SqliteSemanticStore",
    "insert_params",
    "reserve_ids",
]
