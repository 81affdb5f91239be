"""Optional SQLite writes (cache entries) off the event loop, on one thread that may wait for the lock.

The loop must never wait for SQLite's write lock, and a write that refuses to wait is lost whenever
another writer (the ledger, the rollup fold, recordings) holds it. So such writes are queued here and
a thread with its own connection commits them in batches, waiting for the lock as long as it takes.
Callers that must read their own writes keep them visible until `on_done` says they are committed.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from thrifty.stores.sqlite_db import connect

log = logging.getLogger(__name__)

Write = tuple[str, Sequence[object], Callable[[], None] | None]
_STOP = object()
_BATCH = 256


class SqliteWriteBehind:
    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Write | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> None:
        conn = connect(self._path, synchronous=self._synchronous, check_same_thread=False)
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="thrifty-cache-writer", daemon=True
        )
        self._thread.start()

    def submit(self, sql: str, params: Sequence[object], on_done: Callable[[], None] | None = None) -> None:
        self._queue.put((sql, params, on_done))

    def close(self) -> None:
        """Commit what is queued, then stop (a clean shutdown loses no entry)."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            stopping = False
            while not stopping:
                batch: list[Write] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                    if len(batch) >= _BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._commit(conn, batch)
        finally:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[Write]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout (30 s) waits for the other writers
            for sql, params, _ in batch:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # A cache entry is an optimisation: dropped with a warning, the request already succeeded.
            log.warning("%d cache entries not stored: %s", len(batch), err)
        for _, _, on_done in batch:
            if on_done is not None:
                on_done()


__all__ = ["SqliteWriteBehind"]
