"""Purges that late cache writes respect.

An entry can reach its table after it was made: the SQLite cache writer commits on its own thread
(waiting for the lock as long as it takes), and replicas write PostgreSQL rows after the response.
`thrifty cache purge` deletes rows; a write still queued at that moment would bring its entry back.
So a purge by scope (not by expiry, which needs no help) is also recorded in ``cache_purges``, and
a late insert whose entry was made at or before a purge covering its scope writes nothing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from typing import Any

# A queued write is seconds old at most; a purge older than this covers nothing still in flight.
KEEP_S = 86400.0
SCOPE = ("tenant_id", "route", "prompt_version", "corpus_version")
CACHES = ("exact", "semantic")


def not_purged(cache: str, created_at: str, scope: Mapping[str, str]) -> str:
    """A WHERE condition: no purge of ``cache`` made at or after the entry's ``created_at`` covers
    its scope (a purge's NULL column covers every value). Arguments are the SQL placeholders."""
    assert cache in CACHES and set(scope) == set(SCOPE)
    covers = " AND ".join(f"(p.{col} IS NULL OR p.{col} = {scope[col]})" for col in SCOPE)
    return (
        f"NOT EXISTS (SELECT 1 FROM cache_purges p WHERE p.cache = '{cache}' "
        f"AND p.purged_at >= {created_at} AND {covers})"
    )


def _row(cache: str, scope: Mapping[str, str | None], now: float) -> tuple[Any, ...]:
    assert cache in CACHES
    return (cache, *(scope.get(col) for col in SCOPE), now)


def record_sqlite(conn: sqlite3.Connection, cache: str, scope: Mapping[str, str | None], now: float) -> None:
    """Record a purge (inside the caller's transaction, with its DELETE), and forget old ones."""
    conn.execute("DELETE FROM cache_purges WHERE purged_at < ?", (now - KEEP_S,))
    conn.execute(
        "INSERT INTO cache_purges (cache, tenant_id, route, prompt_version, corpus_version, purged_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        _row(cache, scope, now),
    )


def purge_sqlite(
    conn: sqlite3.Connection, cache: str, where: str, params: list[object], scope: Mapping[str, str | None]
) -> int:
    """Delete ``cache``'s rows matching ``where`` and record the purge, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        record_sqlite(conn, cache, scope, time.time())
        removed = conn.execute(f"DELETE FROM {cache}_cache{where}", params).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return removed


def record_postgres(conn: Any, cache: str, scope: Mapping[str, str | None], now: float) -> None:
    """`record_sqlite` on a psycopg connection (inside the caller's transaction)."""
    conn.execute("DELETE FROM cache_purges WHERE purged_at < %s", (now - KEEP_S,))
    conn.execute(
        "INSERT INTO cache_purges (cache, tenant_id, route, prompt_version, corpus_version, purged_at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        _row(cache, scope, now),
    )


__all__ = ["KEEP_S", "SCOPE", "not_purged", "purge_sqlite", "record_postgres", "record_sqlite"]
