"""PostgreSQL for several replicas: the ledger, virtual keys, alerts and exact-cache entries
(semantic-cache entries: `postgres_semantic`).

The ledger keeps SQLite's promise: a response is released only after its row is committed. Rows
are written by group commit: every row submitted while the previous batch was in flight goes in
one multi-row INSERT, in one transaction, and all their requests are woken at once. Nothing is
ever UPDATEd per request (the budget counters live in Redis). When PostgreSQL does not answer,
a batch is appended to a local spool file (fsynced, then the requests are released) and replayed
when the database is back; `ON CONFLICT (request_id) DO NOTHING` makes a replay idempotent, so
nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import ConfigError, SharedStateUnavailable
from thrifty.stores.cache_purges import SCOPE, not_purged, record_postgres
from thrifty.stores.keys import hash_key, new_key
from thrifty.stores.ledger import entry_row
from thrifty.stores.migrations import POSTGRES_MIGRATIONS
from thrifty.stores.pg_wire import PreparedInsert
from thrifty.stores.readers import (
    ESCALATIONS_SQL,
    POSTGRES_CONTEXT,
    REPORT_SELECT,
    chunks,
    report_query,
    route_requests_query,
    usage_query,
)
from thrifty.types import LedgerEntry, Usage

log = logging.getLogger(__name__)

LEDGER_COLUMNS = (
    "request_id",
    "ts",
    "tenant_id",
    '"user"',
    "feature",
    "route",
    "prompt_version",
    "model",
    "provider",
    "attempts",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "cost_usd",
    "saved_usd",
    "cache",
    "escalated",
    "retries",
    "retry_cost_usd",
    "status",
    "http_status",
    "error",
    "latency_ms",
    "ttft_ms",
    "idempotency_key",
    "batch",
    "stream",
    "context",
    "variant",
)
_CASTS = {
    "attempts": "::jsonb",
    "context": "::jsonb",
    "cost_usd": "::numeric",
    "saved_usd": "::numeric",
    "retry_cost_usd": "::numeric",
}
_ROW_TEMPLATE = "(" + ", ".join("%s" + _CASTS.get(c, "") for c in LEDGER_COLUMNS) + ")"
_MIGRATION_LOCK = 7_245_001  # pg_advisory_xact_lock key: replicas starting together migrate once
_RETRY_REPLAY_S = 1.0


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigError("storage.url postgresql:// needs psycopg: pip install 'thrifty[shared]'") from err
    return psycopg


def conninfo(url: str) -> str:
    return "postgresql://" + url.removeprefix("postgres://").removeprefix("postgresql://")


def connect(url: str) -> Any:
    """A synchronous autocommit connection (start-up, the CLI); unreachable is a clear error."""
    psycopg = _psycopg()
    try:
        return psycopg.connect(conninfo(url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        raise unreachable(url, err) from err


def unreachable(url: str, err: BaseException) -> SharedStateUnavailable:
    where = url.split("@")[-1]  # never echo a password
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SharedStateUnavailable(
        f"PostgreSQL at {where} (storage.url) is unreachable: {first}; start it (bash scripts/services.sh "
        "start DIR for a local one) or fix storage.url"
    )


def migrate(conn: Any) -> list[int]:
    """Apply the PostgreSQL migrations this database has not seen; return their versions."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in POSTGRES_MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, time.time()))
            applied.append(version)
    return applied


def insert_ledger_sql_numbered(n: int) -> str:
    """The same statement with libpq's $1.. placeholders (stores/pg_wire.py prepares it)."""
    width = len(LEDGER_COLUMNS)
    rows = (
        "("
        + ", ".join(f"${r * width + i + 1}{_CASTS.get(c, '')}" for i, c in enumerate(LEDGER_COLUMNS))
        + ")"
        for r in range(n)
    )
    return (
        f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) VALUES "
        + ", ".join(rows)
        + " ON CONFLICT (request_id) DO NOTHING"
    )


def insert_ledger_sql(n: int) -> str:
    return (
        f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) VALUES "
        + ", ".join([_ROW_TEMPLATE] * n)
        + " ON CONFLICT (request_id) DO NOTHING"
    )


