"""Where recordings live: the `recordings` table of the SQLite file or of PostgreSQL.

Writes go through one background thread (a recording is never on a request's path: the response
does not wait for it), in batches; `close()` writes what is queued. Reads are per tenant.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from thrifty.settings import Settings

log = logging.getLogger(__name__)

COLUMNS = (
    "request_id",
    "ts",
    "tenant_id",
    "route",
    "feature",
    "prompt_version",
    "user",
    "idempotency_key",
    "task",
    "model",
    "cache",
    "request",
    "response",
    "outcome",
    "error",
)
# How the recorded request ended: answered (`response` is the answer), deferred to a batch
# (`response` is the batch's answer when it came; `error` when the item failed or expired), or
# failed (`error`: {type, code, status, message}: an upstream error, a budget refusal, ...).
OUTCOMES = ("ok", "deferred", "error")


@dataclass(frozen=True, slots=True)
class Recording:
    """One recorded request and its answer, redacted as the route said before it was stored."""

    request_id: str
    ts: float
    tenant_id: str
    route: str
    feature: str | None
    prompt_version: str | None
    user: str | None
    idempotency_key: str | None
    task: str | None
    model: str | None  # the upstream model that answered
    cache: str  # miss | exact | semantic | dedup: how the gateway answered it
    request: dict[str, Any]
    response: dict[str, Any] | None  # None: the request failed, or its batch answer never came
    outcome: str = "ok"  # one of OUTCOMES
    error: dict[str, Any] | None = None  # {type, code, status, message} of a failed request

    def row(self) -> tuple[Any, ...]:
        values = [getattr(self, c) for c in COLUMNS[:-4]]
        return (
            *values,
            orjson.dumps(self.request).decode(),
            orjson.dumps(self.response).decode(),  # 'null' for none (the column predates outcomes)
            self.outcome,
            None if self.error is None else orjson.dumps(self.error).decode(),
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Recording:
        rid, ts, tenant, route, feature, version, user, key, task, model, cache, request, response = row[:13]
        outcome, error = row[13:15]
        return cls(
            rid, ts, tenant, route, feature, version, user, key, task, model, cache,
            request=orjson.loads(request),
            response=orjson.loads(response),
            outcome=outcome,
            error=None if error is None else orjson.loads(error),
        )  # fmt: skip

    def traffic_line(self) -> dict[str, Any]:
        """The line of the traffic format (`thrifty.simulate.traffic`) for this recording."""
        line: dict[str, Any] = {"ts": self.ts, "tenant": self.tenant_id, "route": self.route}
        for key in ("feature", "prompt_version", "user", "idempotency_key", "task", "model"):
            value = getattr(self, key)
            if value is not None:
                line[key] = value
        line.update(request_id=self.request_id, cache=self.cache, request=self.request)
        if self.response is not None:
            line["response"] = self.response
        if self.outcome != "ok":
            line["outcome"] = self.outcome
        if self.error is not None:
            line["error"] = self.error
        return line


# A deferred request's answer (or error) when its batch ends: (request_id, response JSON, error JSON).
ResultRow = tuple[str, str, str | None]
_SET_RESULT = "UPDATE recordings SET response = ?, error = ? WHERE request_id = ? AND outcome = 'deferred'"


class RecordingSink(Protocol):
    def write(self, rows: list[tuple[Any, ...]], results: list[ResultRow]) -> None: ...
    def close(self) -> None: ...


class SqliteRecordingSink:
    def __init__(self, path: Path, synchronous: str = "normal") -> None:
        self._path, self._synchronous = path, synchronous
        self._conn: sqlite3.Connection | None = None

    def write(self, rows: list[tuple[Any, ...]], results: list[ResultRow]) -> None:
        if self._conn is None:  # opened in the writer thread, used only there
            from thrifty.stores.sqlite_db import open_database

            self._conn = open_database(self._path, synchronous=self._synchronous)
        marks = ", ".join("?" * len(COLUMNS))
        with self._conn:
            self._conn.execute("BEGIN")
            if rows:
                self._conn.executemany(
                    f"INSERT OR IGNORE INTO recordings ({', '.join(COLUMNS)}) VALUES ({marks})", rows
                )
            if results:
                self._conn.executemany(_SET_RESULT, [(resp, err, rid) for rid, resp, err in results])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresRecordingSink:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Any = None

    def write(self, rows: list[tuple[Any, ...]], results: list[ResultRow]) -> None:
        from thrifty.stores.postgres import connect

        if self._conn is None:
            self._conn = connect(self._url)
        cols = ", ".join('"user"' if c == "user" else c for c in COLUMNS)
        marks = ", ".join(["%s"] * len(COLUMNS))
        with self._conn.transaction(), self._conn.cursor() as cur:
            if rows:
                cur.executemany(
                    f"INSERT INTO recordings ({cols}) VALUES ({marks}) ON CONFLICT (request_id) DO NOTHING",
                    rows,
                )
            if results:
                cur.executemany(
                    _SET_RESULT.replace("?", "%s"), [(resp, err, rid) for rid, resp, err in results]
                )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def open_sink(settings: Settings) -> RecordingSink:
    if settings.storage.backend == "postgresql":
        return PostgresRecordingSink(settings.storage.url)
    return SqliteRecordingSink(settings.storage.sqlite_path, settings.storage.synchronous)


class RecordingWriter:
    """One thread, one connection, batches of whatever is queued."""

    def __init__(self, sink: RecordingSink, batch_max: int = 256, max_queued: int = 10_000) -> None:
        self._sink = sink
        self._batch_max = batch_max
        # Bounded: a store slower than the traffic drops recordings (counted), it never grows memory.
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(max_queued)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failed = 0
        self.dropped = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="thrifty-recordings", daemon=True)
            self._thread.start()

    def submit(self, recording: Recording) -> None:
        self._put(("row", recording.row()))

    def submit_result(
        self, request_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
    ) -> None:
        """A deferred recording's answer, or its error, once its batch has ended (a request
        that was not recorded, e.g. sampled out, is left alone)."""
        self._put(
            (
                "result",
                (
                    request_id,
                    orjson.dumps(response).decode(),
                    None if error is None else orjson.dumps(error).decode(),
                ),
            )
        )

    def _put(self, op: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("recordings: the store is behind; %d recordings dropped so far", self.dropped)

    def _run(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            batch = []
            if first is None:
                done = True
            else:
                batch.append(first)
            while len(batch) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            if batch:
                rows = [value for kind, value in batch if kind == "row"]
                results = [value for kind, value in batch if kind == "result"]
                try:
                    self._sink.write(rows, results)
                    self.written += len(batch)
                except Exception:  # a recording is never worth failing the gateway for
                    self.failed += len(batch)
                    log.exception("writing %d recordings failed; they are dropped", len(batch))
        self._sink.close()

    def close(self) -> None:
        """Write what is queued, then stop (blocking: call it off the event loop)."""
        if self._thread is not None:
            self._queue.put(None)  # blocks while the queue is full: everything before it is written
            self._thread.join()
            self._thread = None


def read_recordings(
    settings: Settings,
    tenant: str,
    *,
    route: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
) -> Iterator[Recording]:
    """A tenant's recordings in time order (one tenant only: there is no way to ask for several)."""
    clauses, params = ["tenant_id = ?"], [tenant]
    for clause, value in (("route = ?", route), ("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)  # type: ignore[arg-type]
    tail = " LIMIT ?" if limit is not None else ""
    if limit is not None:
        params.append(limit)  # type: ignore[arg-type]
    if settings.storage.backend == "postgresql":
        from thrifty.stores.postgres import connect

        cols = ", ".join('"user"' if c == "user" else c for c in COLUMNS)
        sql = f"SELECT {cols} FROM recordings WHERE {' AND '.join(clauses)} ORDER BY ts, request_id{tail}"
        conn = connect(settings.storage.url)
        try:
            for row in conn.execute(sql.replace("?", "%s"), params):
                yield Recording.from_row(tuple(row))
        finally:
            conn.close()
        return
    from thrifty.stores.sqlite_db import open_database

    path = settings.storage.sqlite_path
    if not path.exists():
        return
    conn = open_database(path)
    try:
        where = " AND ".join(clauses)
        sql = f"SELECT {', '.join(COLUMNS)} FROM recordings WHERE {where} ORDER BY ts, request_id{tail}"
        for row in conn.execute(sql, params):
            yield Recording.from_row(row)
    finally:
        conn.close()


__all__ = ["OUTCOMES", "Recording", "RecordingWriter", "open_sink", "read_recordings"]
