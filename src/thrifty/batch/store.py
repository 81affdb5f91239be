"""The batch store port and the values it speaks in (jobs, files, items, provider batches)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from thrifty.batch.flush import QueueGroup
from thrifty.types import LedgerEntry


@dataclass(frozen=True, slots=True)
class FileRecord:
    file_id: str
    tenant_id: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    sha256: str
    path: str
    created_at: float


@dataclass(slots=True)
class JobRecord:
    job_id: str
    kind: str  # "file" (an OpenAI batch) or "deferred" (one deferred chat request)
    tenant_id: str
    input_file_id: str | None
    endpoint: str
    completion_window: str
    status: str
    metadata: dict[str, Any] | None
    tags: dict[str, Any]  # feature, prompt_version, user, route (attribution of every item)
    created_at: float
    expires_at: float
    errors: list[dict[str, Any]] | None = None
    webhook_url: str | None = None
    idempotency_key: str | None = None
    times: dict[str, float | None] = field(default_factory=dict)
    delivered_at: float | None = None


@dataclass(frozen=True, slots=True)
class NewItem:
    request_id: str
    job_id: str
    line_no: int
    custom_id: str
    state: str  # "queued", or "failed" for a line refused at validation
    queue: str
    created_at: float
    flush_at: float
    flush_size: int
    model: str | None = None
    route: str | None = None
    provider: str | None = None
    body: dict[str, Any] | None = None
    reserve_usd: Decimal | None = None
    reserve_tokens: int = 0
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Item:
    request_id: str
    job_id: str
    custom_id: str
    state: str
    model: str | None
    route: str | None
    provider: str | None
    body: dict[str, Any] | None
    reserve_usd: Decimal | None
    reserve_tokens: int
    created_at: float
    status_code: int | None = None
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """An item's end, and its ledger row; recorded together, once."""

    request_id: str
    state: str  # done | failed | expired | cancelled
    status_code: int | None
    response: dict[str, Any] | None  # the chat.completion (or the provider's error body)
    error: dict[str, Any] | None  # {code, message} when there is no response
    entry: LedgerEntry
    # Whose budget holds it: (tenant, tags, route, when it was reserved), to settle its hold.
    owner: tuple[str, dict[str, Any], str | None, float] | None = None


@dataclass(frozen=True, slots=True)
class UpstreamBatch:
    upstream_id: str
    provider: str
    model: str
    remote_id: str | None
    state: str  # preparing | submitted | collected
    items: int
    next_poll_at: float
    created_at: float = 0.0  # when its items were claimed, just before it was sent
    # Found at the provider after a crash rather than sent by the process that stores its id:
    # if none of its items comes back, it was another batch after all and they are queued again.
    adopted: bool = False


class BatchStore(Protocol):
    """Calls are short indexed statements, made on the event loop (SQLite: the embedded file;
    PostgreSQL: one dedicated connection). Leases (`lease`, `lease_upstream`, `lease_delivery`)
    make one runner at a time drive a job's validation, a provider batch, or a webhook, across
    every process sharing the store; a lease a dead process held runs out and another takes over."""

    def add_file(self, record: FileRecord) -> FileRecord:
        """Keep an uploaded file (at `record.path`, complete); returns the record as stored."""
        ...

    def get_file(self, tenant_id: str, file_id: str) -> FileRecord | None: ...
    def read_file(self, record: FileRecord) -> Iterator[bytes]:
        """The file's bytes in chunks (never whole)."""
        ...

    def create_job(self, job: JobRecord, items: Iterable[NewItem] = ()) -> JobRecord:
        """Insert with its items, or return the job already there with the same (tenant,
        idempotency_key) and insert nothing."""
        ...

    def get_job(self, job_id: str) -> JobRecord | None: ...
    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]: ...
    def jobs_of_tenant(self, tenant_id: str, limit: int, after: str | None) -> list[JobRecord]: ...
    def jobs_for_sha256(self, tenant_id: str, sha256: str) -> list[JobRecord]: ...
    def lease(self, job_id: str, owner: str, now: float, seconds: float) -> bool: ...
    def set_job_status(
        self, job_id: str, status: str, ts: float, errors: list[dict[str, Any]] | None = None
    ) -> None: ...
    def add_items(self, items: Iterable[NewItem], entries: Iterable[LedgerEntry] = ()) -> None: ...
    def validated_so_far(self, job_id: str) -> tuple[int, set[str]]: ...
    def item_counts(self, job_id: str) -> dict[str, int]: ...
    def items_of_job(self, job_id: str) -> Iterator[Item]: ...
    def queue_groups(self) -> list[QueueGroup]: ...
    def claim(
        self, group: QueueGroup, limit: int, upstream_id: str, now: float, owner: str = "", lease_s: float = 0
    ) -> int:
        """Move up to `limit` queued items into a new provider batch leased to `owner`; how many.
        Items another process is claiming at the same moment are skipped, never shared."""
        ...

    def lease_upstream(self, upstream_id: str, owner: str, now: float, seconds: float) -> bool: ...
    def lease_delivery(self, job_id: str, owner: str, now: float, seconds: float) -> bool: ...
    def mark_submitted(
        self, upstream_id: str, remote_id: str, next_poll_at: float, adopted: bool = False
    ) -> None: ...
    def remote_ids(self, provider: str) -> set[str]:
        """The provider's ids of every batch stored (so a recovery never adopts one twice)."""
        ...

    def upstream_batches(self, states: Iterable[str]) -> list[UpstreamBatch]: ...
    def items_of_upstream(self, upstream_id: str, state: str | None = None) -> Iterator[Item]: ...
    def get_items(self, request_ids: Iterable[str]) -> dict[str, Item]: ...
    def requeue_unsent(self, upstream_id: str) -> None: ...
    def poll_later(self, upstream_id: str, next_poll_at: float, remote_status: str) -> None: ...
    def finish_upstream(self, upstream_id: str, remote_status: str, ts: float) -> None: ...
    def record_results(self, results: Iterable[ItemResult], ts: float) -> list[str]:
        """Record each open item's end and its ledger row in one transaction; return the ids
        newly recorded (an item already ended is left alone: exactly once)."""
        ...

    def queued_items(self, job_id: str) -> list[Item]: ...
    def queued_past_window(self, now: float, limit: int = 500) -> list[Item]: ...
    def open_items(self) -> list[Item]: ...
    def open_item_counts(self) -> dict[str, int]:
        """Items queued (not yet in a provider batch) and submitted (in one, not yet ended), of
        every job in the store (the batch queue depths in /metrics)."""
        ...

    def undelivered(self) -> list[JobRecord]: ...
    def mark_delivered(self, job_id: str, ts: float | None, error: str | None) -> None: ...
    def close(self) -> None: ...
