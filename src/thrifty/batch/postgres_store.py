"""The batch store on PostgreSQL (migration 4): the same port as the SQLite store, shared by every
replica.

As on SQLite, an item's end and its ledger row are one transaction, so an item is recorded once
whichever replica collects it. What SQLite's write lock gives for free is explicit here: claiming
queued items into a provider batch takes them `FOR UPDATE SKIP LOCKED` (two replicas flushing at
the same moment claim disjoint items), and every piece of work a runner drives (validating a job,
sending / polling / collecting a provider batch, delivering a webhook) is leased to it; a replica
that dies leaves leases that run out, and another replica takes the work over.

Uploaded files are kept in the database too (in 1 MB chunks), so a job uploaded through one
replica can be validated by another.

Calls are short indexed statements on one dedicated connection, made on the event loop like the
SQLite store's: the service's API stays synchronous. A database that does not answer is a
`SharedStateUnavailable` (503) for the request, and a failed tick (retried) for the runner.
"""

from __future__ import annotations

import contextlib
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
from thrifty.stores import postgres
from thrifty.stores.ledger import entry_row
from thrifty.stores.pg_session import PostgresSession
from thrifty.types import LedgerEntry

_CHUNK_BYTES = 1 << 20  # an uploaded file's bytes per row
_PAGE = 500
_OPEN = list(OPEN_STATES)


class PostgresBatchStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._session = PostgresSession(url)
        with self._connection() as conn:
            postgres.migrate(conn)

    def close(self) -> None:
        self._session.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> contextlib.AbstractContextManager[Any]:
        return self._session.connection()

    def _all(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return list(conn.execute(sql, params).fetchall())

    def _one(self, sql: str, params: Any = ()) -> tuple[Any, ...] | None:
        with self._connection() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
            return row

    def _count(self, sql: str, params: Any = ()) -> int:
        with self._connection() as conn:
            return int(conn.execute(sql, params).rowcount)

    # -- files ------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> FileRecord:
        """The uploaded file's bytes go into the database (every replica can read them); the
        local copy is removed once they are committed."""
        local = Path(record.path)
        stored = FileRecord(
            record.file_id,
            record.tenant_id,
            record.purpose,
            record.filename,
            record.bytes,
            record.lines,
            record.sha256,
            f"postgresql:{record.file_id}",
            record.created_at,
        )
        with self._connection() as conn, conn.transaction(), local.open("rb") as fh:
            conn.execute(
                "INSERT INTO batch_files VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    stored.file_id,
                    stored.tenant_id,
                    stored.purpose,
                    stored.filename,
                    stored.bytes,
                    stored.lines,
                    stored.sha256,
                    stored.path,
                    stored.created_at,
                ),
            )
            seq = 0
            while chunk := fh.read(_CHUNK_BYTES):
                conn.execute(
                    "INSERT INTO batch_file_chunks (file_id, seq, data) VALUES (%s, %s, %s)",
                    (stored.file_id, seq, chunk),
                )
                seq += 1
        local.unlink(missing_ok=True)
        return stored

    def get_file(self, tenant_id: str, file_id: str) -> FileRecord | None:
        row = self._one(
            "SELECT * FROM batch_files WHERE file_id = %s AND tenant_id = %s", (file_id, tenant_id)
        )
        return None if row is None else FileRecord(*row)

    def read_file(self, record: FileRecord) -> Iterator[bytes]:
        seq = -1
        while True:
            rows = self._all(
                "SELECT seq, data FROM batch_file_chunks WHERE file_id = %s AND seq > %s "
                "ORDER BY seq LIMIT 2",  # 2 MB a round trip
                (record.file_id, seq),
            )
            if not rows:
                return
            for row in rows:
                yield bytes(row[1])
            seq = rows[-1][0]

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, job: JobRecord, items: Iterable[NewItem] = ()) -> JobRecord:
        values = job_row(job)
        with self._connection() as conn, conn.transaction():
            # A repeated idempotency key inserts nothing (and no items): the first job stands.
            inserted = conn.execute(
                f"INSERT INTO batch_jobs ({JOB_COLUMNS}) VALUES ({', '.join(['%s'] * 22)}) "
                "ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                values,
            ).rowcount
            if inserted == 1:
                self._insert_items(conn, items)
                return job
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE tenant_id = %s AND idempotency_key = %s",
                (job.tenant_id, job.idempotency_key),
            ).fetchone()
        return job_record(row)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one(f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE job_id = %s", (job_id,))
        return None if row is None else job_record(row)

    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE status = ANY(%s) ORDER BY created_at",
            (list(statuses),),
        )
        return [job_record(r) for r in rows]

    def jobs_of_tenant(self, tenant_id: str, limit: int, after: str | None) -> list[JobRecord]:
        before = float("inf")
        if after is not None:
            found = self.get_job(after)
            before = found.created_at if found is not None else before
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE tenant_id = %s AND kind = 'file' "
            "AND created_at < %s ORDER BY created_at DESC LIMIT %s",
            (tenant_id, before, limit),
        )
        return [job_record(r) for r in rows]

    def jobs_for_sha256(self, tenant_id: str, sha256: str) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {', '.join('j.' + c.strip() for c in JOB_COLUMNS.split(','))} FROM batch_jobs j "
            "JOIN batch_files f ON f.file_id = j.input_file_id "
            "WHERE f.tenant_id = %s AND f.sha256 = %s ORDER BY j.created_at",
            (tenant_id, sha256),
        )
        return [job_record(r) for r in rows]

    def lease(self, job_id: str, owner: str, now: float, seconds: float) -> bool:
        return (
            self._count(
                "UPDATE batch_jobs SET lease_owner = %s, lease_until = %s WHERE job_id = %s "
                "AND status = 'validating' AND (lease_owner IS NULL OR lease_owner = %s OR lease_until < %s)",
                (owner, now + seconds, job_id, owner, now),
            )
            == 1
        )

    def lease_delivery(self, job_id: str, owner: str, now: float, seconds: float) -> bool:
        return (
            self._count(
                "UPDATE batch_jobs SET lease_owner = %s, lease_until = %s WHERE job_id = %s "
                "AND delivered_at IS NULL AND (lease_owner IS NULL OR lease_owner = %s OR lease_until < %s)",
                (owner, now + seconds, job_id, owner, now),
            )
            == 1
        )

    def set_job_status(
        self, job_id: str, status: str, ts: float, errors: list[dict[str, Any]] | None = None
    ) -> None:
        column = STATUS_TIME.get(status)
        sets = "status = %s" + (f", {column} = COALESCE({column}, %s)" if column else "")
        params: list[Any] = [status] + ([ts] if column else [])
        if errors is not None:
            sets += ", errors = %s"
            params.append(dump_json(errors))
        with self._connection() as conn:
            conn.execute(f"UPDATE batch_jobs SET {sets} WHERE job_id = %s", (*params, job_id))

    # -- items ------------------------------------------------------------------------------

    def add_items(self, items: Iterable[NewItem], entries: Iterable[LedgerEntry] = ()) -> None:
        with self._connection() as conn, conn.transaction():
            self._insert_items(conn, items)
            self._insert_ledger(conn, [entry_row(e) for e in entries])

    @staticmethod
    def _insert_items(conn: Any, items: Iterable[NewItem]) -> None:
        rows = [new_item_row(i) for i in items]
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO batch_items (request_id, job_id, line_no, custom_id, state, queue, model, "
                    "route, provider, body, reserve_usd, reserve_tokens, flush_at, flush_size, error, "
                    f"created_at, finished_at) VALUES ({', '.join(['%s'] * 17)})",
                    rows,
                )

    def validated_so_far(self, job_id: str) -> tuple[int, set[str]]:
        last = self._one("SELECT MAX(line_no) FROM batch_items WHERE job_id = %s", (job_id,))
        if last is None or last[0] is None:
            return 0, set()
        rows = self._all("SELECT custom_id FROM batch_items WHERE job_id = %s", (job_id,))
        return int(last[0]), {r[0] for r in rows}

    def item_counts(self, job_id: str) -> dict[str, int]:
        rows = self._all(
            "SELECT state, COUNT(*) FROM batch_items WHERE job_id = %s GROUP BY state", (job_id,)
        )
        return {state: int(n) for state, n in rows}

    def items_of_job(self, job_id: str) -> Iterator[Item]:
        """A page at a time, by (line_no, request_id): memory does not grow with the job."""
        line, rid = -1, ""
        while True:
            rows = self._all(
                f"SELECT {ITEM_COLUMNS}, line_no FROM batch_items WHERE job_id = %s "
                "AND (line_no, request_id) > (%s, %s) ORDER BY line_no, request_id LIMIT %s",
                (job_id, line, rid, _PAGE),
            )
            if not rows:
                return
            for row in rows:
                yield item_record(row[:-1])
            line, rid = rows[-1][-1], rows[-1][0]

    def queued_items(self, job_id: str) -> list[Item]:
        rows = self._all(
            f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE job_id = %s AND state = 'queued'", (job_id,)
        )
        return [item_record(r) for r in rows]

    def queued_past_window(self, now: float, limit: int = 500) -> list[Item]:
        columns = ", ".join("i." + c.strip() for c in ITEM_COLUMNS.split(","))
        rows = self._all(
            f"SELECT {columns} FROM batch_items i JOIN batch_jobs j ON j.job_id = i.job_id "
            "WHERE i.state = 'queued' AND j.expires_at < %s LIMIT %s",
            (now, limit),
        )
        return [item_record(r) for r in rows]

    def open_items(self) -> list[Item]:
        rows = self._all(f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE state = ANY(%s)", (_OPEN,))
        return [item_record(r) for r in rows]

    def open_item_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(_OPEN, 0)
        for state, count in self._all(
            "SELECT state, COUNT(*) FROM batch_items WHERE state = ANY(%s) GROUP BY state", (_OPEN,)
        ):
            counts[state] = int(count)
        return counts

    def queue_groups(self) -> list[QueueGroup]:
        rows = self._all(
            "SELECT provider, model, queue, COUNT(*), MIN(flush_at), MIN(flush_size) FROM batch_items "
            "WHERE state = 'queued' GROUP BY provider, model, queue"
        )
        return [QueueGroup(r[0], r[1], r[2], int(r[3]), r[4], r[5]) for r in rows]

    def claim(
        self, group: QueueGroup, limit: int, upstream_id: str, now: float, owner: str = "", lease_s: float = 0
    ) -> int:
        with self._connection() as conn, conn.transaction():
            # Rows another replica is claiming right now are skipped, not waited for or shared.
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT request_id FROM batch_items WHERE state = 'queued' AND provider = %s "
                    "AND model = %s AND queue = %s ORDER BY created_at, line_no LIMIT %s "
                    "FOR UPDATE SKIP LOCKED",
                    (group.provider, group.model, group.queue, limit),
                )
            ]
            if not ids:
                return 0
            conn.execute(
                "INSERT INTO batch_upstream (upstream_id, provider, model, state, items, created_at, "
                "next_poll_at, lease_owner, lease_until) "
                "VALUES (%s, %s, %s, 'preparing', %s, %s, %s, %s, %s)",
                (upstream_id, group.provider, group.model, len(ids), now, now, owner or None, now + lease_s),
            )
            conn.execute(
                "UPDATE batch_items SET state = 'submitted', upstream_id = %s WHERE request_id = ANY(%s)",
                (upstream_id, ids),
            )
        return len(ids)

    def lease_upstream(self, upstream_id: str, owner: str, now: float, seconds: float) -> bool:
        return (
            self._count(
                "UPDATE batch_upstream SET lease_owner = %s, lease_until = %s WHERE upstream_id = %s "
                "AND (lease_owner IS NULL OR lease_owner = %s OR lease_until < %s)",
                (owner, now + seconds, upstream_id, owner, now),
            )
            == 1
        )

    def mark_submitted(
        self, upstream_id: str, remote_id: str, next_poll_at: float, adopted: bool = False
    ) -> None:
        with self._connection() as conn:
            conn.execute(
                "UPDATE batch_upstream SET remote_id = %s, state = 'submitted', submitted_at = %s, "
                "next_poll_at = %s, adopted = %s WHERE upstream_id = %s",
                (remote_id, time.time(), next_poll_at, int(adopted), upstream_id),
            )

    def remote_ids(self, provider: str) -> set[str]:
        rows = self._all(
            "SELECT remote_id FROM batch_upstream WHERE provider = %s AND remote_id IS NOT NULL", (provider,)
        )
        return {r[0] for r in rows}

    def requeue_unsent(self, upstream_id: str) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute(
                "UPDATE batch_items SET state = 'queued', upstream_id = NULL "
                "WHERE upstream_id = %s AND state = 'submitted'",
                (upstream_id,),
            )
            conn.execute("DELETE FROM batch_upstream WHERE upstream_id = %s", (upstream_id,))

    def upstream_batches(self, states: Iterable[str]) -> list[UpstreamBatch]:
        rows = self._all(
            "SELECT upstream_id, provider, model, remote_id, state, items, next_poll_at, created_at, adopted "
            "FROM batch_upstream WHERE state = ANY(%s) ORDER BY created_at",
            (list(states),),
        )
        return [upstream_record(r) for r in rows]

    def items_of_upstream(self, upstream_id: str, state: str | None = None) -> Iterator[Item]:
        after = ""
        where = "upstream_id = %s AND request_id > %s" + (" AND state = %s" if state else "")
        while True:
            params: tuple[Any, ...] = (upstream_id, after, state) if state else (upstream_id, after)
            rows = self._all(
                f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE {where} ORDER BY request_id LIMIT {_PAGE}",
                params,
            )
            if not rows:
                return
            for row in rows:
                yield item_record(row)
            after = rows[-1][0]

    def get_items(self, request_ids: Iterable[str]) -> dict[str, Item]:
        wanted = list(request_ids)
        if not wanted:
            return {}
        rows = self._all(f"SELECT {ITEM_COLUMNS} FROM batch_items WHERE request_id = ANY(%s)", (wanted,))
        return {row[0]: item_record(row) for row in rows}

    def poll_later(self, upstream_id: str, next_poll_at: float, remote_status: str) -> None:
        with self._connection() as conn:
            conn.execute(
                "UPDATE batch_upstream SET next_poll_at = %s, remote_status = %s WHERE upstream_id = %s",
                (next_poll_at, remote_status, upstream_id),
            )

    def finish_upstream(self, upstream_id: str, remote_status: str, ts: float) -> None:
        with self._connection() as conn:
            conn.execute(
                "UPDATE batch_upstream SET state = 'collected', remote_status = %s, collected_at = %s "
                "WHERE upstream_id = %s",
                (remote_status, ts, upstream_id),
            )

    def record_results(self, results: Iterable[ItemResult], ts: float) -> list[str]:
        """One UPDATE for the page (only items still open), then the ledger rows of exactly the
        items it ended, in the same transaction."""
        by_id = {r.request_id: r for r in results}
        if not by_id:
            return []
        values = [
            v
            for r in by_id.values()
            for v in (r.request_id, r.state, r.status_code, dump_json(r.response), dump_json(r.error))
        ]
        rows = ", ".join(["(%s, %s, %s::integer, %s, %s)"] * len(by_id))
        with self._connection() as conn, conn.transaction():
            ended = [
                r[0]
                for r in conn.execute(
                    "UPDATE batch_items AS i SET state = v.state, status_code = v.status_code, "
                    "response = v.response, error = v.error, finished_at = %s "
                    f"FROM (VALUES {rows}) AS v (request_id, state, status_code, response, error) "
                    "WHERE i.request_id = v.request_id AND i.state = ANY(%s) RETURNING i.request_id",
                    (ts, *values, _OPEN),
                )
            ]
            self._insert_ledger(conn, [entry_row(by_id[rid].entry) for rid in ended])
        return ended

    @staticmethod
    def _insert_ledger(conn: Any, rows: list[tuple[Any, ...]]) -> None:
        """Ledger rows in the caller's transaction (`ON CONFLICT DO NOTHING`: a replay inserts
        nothing twice), written as the ledger writer writes them: whatever is derived from the
        ledger on PostgreSQL (reports, rollups) sees them as any other row."""
        for start in range(0, len(rows), _PAGE):
            chunk = rows[start : start + _PAGE]
            conn.execute(postgres.insert_ledger_sql(len(chunk)), [v for row in chunk for v in row])

    # -- webhooks ---------------------------------------------------------------------------

    def undelivered(self) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM batch_jobs WHERE webhook_url IS NOT NULL AND delivered_at IS NULL "
            "AND status IN ('completed', 'failed', 'expired', 'cancelled')"
        )
        return [job_record(r) for r in rows]

    def mark_delivered(self, job_id: str, ts: float | None, error: str | None) -> None:
        with self._connection() as conn:
            conn.execute(
                "UPDATE batch_jobs SET delivered_at = %s, delivery_error = %s WHERE job_id = %s",
                (ts, error, job_id),
            )
