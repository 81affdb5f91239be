"""The composition root for state: every store the gateway uses, chosen by the settings' URLs.

`storage.url` picks where durable things live (the ledger, keys, alerts, exact- and semantic-cache
entries):
`sqlite:///PATH` (embedded default, zero services) or `postgresql://...` (several replicas).
`shared_state.url` picks where what must be shared and atomic lives (budget reservations, rate
windows, session steps): unset (in-process, one replica) or `redis://...`. Only this module knows
the backends; stages see ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thrifty.cache.exact import SqliteExactCache
from thrifty.errors import SharedStateUnavailable, ThriftyError
from thrifty.guard.budgets import BudgetBook, BudgetPlan, spend_totals
from thrifty.settings import Settings, StorageSettings
from thrifty.stores.faults import LocalFallback
from thrifty.stores.keys import SqliteKeyStore
from thrifty.stores.ledger import LedgerWriter
from thrifty.stores.ports import (
    BreakerBoard,
    CounterKey,
    KeyDirectory,
    LedgerReader,
    SharedBudgetStore,
    SharedExactCache,
    SharedFlights,
    SharedRateStore,
    window_bounds,
)
from thrifty.stores.readers import SqliteAlertStore, SqliteLedgerReader
from thrifty.stores.sqlite_db import open_database
from thrifty.stores.write_behind import SqliteWriteBehind

if TYPE_CHECKING:
    from thrifty.batch.store import BatchStore
    from thrifty.cache.semantic.store import SharedSemanticStore
    from thrifty.experiments.store import ExperimentStore
    from thrifty.stores.postgres_semantic_hits import PostgresHitLog
    from thrifty.stores.postgres_semantic_state import PostgresPartitionStateStore
    from thrifty.stores.redis_state import RedisState

log = logging.getLogger(__name__)

_REBUILD_RETRY_S = 2.0


class Stores:
    """Built once from settings (no I/O); `start()` inside the event loop, `close()` at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        storage = settings.storage
        self.postgres = storage.backend == "postgresql"
        self.budget_book = BudgetBook()  # in-process counters (the shared store's fallback, if any)
        self.ledger: Any
        if self.postgres:
            from thrifty.stores.postgres import PostgresLedgerWriter

            self.ledger = PostgresLedgerWriter(
                storage.url, Path(storage.spool_path), batch_max=storage.ledger_batch_max
            )
        else:
            self.ledger = LedgerWriter(
                storage.sqlite_path, synchronous=storage.synchronous, batch_max=storage.ledger_batch_max
            )
        shared = settings.shared_state
        self.redis: RedisState | None = None
        self.shared_budgets: SharedBudgetStore | None = None
        self.shared_rates: SharedRateStore | None = None
        self.breaker_board: BreakerBoard | None = None
        self.budget_fallback: LocalFallback | None = None
        self.rate_fallback: LocalFallback | None = None
        if shared.url is not None:
            from thrifty.stores.redis_state import RedisBreakerBoard, RedisBudgets, RedisRates, RedisState

            self.redis = RedisState(shared)
            self.shared_budgets = RedisBudgets(self.redis)
            self.shared_rates = RedisRates(self.redis)
            self.breaker_board = RedisBreakerBoard(self.redis, shared.breaker_poll_s)
            if shared.fault_mode == "degrade_local":
                self.budget_fallback = LocalFallback("budgets")
                self.rate_fallback = LocalFallback("rate limits")
        # Idempotency-Key records: Redis with shared state (one owner per key across replicas),
        # otherwise the SQLite file (with PostgreSQL storage: this replica's local file).
        # degrade_local: while Redis is away, this replica's file (at most once per replica).
        from thrifty.stores.idempotency import SqliteIdempotencyStore

        self.idempotency: Any
        self.idempotency_fallback: LocalFallback | None = None
        local_idempotency = SqliteIdempotencyStore(
            storage.sqlite_path, max_entries=settings.idempotency.max_entries, synchronous=storage.synchronous
        )
        self.shared_flights: SharedFlights | None = None  # key-less coalescing across replicas
        if self.redis is not None:
            from thrifty.stores.redis_idempotency import RedisFlights, RedisIdempotencyStore

            self.idempotency = RedisIdempotencyStore(self.redis)
            if any(route.coalesce for route in settings.routes.values()):
                self.shared_flights = RedisFlights(self.redis)
            if shared.fault_mode == "degrade_local":
                from thrifty.stores.idempotency_degraded import DegradingIdempotencyStore

                self.idempotency_fallback = LocalFallback("idempotency keys")
                self.idempotency = DegradingIdempotencyStore(
                    self.idempotency, local_idempotency, self.idempotency_fallback
                )
        else:
            self.idempotency = local_idempotency
        self.keys: KeyDirectory | None = None
        self.alert_store: Any = None
        self.exact_local: SqliteExactCache | None = None
        self.exact_remote: SharedExactCache | None = None
        self.cache_db: sqlite3.Connection | None = None  # SQLite: the exact and semantic caches' entries
        # SQLite: exact-cache puts and semantic-cache entries, committed off the loop.
        self.cache_writer: SqliteWriteBehind | None = None
        self.semantic_remote: SharedSemanticStore | None = None  # PostgreSQL: the semantic entries
        # PostgreSQL: what verification learned per partition, shared by the replicas.
        self.semantic_states: PostgresPartitionStateStore | None = None
        self.semantic_hits: PostgresHitLog | None = None  # PostgreSQL: hits kept for feedback
        self._db: sqlite3.Connection | None = None
        self._pool: Any = None
        self._key_directory: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        # What the dashboard reads (rollups, explorer, alerts), and the timer folding the rollups.
        self.reporting: Any
        if self.postgres:
            from thrifty.stores.postgres_reporting import PostgresReportingStore

            self.reporting = PostgresReportingStore(storage.url)
        else:
            from thrifty.stores.reporting import SqliteReportingStore

            self.reporting = SqliteReportingStore(storage.sqlite_path)
        self._folder: asyncio.Task[None] | None = None

    @property
    def degraded_decisions(self) -> int:
        fallbacks = (self.budget_fallback, self.rate_fallback, self.idempotency_fallback)
        return sum(f.decisions for f in fallbacks if f is not None)

    def health(self) -> dict[str, int]:
        out = {}
        if self.redis is not None:
            out["shared_state_degraded_decisions"] = self.degraded_decisions
        if self.postgres:
            out["ledger_rows_spooled"] = self.ledger.spooled
        return out

    def summary_store(self) -> Any:
        """Context summaries shared by the replicas (PostgreSQL), or None: the caller keeps them in
        the SQLite file. After start()."""
        if self._pool is None:
            return None
        from thrifty.stores.postgres_context import PostgresSummaryStore

        return PostgresSummaryStore(self._pool)

    async def start(self, *, exact_cache: bool, semantic_cache: bool) -> None:
        storage = self.settings.storage
        if self.postgres:
            from psycopg_pool import AsyncConnectionPool

            from thrifty.stores import postgres

            conn = postgres.connect(storage.url)
            try:
                postgres.migrate(conn)
            finally:
                conn.close()
            self._pool = AsyncConnectionPool(
                postgres.conninfo(storage.url),
                min_size=1,
                max_size=storage.pool_size,
                open=False,
                kwargs={"autocommit": True},
                # After a database restart the pooled connections are dead: test each one lent out.
                check=AsyncConnectionPool.check_connection,
            )
            try:
                await self._pool.open(wait=True, timeout=10)
            except Exception as err:
                await self._pool.close(timeout=1.0)
                raise postgres.unreachable(storage.url, err) from err
            self._key_directory = postgres.PostgresKeyDirectory(self._pool, storage.key_refresh_s)
            await self._key_directory.start()
            self.keys = self._key_directory
            self.alert_store = postgres.PostgresAlertStore(self._pool)
            if exact_cache:
                self.exact_remote = postgres.PostgresExactCache(self._pool)
            if semantic_cache:
                from thrifty.stores.postgres_semantic import PostgresSemanticStore
                from thrifty.stores.postgres_semantic_hits import PostgresHitLog
                from thrifty.stores.postgres_semantic_state import PostgresPartitionStateStore

                self.semantic_remote = PostgresSemanticStore(self._pool, storage.url)
                self.semantic_states = PostgresPartitionStateStore(self._pool)
                self.semantic_hits = PostgresHitLog(self._pool)
        else:
            self._db = open_database(storage.sqlite_path, synchronous=storage.synchronous)
            self.keys = SqliteKeyStore(self._db)
            self.alert_store = SqliteAlertStore(self._db)
        if (exact_cache or semantic_cache) and not self.postgres:
            self.cache_db = open_database(storage.sqlite_path, synchronous=storage.synchronous)
            self.cache_db.execute("PRAGMA busy_timeout=0")  # never wait for a lock on the loop
            self.cache_writer = SqliteWriteBehind(storage.sqlite_path, synchronous=storage.synchronous)
            self.cache_writer.start()
            if exact_cache:
                self.exact_local = SqliteExactCache(self.cache_db, self.cache_writer)
        self.ledger.start(asyncio.get_running_loop())
        self._folder = asyncio.ensure_future(self._fold_periodically(self.settings.dashboard.fold_interval_s))

    async def _fold_periodically(self, interval_s: float) -> None:
        """Fold the ledger rows past the rollups' watermark now (a restart catches up on what a
        killed process left), then whenever enough wait or the last fold is old, on a thread."""
        dashboard = self.settings.dashboard
        last = float("-inf")
        while True:
            now = time.monotonic()
            min_rows = 0 if now - last >= dashboard.fold_max_age_s else dashboard.fold_min_rows
            try:
                if await self.reporting.fold(min_rows) or min_rows == 0:
                    last = now
            except Exception as err:  # noqa: BLE001 - readers stay exact (the tail); try next time
                log.warning("rollups not folded this time: %s", err)
            await asyncio.sleep(interval_s)

    def reader(self) -> LedgerReader:
        """What the ledger holds, for the budget rebuild (sync; start-up only)."""
        if self.postgres:
            from thrifty.stores.postgres import PostgresLedgerReader

            return PostgresLedgerReader(self.settings.storage.url)
        assert self._db is not None
        return _Borrowed(SqliteLedgerReader(self._db))

    async def rebuild_budgets(self, plan: BudgetPlan, now: float) -> None:
        """Counters from this month's ledger: into the in-process book, and into Redis once per
        window across replicas (its lock and marker); never added twice."""
        month_start = window_bounds(now, "month")[0]
        reader = self.reader()
        try:
            totals = spend_totals(reader.spend_rows(month_start), plan, now)
        finally:
            reader.close()
        self.budget_book.load(totals)
        if self.shared_budgets is None:
            return
        try:
            await self._rebuild_shared(month_start, totals)
        except SharedStateUnavailable as err:
            log.error(
                "budget counters not rebuilt in Redis yet (%s); retrying in the background", err.message
            )
            task = asyncio.ensure_future(self._rebuild_shared_later(month_start, totals))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _rebuild_shared(self, month_start: float, totals: dict[CounterKey, Decimal]) -> None:
        assert self.shared_budgets is not None

        async def load() -> dict[CounterKey, Decimal]:
            return totals

        if await self.shared_budgets.rebuild_once(month_start, load):
            log.info("budget counters rebuilt in Redis from the ledger (%d counters)", len(totals))

    async def _rebuild_shared_later(self, month_start: float, totals: dict[CounterKey, Decimal]) -> None:
        while True:
            await asyncio.sleep(_REBUILD_RETRY_S)
            try:
                await self._rebuild_shared(month_start, totals)
                return
            except SharedStateUnavailable:
                continue

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._folder is not None:
            self._folder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folder  # a fold in progress finishes its transaction on its thread
            self._folder = None
        await self.reporting.aclose()
        if self.postgres:
            await self.ledger.aclose()
        else:
            self.ledger.close()
        if self._key_directory is not None:
            await self._key_directory.close()
        if self._pool is not None:
            await self._pool.close(timeout=1.0)
            self._pool = None
        if self.breaker_board is not None:
            await self.breaker_board.close()
        if self.redis is not None:
            await self.redis.close()
        if self.cache_writer is not None:
            self.cache_writer.close()
            self.cache_writer = None
        if self.cache_db is not None:
            self.cache_db.close()
            self.cache_db = None
        if self._db is not None:
            self._db.close()
            self._db = None


