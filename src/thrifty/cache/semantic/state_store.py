"""SQLite rows of the adaptive cache's per-partition state (``adaptive.PartitionState``).

One row per partition: the tenant and route it belongs to (for ``thrifty cache stats`` and tenant
isolation), the state as JSON, and when it was written. Kept apart from the entries' store
(``store.py``) so the entries can move to another backend without this, and this without them.
Writes are batched by the caller (``verify.Verifier``): a lookup changes its partition's counters
in memory and the row follows within seconds, and at shutdown.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator

import orjson

from thrifty.cache.semantic.adaptive import PartitionState

log = logging.getLogger(__name__)


class SqlitePartitionStateStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def load(self, limit: int) -> Iterator[tuple[str, PartitionState]]:
        """The ``limit`` most recently written states, newest first."""
        rows = self._conn.execute(
            "SELECT partition, state FROM semantic_partition_state ORDER BY updated_at DESC LIMIT ?", (limit,)
        )
        for partition, state in rows:
            yield partition, PartitionState.from_dict(orjson.loads(state))

    def get(self, partition: str) -> PartitionState | None:
        row = self._conn.execute(
            "SELECT state FROM semantic_partition_state WHERE partition = ?", (partition,)
        ).fetchone()
        return None if row is None else PartitionState.from_dict(orjson.loads(row[0]))

    def save(self, states: Iterable[tuple[str, PartitionState]], now: float) -> bool:
        """Write these partitions' states; False when the database is busy (kept for the next try)."""
        rows = [
            (partition, s.tenant_id, s.route, orjson.dumps(s.to_dict()).decode(), now)
            for partition, s in states
        ]
        try:
            with self._conn:
                self._conn.executemany(
                    "INSERT INTO semantic_partition_state (partition, tenant_id, route, state, updated_at) "
                    "VALUES (?,?,?,?,?) ON CONFLICT (partition) DO UPDATE SET state = excluded.state, "
                    "updated_at = excluded.updated_at",
                    rows,
                )
        except sqlite3.OperationalError as err:
            log.warning("semantic cache partition state not written yet: %s", err)
            return False
        return True

    def rows(
        self, *, tenant: str | None = None, route: str | None = None
    ) -> list[tuple[str, PartitionState, float]]:
        """Stored states, optionally of one tenant and/or route (for ``thrifty cache stats``)."""
        sql = "SELECT partition, state, updated_at FROM semantic_partition_state WHERE 1 = 1"
        params: list[str] = []
        if tenant is not None:
            sql += " AND tenant_id = ?"
            params.append(tenant)
        if route is not None:
            sql += " AND route = ?"
            params.append(route)
        sql += " ORDER BY tenant_id, route, partition"
        return [
            (p, PartitionState.from_dict(orjson.loads(s)), float(t))
            for p, s, t in self._conn.execute(sql, params)
        ]

    def purge(self, *, tenant: str | None = None, route: str | None = None) -> int:
        sql = "DELETE FROM semantic_partition_state WHERE 1 = 1"
        params: list[str] = []
        if tenant is not None:
            sql += " AND tenant_id = ?"
            params.append(tenant)
        if route is not None:
            sql += " AND route = ?"
            params.append(route)
        return self._conn.execute(sql, params).rowcount


__all__ = ["SqlitePartitionStateStore"]
