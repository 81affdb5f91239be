"""The semantic cache's partition rows as stored, for a process that does not serve the cache.

``thrifty cache stats`` and the standalone ``thrifty dashboard`` read what the gateways wrote:
the partition states (``semantic_partition_state``, in the SQLite file or the table every replica
merges into on PostgreSQL) and the live entries per partition, and turn them into the same rows as
the serving gateway's dashboard (``stats.partition_stats``). Synchronous: call it off the loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from thrifty.cache.semantic.adaptive import PartitionState
from thrifty.cache.semantic.stage import load_params
from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
from thrifty.cache.semantic.stats import PartitionStats, partition_stats
from thrifty.settings import Settings

States = list[tuple[str, PartitionState, float]]


def stored_partition_stats(
    settings: Settings | None,
    *,
    path: Path | None = None,
    tenant: str | None = None,
    route: str | None = None,
) -> list[PartitionStats]:
    """Rows of ``tenant``'s partitions (None: every tenant's), from the SQLite file ``path`` or,
    without one, from the settings' storage (PostgreSQL or its SQLite file). With no settings
    (a bare file) thresholds are not known: the rows have none."""
    semantic = {
        name: r.semantic_cache
        for name, r in (settings.routes.items() if settings is not None else ())
        if r.semantic_cache is not None and r.semantic_cache.enabled
    }
    verify = {name: s.verify for name, s in semantic.items() if s.verify is not None and s.verify.enabled}
    params = {name: load_params(s) for name, s in semantic.items()}
    if path is None and settings is not None and settings.storage.backend == "postgresql":
        states, counts = _postgres(settings.storage.url, tenant, route)
    else:
        where = path or (settings.storage.sqlite_path if settings is not None else None)
        if where is None:
            raise ValueError("a SQLite path or settings are needed")
        states, counts = _sqlite(where, tenant, route)
    return partition_stats([(p, s) for p, s, _ in states], verify, params, counts)


def _sqlite(path: Path, tenant: str | None, route: str | None) -> tuple[States, dict[str, int]]:
    from thrifty.stores.sqlite_db import open_database

    conn = open_database(path)  # an older file is brought up to date (the table may be new)
    try:
        states = SqlitePartitionStateStore(conn).rows(tenant=tenant, route=route)
        counts = dict(
            conn.execute(
                "SELECT partition, count(*) FROM semantic_cache WHERE expires_at > ? GROUP BY partition",
                (time.time(),),
            ).fetchall()
        )
    finally:
        conn.close()
    return states, counts


def _postgres(url: str, tenant: str | None, route: str | None) -> tuple[States, dict[str, int]]:
    """The partition states every replica merged into PostgreSQL, and the live entries' counts."""
    from thrifty.stores import postgres

    sql = "SELECT partition, state, updated_at FROM semantic_partition_state WHERE TRUE"
    args: list[object] = []
    if tenant is not None:
        sql += " AND tenant_id = %s"
        args.append(tenant)
    if route is not None:
        sql += " AND route = %s"
        args.append(route)
    conn = postgres.connect(url)
    try:
        rows = conn.execute(sql + " ORDER BY tenant_id, route, partition", args).fetchall()
        counts = dict(
            conn.execute(
                "SELECT partition, count(*) FROM semantic_cache WHERE expires_at > %s GROUP BY partition",
                (time.time(),),
            ).fetchall()
        )
    finally:
        conn.close()
    states = [(p, PartitionState.from_dict(_json(st)), float(t)) for p, st, t in rows]
    return states, counts


def _json(value: Any) -> Any:
    return value if isinstance(value, dict) else orjson.loads(value)


__all__ = ["stored_partition_stats"]