class _Borrowed:
    """A reader over the gateway's own connection: closing it leaves the connection open."""

    def __init__(self, reader: SqliteLedgerReader) -> None:
        self._reader = reader

    def report_rows(
        self, column: str, since: float | None, until: float | None = None, tenant: str | None = None
    ) -> Any:
        return self._reader.report_rows(column, since, until, tenant)

    def spend_rows(self, since: float) -> Any:
        return self._reader.spend_rows(since)

    def usage_rows(self, since: float, until: float, feature: str | None = None) -> Any:
        return self._reader.usage_rows(since, until, feature)

    def alerts_since(self, since: float) -> Any:
        return self._reader.alerts_since(since)

    def route_requests(self, route: str, since: float, prompt_version: str | None = None) -> int:
        return self._reader.route_requests(route, since, prompt_version)

    def costs(self, request_ids: Sequence[str]) -> dict[str, str | None]:
        return self._reader.costs(request_ids)

    def close(self) -> None:
        pass


def open_reader(settings: Settings, *, existing: bool = False) -> LedgerReader:
    """A reader for the CLI (`thrifty report`, `thrifty alerts`, `prompt lint`), whichever backend
    holds the ledger; `existing`: a SQLite file that is not there is an error, not a new ledger."""
    if settings.storage.backend == "postgresql":
        from thrifty.stores.postgres import PostgresLedgerReader

        return PostgresLedgerReader(settings.storage.url)
    path = settings.storage.sqlite_path
    if existing and not path.exists():
        raise ThriftyError(f"no ledger at {path}")
    return SqliteLedgerReader(open_database(path))


