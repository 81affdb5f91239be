"""The ledger: one append-only row per logical request, written by group commit.

Requests hand their entry to `LedgerWriter.submit` and await the returned future before the
last byte of their response goes out; so a response the client has received is always already
committed, and killing the process cannot lose it. No request writes on its own: every entry
submitted during one turn of the event loop is inserted in one transaction, and all their
futures are resolved at once.

Where the commit runs depends on what it costs. With `synchronous: normal` (the default) a WAL
commit is one write() of a few pages, ~10 us of CPU per row in batches: it runs on the event
loop, scheduled after the current turn, which measured faster than handing rows to a thread
(the thread round trip alone added ~0.25 ms per request). If another process holds the write
lock, the batch is retried a few milliseconds later instead of blocking the loop. With
`synchronous: full` every commit waits for an fsync, so it runs on a writer thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry, decimal_text

log = logging.getLogger(__name__)

_COLUMNS = (
    "request_id, ts, tenant_id, user, feature, route, prompt_version, model, provider, attempts, "
    "input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, "
    "usage_estimated, cost_usd, saved_usd, cache, escalated, retries, retry_cost_usd, status, "
    "http_status, error, latency_ms, ttft_ms, idempotency_key, batch, stream, context, variant"
)
_N_COLUMNS = len(_COLUMNS.split(","))
INSERT_ENTRY_SQL = f"INSERT OR IGNORE INTO ledger ({_COLUMNS}) VALUES ({', '.join('?' * _N_COLUMNS)})"
_STOP = object()
# Called with the rows of each committed batch (metrics, traces): off the requests' path.
BatchObserver = Callable[[list[tuple[Any, ...]]], None]
_BUSY_RETRY_S = 0.005
_BUSY_GIVE_UP_S = 30.0


def entry_row(entry: LedgerEntry) -> tuple[Any, ...]:
    u = entry.usage
    retry_cost = None
    if entry.retries:
        failed = [a.cost_usd for a in entry.attempts[:-1] if a.status != 200 and a.cost_usd is not None]
        retry_cost = decimal_text(sum(failed, Decimal(0))) if failed else None
    return (
        entry.request_id,
        entry.ts,
        entry.tenant_id,
        entry.user,
        entry.feature,
        entry.route,
        entry.prompt_version,
        entry.model,
        entry.provider,
        orjson.dumps([a.to_json() for a in entry.attempts]).decode(),
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        int(u.estimated),
        None if entry.cost_usd is None else decimal_text(entry.cost_usd),
        None if entry.saved_usd is None else decimal_text(entry.saved_usd),
        entry.cache,
        int(entry.escalated),
        entry.retries,
        retry_cost,
        entry.status,
        entry.http_status,
        entry.error,
        round(entry.latency_ms, 3),
        None if entry.ttft_ms is None else round(entry.ttft_ms, 3),
        entry.idempotency_key,
        int(entry.batch),
        int(entry.stream),
        None if entry.context is None else orjson.dumps(entry.context).decode(),
        entry.variant,
    )


class LedgerWriter:
    def __init__(self, path: Path, *, synchronous: str = "normal", batch_max: int = 512) -> None:
        self._path = path
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._threaded = synchronous == "full"
        self._loop: asyncio.AbstractEventLoop | None = None
        # In-loop mode
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._busy_since: float | None = None
        # Thread mode
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._observers: list[BatchObserver] = []

    def observe(self, observer: BatchObserver) -> None:
        """Call `observer` with every committed batch's rows (on the loop, or the writer thread)."""
        self._observers.append(observer)

    @property
    def pending(self) -> int:
        """Entries submitted and not yet committed (a queue depth for /metrics)."""
        return len(self._pending) + self._queue.qsize()

    def _notify(self, rows: list[tuple[Any, ...]]) -> None:
        for observer in self._observers:
            try:
                observer(rows)
            except Exception:
                log.exception("a ledger batch observer failed; the batch itself is committed")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self._threaded:
            self._conn = _open_for_writing(self._path, self._synchronous)
            # Never wait for another process's lock on the loop; _flush retries later instead.
            self._conn.execute("PRAGMA busy_timeout=0")
            return
        self._thread = threading.Thread(target=self._run, name="thrifty-ledger", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def submit(self, entry: LedgerEntry) -> asyncio.Future[None]:
        """Queue an entry; the future completes once it is committed. Call from the loop thread."""
        assert self._loop is not None, "LedgerWriter.start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        item = (entry_row(entry), future)
        if self._threaded:
            self._queue.put(item)
        else:
            self._pending.append(item)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        return future

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._pending:
                self._conn.execute("PRAGMA busy_timeout=30000")  # shutting down: waiting is fine now
                batch, self._pending = self._pending, []
                self._commit_or_spill(self._conn, [row for row, _ in batch])
                _resolve_all([future for _, future in batch])
            self._conn.close()
            self._conn = None

    # -- in-loop group commit ----------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        conn = self._conn
        assert conn is not None and self._loop is not None
        batch, self._pending = self._pending, []
        rows = [row for row, _ in batch]
        try:
            committed = _commit(conn, rows)
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                raise
            now = time.monotonic()
            self._busy_since = self._busy_since or now
            if now - self._busy_since < _BUSY_GIVE_UP_S:
                self._pending[:0] = batch
                self._flush_handle = self._loop.call_later(_BUSY_RETRY_S, self._flush)
                return
            self._spill(rows, err)
            committed = []
        self._busy_since = None
        _resolve_all([future for _, future in batch])
        if self._observers and committed:
            # After the responses: their tasks were woken first, so metrics and traces are built
            # once they have been sent, not while the requests wait.
            self._loop.call_soon(self._notify, committed)

    # -- writer thread (synchronous: full) -----------------------------------------------------

    def _run(self) -> None:
        try:
            conn = _open_for_writing(self._path, self._synchronous)
        except (sqlite3.Error, OSError) as err:
            self._start_error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < self._batch_max:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in batch:
                    stopping = True
                    batch = [item for item in batch if item is not _STOP]
                    # Drain whatever arrived before the stop so nothing queued is lost.
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not _STOP:
                            batch.append(item)
                if batch:
                    self._commit_or_spill(conn, [row for row, _ in batch])
                    assert self._loop is not None
                    if not self._loop.is_closed():
                        self._loop.call_soon_threadsafe(_resolve_all, [future for _, future in batch])
        finally:
            conn.close()

    def _commit_or_spill(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Commit, retrying transient errors (busy_timeout already waits for locks); else spill."""
        error: sqlite3.Error | None = None
        for attempt in range(3):
            try:
                committed = _commit(conn, rows)
                if self._observers and committed:
                    self._notify(committed)
                return
            except sqlite3.Error as err:
                error = err
                time.sleep(0.01 * (attempt + 1))
        assert error is not None
        self._spill(rows, error)

    @property
    def _spill_path(self) -> Path:
        return self._path.with_suffix(self._path.suffix + ".spill.jsonl")

    def _spill(self, rows: list[tuple[Any, ...]], error: BaseException) -> None:
        """Last resort when the database refuses writes: keep the rows in an fsynced JSONL file."""
        log.error("ledger write failed (%s); %d entries spilled to %s", error, len(rows), self._spill_path)
        names = [c.strip() for c in _COLUMNS.split(",")]
        with self._spill_path.open("ab") as fh:
            for row in rows:
                fh.write(orjson.dumps(dict(zip(names, row, strict=True))) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())


def _open_for_writing(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = open_database(path, synchronous=synchronous)
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: index pages stay hot as the ledger grows
    return conn


def _commit(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Insert the batch in one transaction; return the rows inserted (the rollups fold them later,
    see stores/rollups.py)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # executemany, measured: ~10 us of CPU per row in batches of 16+, half of what one
        # JSON-batch statement costs (json_each re-parses the batch for every column).
        before = conn.total_changes
        conn.executemany(INSERT_ENTRY_SQL, rows)
        if conn.total_changes - before != len(rows):
            # Some ids were already there (INSERT OR IGNORE): observers see only the rows inserted now.
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            rows = [row for row in rows if conn.execute(INSERT_ENTRY_SQL, row).rowcount == 1]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return rows


def _is_busy(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        "locked" in str(err) or "busy" in str(err)
    )


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
