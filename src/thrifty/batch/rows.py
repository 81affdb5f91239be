"""The batch store's rows as records, the same on SQLite and PostgreSQL (both stores read the
same columns in the same order)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from thrifty.batch.states import ITEM_OPEN
from thrifty.batch.store import Item, JobRecord, NewItem, UpstreamBatch
from thrifty.types import decimal_text

JOB_COLUMNS = (
    "job_id, kind, tenant_id, input_file_id, endpoint, completion_window, status, metadata, tags, errors, "
    "webhook_url, idempotency_key, created_at, expires_at, in_progress_at, finalizing_at, completed_at, "
    "failed_at, expired_at, cancelling_at, cancelled_at, delivered_at"
)
TIME_COLUMNS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
ITEM_COLUMNS = (
    "request_id, job_id, custom_id, state, model, route, provider, body, reserve_usd, reserve_tokens, "
    "created_at, status_code, response, error"
)
OPEN_STATES = tuple(sorted(ITEM_OPEN))


def dump_json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def load_json(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def job_record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        kind=row[1],
        tenant_id=row[2],
        input_file_id=row[3],
        endpoint=row[4],
        completion_window=row[5],
        status=row[6],
        metadata=load_json(row[7]),
        tags=load_json(row[8]) or {},
        errors=load_json(row[9]),
        webhook_url=row[10],
        idempotency_key=row[11],
        created_at=row[12],
        expires_at=row[13],
        times=dict(zip(TIME_COLUMNS, row[14:21], strict=True)),
        delivered_at=row[21],
    )


def upstream_record(r: tuple[Any, ...]) -> UpstreamBatch:
    return UpstreamBatch(r[0], r[1], r[2], r[3], r[4], r[5], r[6], created_at=r[7], adopted=bool(r[8]))


def item_record(row: tuple[Any, ...]) -> Item:
    return Item(
        request_id=row[0],
        job_id=row[1],
        custom_id=row[2],
        state=row[3],
        model=row[4],
        route=row[5],
        provider=row[6],
        body=load_json(row[7]),
        reserve_usd=None if row[8] is None else Decimal(row[8]),
        reserve_tokens=row[9],
        created_at=row[10],
        status_code=row[11],
        response=load_json(row[12]),
        error=load_json(row[13]),
    )


def job_row(job: JobRecord) -> tuple[Any, ...]:
    """A job's values in JOB_COLUMNS order."""
    return (
        job.job_id,
        job.kind,
        job.tenant_id,
        job.input_file_id,
        job.endpoint,
        job.completion_window,
        job.status,
        dump_json(job.metadata),
        dump_json(job.tags),
        dump_json(job.errors),
        job.webhook_url,
        job.idempotency_key,
        job.created_at,
        job.expires_at,
        *(job.times.get(c) for c in TIME_COLUMNS),
        job.delivered_at,
    )


def new_item_row(i: NewItem) -> tuple[Any, ...]:
    """A new item's values in the batch_items insert's column order, ending with finished_at: an
    item refused at validation is finished when it is created, a queued one is not."""
    return (
        i.request_id,
        i.job_id,
        i.line_no,
        i.custom_id,
        i.state,
        i.queue,
        i.model,
        i.route,
        i.provider,
        dump_json(i.body),
        None if i.reserve_usd is None else decimal_text(i.reserve_usd),
        i.reserve_tokens,
        i.flush_at,
        i.flush_size,
        dump_json(i.error),
        i.created_at,
        None if i.state == "queued" else i.created_at,
    )
