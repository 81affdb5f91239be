"""Semantic hits of routes that verify, on PostgreSQL, shared by every replica (see ``hit_log``).

Feedback sent to any replica finds a hit served by another, or before a restart: the replica that
claims the row (``UPDATE ... WHERE feedback = 0``: row-locked, so of two replicas claiming at once
one gets it) counts it, once, in its partition's state, which the replicas then share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thrifty.cache.semantic.hit_log import HitRecord


class PostgresHitLog:
    def __init__(self, pool: Any, *, timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def write(self, hits: Sequence[HitRecord]) -> None:
        # One transaction: a batch is stored whole or not at all (and then kept to write again).
        async with (
            self._pool.connection(timeout=self._timeout_s) as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            await cur.executemany(
                "INSERT INTO semantic_hits (tenant_id, request_id, route, partition, score, answer_id, "
                "served_at, feedback) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, request_id) DO UPDATE SET "
                "feedback = GREATEST(semantic_hits.feedback, excluded.feedback)",
                [h.row() for h in hits],
            )

    async def claim(self, tenant_id: str, request_id: str) -> HitRecord | None:
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                "UPDATE semantic_hits SET feedback = 1 WHERE tenant_id = %s AND request_id = %s "
                "AND feedback = 0 RETURNING route, partition, score, answer_id, served_at",
                (tenant_id, request_id),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        route, partition, score, answer_id, served_at = row
        return HitRecord(tenant_id, request_id, route, partition, score, answer_id, float(served_at), True)

    async def prune(self, before: float, max_rows: int) -> int:
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute("DELETE FROM semantic_hits WHERE served_at < %s", (before,))
            old = int(cur.rowcount)
            # The served_at of the newest row past the cap (an index scan of max_rows entries,
            # once a minute, on the database), and everything served before it.
            cur = await conn.execute(
                "DELETE FROM semantic_hits WHERE served_at <= (SELECT served_at FROM semantic_hits "
                "ORDER BY served_at DESC OFFSET %s LIMIT 1)",
                (max_rows,),
            )
            return old + int(cur.rowcount)


__all__ = ["PostgresHitLog"]
