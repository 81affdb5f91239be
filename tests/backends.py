"""One test, both durable backends: `storage` is the settings' storage section for the embedded
SQLite file or a fresh PostgreSQL database (real, started by scripts/services.sh), and `query`
reads a table of either the way the test needs (the rows as tuples)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.services import pg_url, services
from thrifty.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    return {
        "url": request.getfixturevalue("pg_url"),
        "spool_path": str(tmp_path / "spool.jsonl"),
        "local_path": str(tmp_path / "local.db"),
    }


def query(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    """A statement without parameters on the settings' store (a test's look at the tables)."""
    if settings.storage.backend == "sqlite":
        conn = sqlite3.connect(settings.storage.sqlite_path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(settings.storage.url, autocommit=True) as pg:
        return [tuple(row) for row in pg.execute(sql).fetchall()]


__all__ = ["pg_url", "query", "services", "storage"]
