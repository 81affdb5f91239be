"""The stores a replay runs on: the gateway's own store classes and ports, in memory.

A simulation writes nothing that has to survive it, so nothing it writes per request goes to a
file or through a thread: the idempotency records and the exact and semantic cache entries are
the same SQLite stores (the same SQL, so the same semantics) on an in-memory database used on the
event loop's thread, and the ledger is a port implementation that turns each entry into the
step's per-request outcome as it arrives (the replay needs nothing else of a ledger row). Only the
batch store (used per job, not per request) and the start-up reads stay on the step's scratch file.

Profiled before (10,005 requests, 7 steps: 157 s of CPU, wall time several times that on a loaded
machine): per-request SQLite commits (ledger, idempotency claim and completion, cache entries) and,
for the idempotency store, a worker-thread hand-off per operation that waits for the GIL behind
the other steps' work.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor, Future
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from thrifty.cache.exact import SqliteExactCache
from thrifty.settings import Settings
from thrifty.simulate.outcome import Outcome, context_saved
from thrifty.stores.factory import Stores
from thrifty.stores.idempotency import SqliteIdempotencyStore
from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry

if TYPE_CHECKING:
    from thrifty.gateway import Gateway

T = TypeVar("T")
_MEMORY = Path(":memory:")


def memory_database() -> sqlite3.Connection:
    """A private in-memory database with the project's schema (nothing is committed to disk)."""
    return open_database(_MEMORY)


class InlineIdempotencyStore(SqliteIdempotencyStore):
    """The SQLite idempotency store on a private in-memory database, run on the caller's thread:
    the same statements (claim, completion, expiry, the `max_entries` bound) without a file or a
    thread hop. Only for one process that owns every key, as a replay does."""

    def __init__(self, *, max_entries: int) -> None:
        super().__init__(_MEMORY, max_entries=max_entries)
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._open()
            self._started = True

    async def close(self) -> None:
        self._close_connection()
        self._started = False

    async def _run(self, fn: Callable[[], T]) -> T:
        return fn()


class OutcomeLedger:
    """The ledger port for a replay: every entry becomes its request's `Outcome` as it is
    submitted; the total and row count are kept as the rows would sum in a ledger file."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.total = Decimal(0)
        self.rows = 0
        self.pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def observe(self, observer: Callable[[list[tuple[Any, ...]]], None]) -> None:
        """Nothing observes a replay's rows (tracing and metrics are off in a replay)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def submit(self, entry: LedgerEntry) -> asyncio.Future[None]:
        self.add(entry)
        assert self._loop is not None, "OutcomeLedger.start() was not called"
        done: asyncio.Future[None] = self._loop.create_future()
        done.set_result(None)
        return done

    def add(self, entry: LedgerEntry) -> None:
        if entry.request_id in self.outcomes:  # INSERT OR IGNORE: the first row of an id stands
            return
        self.rows += 1
        if entry.cost_usd is not None:
            self.total += entry.cost_usd
        self.outcomes[entry.request_id] = Outcome(
            cost=entry.cost_usd,
            ok=entry.status == "ok",
            cache=entry.cache,
            model=entry.model,
            escalated=bool(entry.escalated),
            batch=bool(entry.batch),
            error=entry.error,
            context_saved=context_saved(entry.context),
            answer_label=None,
        )

    def close(self) -> None:
        pass


class ReplayStores(Stores):
    """`Stores` as a replay needs them: the per-request ones in memory (see the module doc)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.ledger = OutcomeLedger()
        self.idempotency = InlineIdempotencyStore(max_entries=settings.idempotency.max_entries)

    async def start(self, *, exact_cache: bool, semantic_cache: bool) -> None:
        await super().start(exact_cache=exact_cache, semantic_cache=semantic_cache)
        if self.cache_db is not None:
            self.cache_db.close()
            self.cache_db = memory_database()
            # Cache writes go inline into the memory database (a writer thread writes the file).
            if self.cache_writer is not None:
                self.cache_writer.close()
                self.cache_writer = None
            if exact_cache:
                self.exact_local = SqliteExactCache(self.cache_db)


class InlineExecutor(Executor):
    """Runs what is submitted at once, on the caller's thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to whoever awaits the future
            done.set_exception(err)
        return done


def run_semantic_work_inline(gateway: Gateway) -> None:
    """The semantic cache's worker threads (query embeddings, index graph builds) replaced by
    inline calls, after `gateway.start()`. A replay's embeddings are computed beforehand (a dict
    lookup then), so the thread hop per request was all that was left of them; and a graph build
    finishing at a point in the replay set by the scheduler made results vary from run to run.
    (The stage has no public seam for its executor yet; this is the one place that reaches in.)"""
    stage = gateway.semantic_cache
    pool = getattr(stage, "_pool", None)
    if pool is None:
        return
    pool.shutdown(wait=True)
    stage._pool = InlineExecutor()  # type: ignore[assignment]


__all__ = [
    "InlineExecutor",
    "InlineIdempotencyStore",
    "OutcomeLedger",
    "ReplayStores",
    "memory_database",
    "run_semantic_work_inline",
]
