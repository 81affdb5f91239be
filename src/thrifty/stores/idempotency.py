"""Idempotency records in the SQLite file (the embedded default of `IdempotencyStore`).

Every operation runs on one worker thread with its own connection, so the event loop never
waits for SQLite's write lock (the ledger's group commit holds it for a batch at a time), and
the operations of one process apply in the order they were asked for. `claim` is one
`BEGIN IMMEDIATE` transaction, so processes sharing the file also get one owner per key.

Finished results are kept until their TTL, and at most `max_entries` of them (the oldest go
first, a tenth of the bound at a time); running rows are never dropped before their lease ends.
A running row's lease is short and renewed by its live owner, so a key whose process was killed
mid-request is free for a retry (after a restart, or in another process on the file) within one
short lease, not the whole `idempotency.lease_s`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import orjson

from thrifty.stores.ports import IdempotencyKey, IdempotencyRecord, StoredResult
from thrifty.stores.sqlite_db import open_database

T = TypeVar("T")

# Expired rows are swept every this many completions (and whenever the table is over its bound).
_SWEEP_EVERY = 500


class SqliteIdempotencyStore:
    def __init__(self, path: Path, *, max_entries: int, synchronous: str = "normal") -> None:
        self._path = path
        self._max_entries = max_entries
        self._synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._done = 0  # finished rows, as far as this process knows
        self._since_sweep = 0

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="thrifty-idempotency")
        await self._run(self._open)

    def _open(self) -> None:
        self._conn = open_database(self._path, synchronous=self._synchronous)
        self._done = self._conn.execute("SELECT count(*) FROM idempotency WHERE state = 'done'").fetchone()[0]

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._close_connection)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None, "SqliteIdempotencyStore.start() was not awaited"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    # -- the port ----------------------------------------------------------------------------

    async def claim(
        self, key: IdempotencyKey, fingerprint: str, *, owner: str, now: float, lease_s: float
    ) -> IdempotencyRecord | None:
        return await self._run(lambda: self._claim(key, fingerprint, owner, now, lease_s))

    def _claim(
        self, key: IdempotencyKey, fingerprint: str, owner: str, now: float, lease_s: float
    ) -> IdempotencyRecord | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT fingerprint, state, owner, response, cost_usd, expires_at FROM idempotency "
                "WHERE tenant_id = ? AND idem_key = ?",
                (key.tenant_id, key.key),
            ).fetchone()
            if row is not None:
                found_fingerprint, state, found_owner, response, cost, expires_at = row
                live = expires_at > now and not (state == "running" and found_owner == owner)
                if live:
                    db.execute("COMMIT")
                    result = None
                    if state == "done":
                        result = StoredResult(orjson.loads(response), None if cost is None else Decimal(cost))
                    return IdempotencyRecord(found_fingerprint, result, expires_at)
                if state == "done":
                    self._done -= 1
            db.execute(
                "INSERT OR REPLACE INTO idempotency (tenant_id, idem_key, fingerprint, state, owner, "
                "response, cost_usd, created_at, expires_at) "
                "VALUES (?, ?, ?, 'running', ?, NULL, NULL, ?, ?)",
                (key.tenant_id, key.key, fingerprint, owner, now, now + lease_s),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return None

    async def finished(self, key: IdempotencyKey, now: float) -> IdempotencyRecord | None:
        """The key's finished, unexpired record, if any (read only)."""
        return await self._run(lambda: self._finished(key, now))

    def _finished(self, key: IdempotencyKey, now: float) -> IdempotencyRecord | None:
        row = self._db.execute(
            "SELECT fingerprint, response, cost_usd, expires_at FROM idempotency "
            "WHERE tenant_id = ? AND idem_key = ? AND state = 'done' AND expires_at > ?",
            (key.tenant_id, key.key, now),
        ).fetchone()
        if row is None:
            return None
        found_fingerprint, response, cost, expires_at = row
        result = StoredResult(orjson.loads(response), None if cost is None else Decimal(cost))
        return IdempotencyRecord(found_fingerprint, result, expires_at)

    async def last_expiry(self) -> float:
        """When the last finished record expires (0 with none)."""
        return await self._run(
            lambda: float(
                self._db.execute(
                    "SELECT coalesce(max(expires_at), 0) FROM idempotency WHERE state = 'done'"
                ).fetchone()[0]
            )
        )

    async def complete(
        self, key: IdempotencyKey, result: StoredResult, *, owner: str, now: float, ttl_s: float
    ) -> None:
        response = orjson.dumps(result.body).decode()
        cost = None if result.cost_usd is None else format(result.cost_usd, "f")
        await self._run(lambda: self._complete(key, response, cost, owner, now, ttl_s))

    def _complete(
        self, key: IdempotencyKey, response: str, cost: str | None, owner: str, now: float, ttl_s: float
    ) -> None:
        updated = self._db.execute(
            "UPDATE idempotency SET state = 'done', response = ?, cost_usd = ?, expires_at = ? "
            "WHERE tenant_id = ? AND idem_key = ? AND owner = ? AND state = 'running'",
            (response, cost, now + ttl_s, key.tenant_id, key.key, owner),
        ).rowcount
        self._done += updated
        self._since_sweep += 1
        if self._done > self._max_entries or self._since_sweep >= _SWEEP_EVERY:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        db = self._db
        db.execute("DELETE FROM idempotency WHERE state = 'done' AND expires_at <= ?", (now,))
        db.execute("DELETE FROM idempotency WHERE state = 'running' AND expires_at <= ?", (now,))
        done = db.execute("SELECT count(*) FROM idempotency WHERE state = 'done'").fetchone()[0]
        if done > self._max_entries:
            # The oldest finished results go first (they expire first); running rows never do.
            # Down to a tenth below the bound: a full table is then swept once per that many
            # completions, not on every one (a count over the whole table per request was most
            # of the CPU of a 100,000-request replay once the table had filled).
            keep = self._max_entries - self._max_entries // 10
            db.execute(
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                "WHERE state = 'done' ORDER BY expires_at LIMIT ?)",
                (done - keep,),
            )
            done = keep
        self._done = done
        self._since_sweep = 0

    async def renew(self, key: IdempotencyKey, *, owner: str, now: float, lease_s: float) -> bool:
        return await self._run(
            lambda: (
                self._db.execute(
                    "UPDATE idempotency SET expires_at = ? WHERE tenant_id = ? AND idem_key = ? "
                    "AND owner = ? AND state = 'running'",
                    (now + lease_s, key.tenant_id, key.key, owner),
                ).rowcount
                == 1
            )
        )

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "DELETE FROM idempotency WHERE tenant_id = ? AND idem_key = ? AND owner = ? "
                "AND state = 'running'",
                (key.tenant_id, key.key, owner),
            )
        )


__all__ = ["SqliteIdempotencyStore"]