def open_experiment_store(settings: Settings, *, existing: bool = False) -> ExperimentStore:
    """Feedback, arms, the action log and release plans: in the SQLite file, or shared by the
    replicas and the CLI in PostgreSQL. `existing`: a SQLite file that is not there is an error
    (a status read), not a new ledger (a first release may start before the gateway ever ran)."""
    storage = settings.storage
    if storage.backend == "postgresql":
        from thrifty.experiments.postgres_store import PostgresExperimentStore

        return PostgresExperimentStore(storage.url)
    from thrifty.experiments.sqlite_store import SqliteExperimentStore

    path = storage.sqlite_path
    if existing and not path.exists():
        raise ThriftyError(f"no ledger at {path}")
    return SqliteExperimentStore(path, synchronous=storage.synchronous)


def open_batch_store(settings: Settings) -> BatchStore:
    """The batch jobs and queue: in the SQLite file, or shared by the replicas in PostgreSQL."""
    storage = settings.storage
    if storage.backend == "postgresql":
        from thrifty.batch.postgres_store import PostgresBatchStore

        return PostgresBatchStore(storage.url)
    from thrifty.batch.sqlite_store import SqliteBatchStore

    return SqliteBatchStore(storage.sqlite_path, synchronous=storage.synchronous)


def purge_caches(
    storage: StorageSettings, scope: dict[str, str | None], expired_before: float | None
) -> tuple[int, int]:
    """`thrifty cache purge`: (exact, semantic) entries removed by scope from wherever they live.
    A running gateway stops serving them at once: a hit is read back from the store first."""
    if storage.backend == "postgresql":
        from thrifty.stores import postgres

        conn = postgres.connect(storage.url)
        try:
            postgres.migrate(conn)
            return (
                postgres.purge_cache(conn, "exact_cache", scope, expired_before),
                postgres.purge_cache(conn, "semantic_cache", scope, expired_before),
            )
        finally:
            conn.close()
    from thrifty.cache.semantic.store import SqliteSemanticStore

    conn = open_database(storage.sqlite_path)
    try:
        expired_only = expired_before is not None
        return (
            SqliteExactCache(conn).purge(**scope, expired_only=expired_only),
            SqliteSemanticStore(conn).purge(**scope, expired_before=expired_before),
        )
    finally:
        conn.close()


def open_key_store(settings: Settings) -> tuple[Any, Any]:
    """(key store, connection to close) for `thrifty keys`."""
    if settings.storage.backend == "postgresql":
        from thrifty.stores import postgres

        conn = postgres.connect(settings.storage.url)
        postgres.migrate(conn)
        return postgres.PostgresKeys(conn), conn
    conn = open_database(settings.storage.sqlite_path)
    return SqliteKeyStore(conn), conn


__all__ = [
    "Stores",
    "open_batch_store",
    "open_experiment_store",
    "open_key_store",
    "open_reader",
    "purge_caches",
]
