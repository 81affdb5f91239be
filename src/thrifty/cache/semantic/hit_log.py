"""Semantic hits of routes that verify, kept in SQLite so feedback on one is matched later.

Feedback (``x-thrifty-cache-wrong: <request_id>``) names a hit that may be older than anything a
process can hold in memory, or from before a restart. ``verify.Verifier`` writes its hits here in
batches off the response path, and applies feedback by *claiming* the row: an ``UPDATE ... WHERE
feedback = 0`` of the tenant's own row, so a hit counts once and another tenant's request id
matches nothing. The PostgreSQL twin is ``stores/postgres_semantic_hits.py``; both speak ``HitRecord``.

The connection is the loop's (``busy_timeout=0``): a write that finds the lock busy fails at once
and is tried again by the caller, never waited for on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

_CLAIM_TRIES = 40  # the lock busy: try again every 50 ms, for up to 2 s (off the response path)
_WRITE_SQL = (
    "INSERT INTO semantic_hits (tenant_id, request_id, route, partition, score, answer_id, served_at, "
    "feedback) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (tenant_id, request_id) DO UPDATE SET "
    "feedback = MAX(semantic_hits.feedback, excluded.feedback)"
)
_CLAIM_SQL = (
    "UPDATE semantic_hits SET feedback = 1 WHERE tenant_id = ? AND request_id = ? AND feedback = 0 "
    "RETURNING route, partition, score, answer_id, served_at"
)


@dataclass(slots=True)
class HitRecord:
    """One semantic hit, as feedback needs it (``score`` None: a repeat of a cached question)."""

    tenant_id: str
    request_id: str
    route: str
    partition: str
    score: float | None
    answer_id: str
    served_at: float
    feedback: bool = False

    def row(self) -> tuple[str, str, str, str, float | None, str, float, int]:
        return (
            self.tenant_id,
            self.request_id,
            self.route,
            self.partition,
            self.score,
            self.answer_id,
            self.served_at,
            int(self.feedback),
        )


class HitLog(Protocol):
    async def write(self, hits: Sequence[HitRecord]) -> None:
        """Store these hits (a row already there keeps its feedback, or takes it from the hit)."""
        ...

    async def claim(self, tenant_id: str, request_id: str) -> HitRecord | None:
        """Mark the tenant's hit as judged and return it; None when there is no such hit of this
        tenant's, or its feedback was counted already."""
        ...

    async def prune(self, before: float, max_rows: int) -> int:
        """Forget hits served before ``before``, and the oldest past the newest ``max_rows``; how many."""
        ...


class SqliteHitLog:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def write(self, hits: Sequence[HitRecord]) -> None:
        """Raises sqlite3.OperationalError when the database is busy (the caller keeps the hits)."""
        self._conn.execute("BEGIN IMMEDIATE")  # one commit for the batch (the connection autocommits)
        try:
            self._conn.executemany(_WRITE_SQL, [h.row() for h in hits])
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    async def claim(self, tenant_id: str, request_id: str) -> HitRecord | None:
        for attempt in range(_CLAIM_TRIES):
            try:
                rows = self._conn.execute(
                    _CLAIM_SQL, (tenant_id, request_id)
                ).fetchall()  # all: the statement ends, its lock goes
            except sqlite3.OperationalError:
                if attempt == _CLAIM_TRIES - 1:
                    raise
                await asyncio.sleep(0.05)
                continue
            if not rows:
                return None
            route, partition, score, answer_id, served_at = rows[0]
            return HitRecord(tenant_id, request_id, route, partition, score, answer_id, served_at, True)
        return None  # pragma: no cover - the loop returns or raises

    async def prune(self, before: float, max_rows: int) -> int:
        old = self._conn.execute("DELETE FROM semantic_hits WHERE served_at < ?", (before,)).rowcount
        # Rows are inserted in the order they are served and an upsert keeps its rowid, so the
        # oldest are the lowest rowids: a cut found from MAX(rowid), not by scanning the rows.
        over = self._conn.execute(
            "DELETE FROM semantic_hits WHERE rowid <= (SELECT MAX(rowid) FROM semantic_hits) - ?",
            (max_rows,),
        ).rowcount
        return int(old + over)


__all__ = ["HitLog", "HitRecord", "SqliteHitLog"]
