"""The adaptive cache's per-partition state on PostgreSQL, shared by every replica.

The table is the one PostgreSQL migration 8 created (`semantic_partition_state`: partition, tenant,
route, the state as JSONB, when it was written). Each replica keeps the states it uses in memory
(``verify.Verifier``) and syncs them every few seconds: it sends what it learned since it last read
a row (a delta: every counter of ``adaptive.PartitionState`` is a sum), the row is read under
``FOR UPDATE``, the delta added (``adaptive.merged``) and written back in the same transaction, and
the merged state comes back to the replica. Two replicas that verify the same partition therefore
add up, never overwrite each other; and rows another replica wrote since the last sync are read
too, so every replica serves from the same thresholds within a sync interval, and a restart
resumes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson

from thrifty.cache.semantic.adaptive import PartitionState, merged

log = logging.getLogger(__name__)

# (partition, the state now, the state as last read from the store, or None when never read)
Delta = tuple[str, PartitionState, PartitionState | None]


class PostgresPartitionStateStore:
    def __init__(self, pool: Any, *, timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def load(self, limit: int) -> list[tuple[str, PartitionState, float]]:
        """The ``limit`` most recently written states, newest first, with when they were written."""
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                "SELECT partition, state, updated_at FROM semantic_partition_state "
                "ORDER BY updated_at DESC LIMIT %s",
                (limit,),
            )
            rows = await cur.fetchall()
        return [(p, PartitionState.from_dict(_json(s)), float(t)) for p, s, t in rows]

    async def changed_since(self, since: float) -> list[tuple[str, PartitionState, float]]:
        """Rows written after ``since`` (by any replica), oldest first."""
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                "SELECT partition, state, updated_at FROM semantic_partition_state "
                "WHERE updated_at > %s ORDER BY updated_at",
                (since,),
            )
            rows = await cur.fetchall()
        return [(p, PartitionState.from_dict(_json(s)), float(t)) for p, s, t in rows]

    async def merge(self, deltas: Sequence[Delta], now: float) -> dict[str, PartitionState]:
        """Add each partition's delta to its row (or create it) in one transaction; the merged states.
        A row of another tenant under the same key is never merged into (the key is a hash of the
        tenant among others; this is a second lock on the door)."""
        if not deltas:
            return {}
        names = sorted({p for p, _, _ in deltas})
        out: dict[str, PartitionState] = {}
        async with self._pool.connection(timeout=self._timeout_s) as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT partition, state FROM semantic_partition_state WHERE partition = ANY(%s) "
                "ORDER BY partition FOR UPDATE",
                (names,),
            )
            stored = {p: PartitionState.from_dict(_json(s)) for p, s in await cur.fetchall()}
            rows = []
            for partition, local, base in deltas:
                row = stored.get(partition)
                if row is not None and row.tenant_id != local.tenant_id:
                    log.warning(
                        "semantic partition state %s belongs to another tenant: not merged", partition
                    )
                    continue
                state = (
                    local
                    if row is None
                    else merged(row, local, base or PartitionState(local.tenant_id, local.route))
                )
                out[partition] = state
                rows.append(
                    (partition, state.tenant_id, state.route, orjson.dumps(state.to_dict()).decode(), now)
                )
            async with conn.cursor() as write:
                await write.executemany(
                    "INSERT INTO semantic_partition_state (partition, tenant_id, route, state, updated_at) "
                    "VALUES (%s, %s, %s, %s::jsonb, %s) ON CONFLICT (partition) DO UPDATE SET "
                    "state = excluded.state, updated_at = excluded.updated_at",
                    rows,
                )
        return out


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


__all__ = ["Delta", "PostgresPartitionStateStore"]
