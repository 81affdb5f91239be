"""The batch store in the gateway's SQLite file (migration 11).

Every state change of an item and its ledger row are one transaction: an item ends once, and
its ledger row is written once, whatever crashes or restarts happen around it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from thrifty.batch.flush import QueueGroup
from thrifty.batch.rows import (
    ITEM_COLUMNS,
    JOB_COLUMNS,
    OPEN_STATES,
    dump_json,
    item_record,
    job_record,
    job_row,
    new_item_row,
    upstream_record,
)
from thrifty.batch.states import STATUS_TIME
from thrifty.batch.store import FileRecord, Item, ItemResult, JobRecord, NewItem, UpstreamBatch
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry

_OPEN = OPEN_STATES


class SqliteBatchStore:
    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = open_database(path, synchronous=synchronous)

    def close(self) -> None:
        self._conn.close()

    # -- files ------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> FileRecord:
        self._conn.execute(
            "INSERT INTO batch_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.file_id,
                record.tenant_id,
                record.purpose,
                record.filename,
                record.bytes,
                record.lines,
                record.sha256,
                record.path,
                record.created_at,
            ),
        )
        return record

    def read_file(self, record: FileRecord) -> Iterator[bytes]:
        with Path(record.path).open("rb") as fh:
            while chunk := fh.read(1 << 16):
                yield chunk

    def get_file(self, tenant_id: str, file_id: str) -> FileRecord | None:
        row = self._conn.execute(
            "SELECT * FROM batch_files WHERE file_id = ? AND tenant_id = ?", (file_id, tenant_id)
        ).fetchone()
        return None if row is None else FileRecord(*row)

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, job: JobRecord, items: Iterable[NewItem] = ()) -> JobRecord:
        values = job_row(job)
        try:
            with self._transaction():
                self._conn.execute(
                    f"INSERT INTO batch_jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 22)})", values
                )
                self._insert_items(items)
        except sqlite3.IntegrityError:
            if job.idempotency_key is None:
                raise
            row = self._conn.execute(
                f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE tenant_id = ? AND idempotency_key = ?",
                (job.tenant_id, job.idempotency_key),
            ).fetchone()
            return job_record(row)
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        return None if row is None else job_record(row)

    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        wanted = tuple(statuses)
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE status IN ({', '.join('?' * len(wanted))}) "
            "ORDER BY created_at",
            wanted,
        )
        return [job_record(r) for r in rows]

    def jobs_of_tenant(self, tenant_id: str, limit: int, after: str | None) -> list[JobRecord]:
        """A tenant's file jobs, newest first; `after` is the last id of the previous page."""
        before = float("inf")
        if after is not None:
            found = self.get_job(after)
            before = found.created_at if found is not None else before
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE tenant_id = ? AND kind = 'file' AND created_at < ? "
            "ORDER BY created_at DESC LIMIT ?",
            (tenant_id, before, limit),
        )
        return [job_record(r) for r in rows]

    def jobs_for_sha256(self, tenant_id: str, sha256: str) -> list[JobRecord]:
        rows = self._conn.execute(
            f"SELECT {', '.join('j.' + c.strip() for c in JOB_COLUMNS.split(','))} FROM batch_jobs j "
            "JOIN batch_files f ON f.file_id = j.input_file_id "
            "WHERE f.tenant_id = ? AND f.sha256 = ? ORDER BY j.created_at",
            (tenant_id, sha256),
        )
        return [job_record(r) for r in rows]

    def lease(self, job_id: str, owner: str, now: float, seconds: float) -> bool:
        """Take (or extend) the job's validation lease: one process validates a job at a time;
        a lease left by a crashed process runs out and another resumes the job."""
        cursor = self._conn.execute(
            "UPDATE batch_jobs SET lease_owner = ?, lease_until = ? WHERE job_id = ? "
            "AND status = 'validating' AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
            (owner, now + seconds, job_id, owner, now),
        )
        return cursor.rowcount == 1

    def set_job_status(
        self, job_id: str, status: str, ts: float, errors: list[dict[str, Any]] | None = None
    ) -> None:
        column = STATUS_TIME.get(status)
        sets = "status = ?" + (f", {column} = COALESCE({column}, ?)" if column else "")
        params: list[Any] = [status] + ([ts] if column else [])
        if errors is not None:
            sets += ", errors = ?"
            params.append(dump_json(errors))
        self._conn.execute(f"UPDATE batch_jobs SET {sets} WHERE job_id = ?", (*params, job_id))

    # -- items ------------------------------------------------------------------------------

    def add_items(self, items: Iterable[NewItem], entries: Iterable[LedgerEntry] = ()) -> None:
        """New items, and in the same transaction the ledger rows of the lines refused already."""
        with self._transaction():
            self._insert_items(items)
            self._insert_ledger(entry_row(e) for e in entries)

    def _insert_items(self, items: Iterable[NewItem]) -> None:
        rows = (new_item_row(i) for i in items)
        self._conn.executemany(
            "INSERT INTO batch_items (request_id, job_id, line_no, custom_id, state, queue, model, route, "
            "provider, body, reserve_usd, reserve_tokens, flush_at, flush_size, error, created_at, "
            "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def validated_so_far(self, job_id: str) -> tuple[int, set[str]]:
        """The last input line stored for a job, and the custom_ids seen up to it."""
        last = self._conn.execute(
            "SELECT MAX(line_no) FROM batch_items WHERE job_id = ?", (job_id,)
        ).fetchone()
        if last is None or last[0] is None:
            return 0, set()
        rows = self._conn.execute("SELECT custom_id FROM batch_items WHERE job_id = ?", (job_id,))
        return int(last[0]), {r[0] for r in rows}

    def item_counts(self, job_id: str) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT state, COUNT(*) FROM batch_items WHERE job_id = ? GROUP BY state", (job_id,)
        )
        return {state: n for state, n in rows}

    def items_of_job(self, job_id: str) -> Iterator[Item]:
        cursor = self._conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE job_id = ? ORDER BY line_no", (job_id,)
        )
        while rows := cursor.fetchmany(500):
            for row in rows:
                yield item_record(row)

    def queued_items(self, job_id: str) -> list[Item]:
        rows = self._conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE job_id = ? AND state = 'queued'", (job_id,)
        )
        return [item_record(r) for r in rows]

    def queued_past_window(self, now: float, limit: int = 500) -> list[Item]:
        """Queued items whose job's window has passed (the provider was unreachable that long)."""
        columns = ", ".join("i." + c.strip() for c in ITEM_COLUMNS.split(","))
        rows = self._conn.execute(
            f"SELECT {columns} FROM batch_items i JOIN batch_jobs j ON j.job_id = i.job_id "
            "WHERE i.state = 'queued' AND j.expires_at < ? LIMIT ?",
            (now, limit),
        )
        return [item_record(r) for r in rows]

    def open_items(self) -> list[Item]:
        rows = self._conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE state IN ({', '.join('?' * len(_OPEN))})", _OPEN
        )
        return [item_record(r) for r in rows]

    def open_item_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(_OPEN, 0)
        for state in _OPEN:  # one count of the state index each
            (counts[state],) = self._conn.execute(
                "SELECT COUNT(*) FROM batch_items WHERE state = ?", (state,)
            ).fetchone()
        return counts

    def queue_groups(self) -> list[QueueGroup]:
        rows = self._conn.execute(
            "SELECT provider, model, queue, COUNT(*), MIN(flush_at), MIN(flush_size) FROM batch_items "
            "WHERE state = 'queued' GROUP BY provider, model, queue"
        )
        return [QueueGroup(*r) for r in rows]

    def claim(
        self, group: QueueGroup, limit: int, upstream_id: str, now: float, owner: str = "", lease_s: float = 0
    ) -> int:
        """Move up to `limit` queued items into a new provider batch (not yet sent); how many.
        The write lock (BEGIN IMMEDIATE) keeps another process from claiming the same items."""
        with self._transaction():
            ids = self._conn.execute(
                "SELECT request_id FROM batch_items WHERE state = 'queued' AND provider = ? "
                "AND model = ? AND queue = ? ORDER BY created_at, line_no LIMIT ?",
                (group.provider, group.model, group.queue, limit),
            ).fetchall()
            if not ids:
                return 0
            self._conn.execute(
                "INSERT INTO batch_upstream (upstream_id, provider, model, state, items, created_at, "
                "next_poll_at, lease_owner, lease_until) VALUES (?, ?, ?, 'preparing', ?, ?, ?, ?, ?)",
                (upstream_id, group.provider, group.model, len(ids), now, now, owner or None, now + lease_s),
            )
            self._conn.executemany(
                "UPDATE batch_items SET state = 'submitted', upstream_id = ? WHERE request_id = ?",
                ((upstream_id, r[0]) for r in ids),
            )
        return len(ids)

    def lease_upstream(self, upstream_id: str, owner: str, now: float, seconds: float) -> bool:
        cursor = self._conn.execute(
            "UPDATE batch_upstream SET lease_owner = ?, lease_until = ? WHERE upstream_id = ? "
            "AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
            (owner, now + seconds, upstream_id, owner, now),
        )
        return cursor.rowcount == 1

    def lease_delivery(self, job_id: str, owner: str, now: float, seconds: float) -> bool:
        cursor = self._conn.execute(
            "UPDATE batch_jobs SET lease_owner = ?, lease_until = ? WHERE job_id = ? "
            "AND delivered_at IS NULL AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
            (owner, now + seconds, job_id, owner, now),
        )
        return cursor.rowcount == 1

    def mark_submitted(
        self, upstream_id: str, remote_id: str, next_poll_at: float, adopted: bool = False
    ) -> None:
        self._conn.execute(
            "UPDATE batch_upstream SET remote_id = ?, state = 'submitted', submitted_at = ?, "
            "next_poll_at = ?, adopted = ? WHERE upstream_id = ?",
            (remote_id, time.time(), next_poll_at, int(adopted), upstream_id),
        )

    def remote_ids(self, provider: str) -> set[str]:
        rows = self._conn.execute(
            "SELECT remote_id FROM batch_upstream WHERE provider = ? AND remote_id IS NOT NULL", (provider,)
        )
        return {r[0] for r in rows}

    def requeue_unsent(self, upstream_id: str) -> None:
        with self._transaction():
            self._conn.execute(
                "UPDATE batch_items SET state = 'queued', upstream_id = NULL "
                "WHERE upstream_id = ? AND state = 'submitted'",
                (upstream_id,),
            )
            self._conn.execute("DELETE FROM batch_upstream WHERE upstream_id = ?", (upstream_id,))

    def upstream_batches(self, states: Iterable[str]) -> list[UpstreamBatch]:
        wanted = tuple(states)
        rows = self._conn.execute(
            "SELECT upstream_id, provider, model, remote_id, state, items, next_poll_at, created_at, adopted "
            f"FROM batch_upstream WHERE state IN ({', '.join('?' * len(wanted))}) ORDER BY created_at",
            wanted,
        )
        return [upstream_record(r) for r in rows]

    def items_of_upstream(self, upstream_id: str, state: str | None = None) -> Iterator[Item]:
        """The batch's items a page at a time (keyset paging: safe while results are recorded)."""
        after = ""
        where = "upstream_id = ? AND request_id > ?" + (" AND state = ?" if state else "")
        while True:
            params: tuple[Any, ...] = (upstream_id, after, state) if state else (upstream_id, after)
            rows = self._conn.execute(
                f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE {where} ORDER BY request_id LIMIT 500", params
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield item_record(row)
            after = rows[-1][0]

    def get_items(self, request_ids: Iterable[str]) -> dict[str, Item]:
        wanted = tuple(request_ids)
        if not wanted:
            return {}
        rows = self._conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE request_id IN ({', '.join('?' * len(wanted))})",
            wanted,
        )
        return {row[0]: item_record(row) for row in rows}

    def poll_later(self, upstream_id: str, next_poll_at: float, remote_status: str) -> None:
        self._conn.execute(
            "UPDATE batch_upstream SET next_poll_at = ?, remote_status = ? WHERE upstream_id = ?",
            (next_poll_at, remote_status, upstream_id),
        )

    def finish_upstream(self, upstream_id: str, remote_status: str, ts: float) -> None:
        self._conn.execute(
            "UPDATE batch_upstream SET state = 'collected', remote_status = ?, collected_at = ? "
            "WHERE upstream_id = ?",
            (remote_status, ts, upstream_id),
        )

    def record_results(self, results: Iterable[ItemResult], ts: float) -> list[str]:
        recorded: list[str] = []
        rows: list[tuple[Any, ...]] = []
        with self._transaction():
            for r in results:
                cursor = self._conn.execute(
                    "UPDATE batch_items SET state = ?, status_code = ?, response = ?, error = ?, "
                    f"finished_at = ? WHERE request_id = ? AND state IN ({', '.join('?' * len(_OPEN))})",
                    (
                        r.state,
                        r.status_code,
                        dump_json(r.response),
                        dump_json(r.error),
                        ts,
                        r.request_id,
                        *_OPEN,
                    ),
                )
                if cursor.rowcount == 1:
                    rows.append(entry_row(r.entry))
                    recorded.append(r.request_id)
            self._insert_ledger(rows)
        return recorded

    def _insert_ledger(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Ledger rows: inserted, nothing more (the dashboard's rollups fold every ledger row
        behind their watermark, however it was written)."""
        for row in rows:
            self._conn.execute(INSERT_ENTRY_SQL, row)

    # -- webhooks ---------------------------------------------------------------------------

    def undelivered(self) -> list[JobRecord]:
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE webhook_url IS NOT NULL AND delivered_at IS NULL "
            "AND status IN ('completed', 'failed', 'expired', 'cancelled')"
        )
        return [job_record(r) for r in rows]

    def mark_delivered(self, job_id: str, ts: float | None, error: str | None) -> None:
        self._conn.execute(
            "UPDATE batch_jobs SET delivered_at = ?, delivery_error = ? WHERE job_id = ?", (ts, error, job_id)
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if kind is not None else "COMMIT")