class PostgresLedgerWriter:
    """The ledger sink on PostgreSQL (group commit, spool when unreachable)."""

    def __init__(self, url: str, spool_path: Path, *, batch_max: int = 512) -> None:
        self._url = url
        self._spool = Path(spool_path)
        self._batch_max = batch_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._conn: Any = None
        self._insert: PreparedInsert | None = None
        self._task: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._closing = False
        self.spooled = 0  # rows written to the spool (a metric)
        self.spool_depth = 0  # rows in the spool not yet replayed into PostgreSQL (a queue depth)
        self._observers: list[Callable[[list[tuple[Any, ...]]], None]] = []

    def observe(self, observer: Callable[[list[tuple[Any, ...]]], None]) -> None:
        """Call `observer` with every written batch's rows (committed or spooled), on the loop."""
        self._observers.append(observer)

    @property
    def pending(self) -> int:
        """Entries submitted and not yet written (a queue depth for /metrics)."""
        return len(self._pending)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._run())
        if self._has_spool():
            # Left by an earlier process: counted once, then kept up to date as rows come and go.
            self.spool_depth = sum(_count_lines(p) for p in (self._spool, self._replaying_path))
            self._start_replayer()

    def submit(self, entry: LedgerEntry) -> asyncio.Future[None]:
        assert self._loop is not None, "PostgresLedgerWriter.start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((entry_row(entry), future))
        self._wake.set()
        return future

    async def aclose(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[None]]]) -> None:
        psycopg = _psycopg()
        rows = [row for row, _ in batch]
        try:
            insert = await self._inserter()
            # One multi-row INSERT on an autocommit connection: one statement is one transaction,
            # and one round trip (BEGIN and COMMIT would add two); prepared once per batch size
            # and sent through libpq (pg_wire.py: about half psycopg's client CPU per INSERT).
            await insert.insert(rows)
        except (psycopg.Error, OSError) as err:
            await self._drop_connection()
            self._spool_rows(rows, err)
            self._start_replayer()
        for observer in self._observers:
            try:
                observer(rows)
            except Exception:
                log.exception("a ledger batch observer failed; the batch itself is written")
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _inserter(self) -> PreparedInsert:
        if self._conn is None or self._conn.closed or self._insert is None:
            await self._drop_connection()
            self._conn = await _psycopg().AsyncConnection.connect(
                conninfo(self._url), connect_timeout=2, autocommit=True
            )
            self._insert = PreparedInsert(self._conn, insert_ledger_sql_numbered)
        return self._insert

    async def _drop_connection(self) -> None:
        self._insert = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    # -- spool ---------------------------------------------------------------------------------

    def _spool_rows(self, rows: list[tuple[Any, ...]], error: BaseException) -> None:
        """Keep the rows in an fsynced JSONL file; they count as written once this returns."""
        log.error("PostgreSQL unreachable (%s); %d ledger rows spooled to %s", error, len(rows), self._spool)
        self._spool.parent.mkdir(parents=True, exist_ok=True)
        with self._spool.open("ab") as fh:
            for row in rows:
                fh.write(orjson.dumps(list(row)) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.spooled += len(rows)
        self.spool_depth += len(rows)

    @property
    def _replaying_path(self) -> Path:
        return self._spool.with_name(self._spool.name + ".replaying")

    def _has_spool(self) -> bool:
        return self._spool.exists() or self._replaying_path.exists()

    def _start_replayer(self) -> None:
        if self._replayer is None or self._replayer.done():
            assert self._loop is not None
            self._replayer = self._loop.create_task(self._replay_until_done())

    async def _replay_until_done(self) -> None:
        while self._has_spool():
            try:
                await self.replay()
            except Exception as err:  # noqa: BLE001 - any failure: keep the file, try again later
                log.warning("ledger spool replay deferred: %s", err)
                await asyncio.sleep(_RETRY_REPLAY_S)

    async def replay(self) -> int:
        """Insert the spooled rows (a repeat inserts nothing twice); return how many were read."""
        if not self._replaying_path.exists():
            if not self._spool.exists():
                return 0
            os.replace(self._spool, self._replaying_path)  # new spills go to a fresh file
        lines = self._replaying_path.read_bytes().splitlines()
        # A spool written before a column was added (e.g. `variant`) has shorter rows: the new
        # columns are NULL for them, as they are for old rows in the table.
        width = len(LEDGER_COLUMNS)
        rows = [
            (values + [None] * (width - len(values)))
            for values in (list(orjson.loads(line)) for line in lines if line.strip())
        ]
        conn = await _psycopg().AsyncConnection.connect(conninfo(self._url), connect_timeout=2)
        try:
            for start in range(0, len(rows), self._batch_max):
                chunk = rows[start : start + self._batch_max]
                async with conn.transaction():
                    await conn.execute(insert_ledger_sql(len(chunk)), [v for row in chunk for v in row])
        finally:
            await conn.close()
        self._replaying_path.unlink()
        self.spool_depth = max(self.spool_depth - len(rows), 0)
        log.warning("replayed %d spooled ledger rows into PostgreSQL", len(rows))
        return len(rows)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


class PostgresKeys:
    """Virtual keys on PostgreSQL (the CLI's key store; sync)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def create(self, tenant_id: str, label: str | None = None) -> str:
        key = new_key()
        self._conn.execute(
            "INSERT INTO virtual_keys (key_hash, tenant_id, label, created_at) VALUES (%s, %s, %s, %s)",
            (hash_key(key), tenant_id, label, time.time()),
        )
        return key

    def tenant_for_hash(self, key_hash: str) -> str | None:
        row = self._conn.execute(
            "SELECT tenant_id FROM virtual_keys WHERE key_hash = %s AND revoked_at IS NULL", (key_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    def revoke(self, key_hash_prefix: str) -> int:
        cur = self._conn.execute(
            "UPDATE virtual_keys SET revoked_at = %s WHERE key_hash LIKE %s AND revoked_at IS NULL",
            (time.time(), key_hash_prefix + "%"),
        )
        return int(cur.rowcount)

    def list(self) -> list[tuple[str, str, str | None, float, float | None]]:
        return list(
            self._conn.execute(
                "SELECT substr(key_hash, 1, 12), tenant_id, label, created_at, revoked_at "
                "FROM virtual_keys ORDER BY created_at"
            )
        )


class PostgresKeyDirectory:
    """The gateway's view of the keys: a snapshot refreshed every `refresh_s`, so a lookup on the
    request path is a dict read; a key created or revoked on any replica applies within that."""

    def __init__(self, pool: Any, refresh_s: float) -> None:
        self._pool = pool
        self._refresh_s = refresh_s
        self._tenants: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.ensure_future(self._refresh_periodically())

    async def refresh(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT key_hash, tenant_id FROM virtual_keys WHERE revoked_at IS NULL")
            self._tenants = {h: t for h, t in await cur.fetchall()}

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as err:  # noqa: BLE001 - keep the last snapshot while the database is away
                log.warning("virtual keys not refreshed: %s", err)

    def tenant_for_hash(self, key_hash: str) -> str | None:
        return self._tenants.get(key_hash)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_EXACT_COLUMNS = (
    "cache_key",
    "tenant_id",
    "route",
    "prompt_version",
    "corpus_version",
    "model",
    "response",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "created_at",
    "expires_at",
)
# A put runs after the response: an entry made before a purge covering it is not written.
_EXACT_PUT = (
    f"INSERT INTO exact_cache SELECT {', '.join(f'%({c})s' for c in _EXACT_COLUMNS)} WHERE "
    + not_purged("exact", "%(created_at)s", {c: f"%({c})s" for c in SCOPE})
    + " "
)


class PostgresExactCache:
    """Exact-cache entries shared by every replica (the SharedExactCache port).

    A lookup waits at most `timeout_s` for a pooled connection: with the database away, a lookup
    is a quick miss, not a request held for the pool's default 30 s."""

    def __init__(self, pool: Any, *, timeout_s: float = 1.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def get(self, key: str, now: float) -> tuple[dict[str, Any], Usage] | None:
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            cur = await conn.execute(
                "SELECT response, input_tokens, cached_input_tokens, output_tokens FROM exact_cache "
                "WHERE cache_key = %s AND expires_at > %s",
                (key, now),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return orjson.loads(row[0]), Usage(
            input_tokens=row[1], cached_input_tokens=row[2], output_tokens=row[3]
        )

    async def put(
        self,
        key: str,
        scope: dict[str, Any],
        response: dict[str, Any],
        usage: Usage,
        ttl_s: float,
        made_at: float,
    ) -> None:
        now = made_at
        async with self._pool.connection(timeout=self._timeout_s) as conn:
            await conn.execute(
                _EXACT_PUT + "ON CONFLICT (cache_key) DO UPDATE SET response = EXCLUDED.response, "
                "input_tokens = EXCLUDED.input_tokens, cached_input_tokens = EXCLUDED.cached_input_tokens, "
                "output_tokens = EXCLUDED.output_tokens, created_at = EXCLUDED.created_at, "
                "expires_at = EXCLUDED.expires_at",
                dict(
                    zip(
                        _EXACT_COLUMNS,
                        (
                            key,
                            scope["tenant_id"],
                            scope["route"],
                            scope["prompt_version"],
                            scope["corpus_version"],
                            scope["model"],
                            orjson.dumps(response).decode(),
                            usage.input_tokens,
                            usage.cached_input_tokens,
                            usage.output_tokens,
                            now,
                            now + ttl_s,
                        ),
                        strict=True,
                    )
                ),
            )


def purge_cache(conn: Any, table: str, scope: dict[str, str | None], expired_before: float | None) -> int:
    """Delete a cache table's entries by scope (`thrifty cache purge`); how many went."""
    assert table in ("exact_cache", "semantic_cache")
    columns = {"tenant": "tenant_id", "route": "route", "prompt_version": "prompt_version"}
    columns["corpus_version"] = "corpus_version"
    clauses = [f"{columns[name]} = %s" for name, value in scope.items() if value is not None]
    params: list[object] = [value for value in scope.values() if value is not None]
    if expired_before is not None:
        clauses.append("expires_at <= %s")
        params.append(expired_before)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    if expired_before is not None:  # expired entries are never served: nothing to record
        return int(conn.execute(f"DELETE FROM {table}{where}", params).rowcount)
    with conn.transaction():
        named = {columns[name]: value for name, value in scope.items()}
        record_postgres(conn, table.removesuffix("_cache"), named, time.time())
        return int(conn.execute(f"DELETE FROM {table}{where}", params).rowcount)


class PostgresAlertStore:
    """Alerts once per key across replicas (the primary key decides), async."""

    remote = True

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def insert_once(
        self, key: str, ts: float, kind: str, scope: str, message: str, payload: str
    ) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO alerts (alert_key, ts, kind, scope, message, payload) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (alert_key) DO NOTHING",
                (key, ts, kind, scope, message, payload),
            )
            return bool(cur.rowcount == 1)

    async def mark_delivery(self, key: str, delivered_at: float | None, error: str | None) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE alerts SET delivered_at = %s, delivery_error = %s WHERE alert_key = %s",
                (delivered_at, error, key),
            )

    async def escalations(self, since: float) -> list[tuple[str, int, int | None]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(ESCALATIONS_SQL.format(mark="%s"), (since,))
            return list(await cur.fetchall())

    async def recent_spend(self, since: float) -> list[tuple[float, str, str | None, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT ts, tenant_id, feature, cost_usd FROM ledger WHERE ts >= %s", (since,)
            )
            return list(await cur.fetchall())


class PostgresLedgerReader:
    """Reports, alert listings and the budget rebuild read PostgreSQL through this (sync)."""

    def __init__(self, url: str) -> None:
        self._conn = connect(url)

    def report_rows(
        self, column: str, since: float | None, until: float | None = None, tenant: str | None = None
    ) -> Iterable[tuple[Any, ...]]:
        select = REPORT_SELECT.format(
            column='"user"' if column == "user" else column, context=POSTGRES_CONTEXT
        )
        sql, params = report_query(select, "%s", since, until, tenant)
        return list(self._conn.execute(sql, params))

    def spend_rows(self, since: float) -> Iterable[tuple[float, str, str | None, str | None, Any, int]]:
        return list(
            self._conn.execute(
                "SELECT ts, tenant_id, feature, route, cost_usd, input_tokens + output_tokens FROM ledger "
                "WHERE ts >= %s",
                (since,),
            )
        )

    def usage_rows(self, since: float, until: float, feature: str | None = None) -> Iterable[tuple[Any, ...]]:
        sql, params = usage_query("%s", since, until, feature)
        return list(self._conn.execute(sql, params))

    def alerts_since(self, since: float) -> list[tuple[float, str, str, str, float | None, str | None]]:
        return list(
            self._conn.execute(
                "SELECT ts, kind, scope, message, delivered_at, delivery_error FROM alerts "
                "WHERE ts >= %s ORDER BY ts DESC",
                (since,),
            )
        )

    def route_requests(self, route: str, since: float, prompt_version: str | None = None) -> int:
        sql, params = route_requests_query("%s", route, since, prompt_version)
        return int(self._conn.execute(sql, params).fetchone()[0])

    def costs(self, request_ids: Sequence[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for part in chunks(request_ids):
            rows = self._conn.execute(
                "SELECT request_id, cost_usd FROM ledger WHERE request_id = ANY(%s)", (part,)
            ).fetchall()
            found.update((rid, None if cost is None else format(cost, "f")) for rid, cost in rows)
        return found

    def close(self) -> None:
        self._conn.close()


__all__ = [
    "PostgresAlertStore",
    "PostgresExactCache",
    "PostgresKeyDirectory",
    "PostgresKeys",
    "PostgresLedgerReader",
    "PostgresLedgerWriter",
    "connect",
    "migrate",
    "purge_cache",
]
