"""What the HTTP routes ask of batch offload: files, batches, deferred requests, jobs.

Every line (and every deferred request) goes through the gateway's own pre-call stages (model
allowed for the tenant, output clamp, input limits) before it is queued, and reserves its
worst-case cost at batch prices on every budget that applies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from thrifty.batch.adapters.base import BatchAdapter
from thrifty.batch.lines import CHAT_ENDPOINT, ENDPOINTS, InputLine, LineError
from thrifty.batch.pricing import BatchPricer
from thrifty.batch.reservations import BatchReservations
from thrifty.batch.states import JOB_FINAL, request_counts
from thrifty.batch.store import BatchStore, FileRecord, Item, JobRecord, NewItem
from thrifty.errors import IdempotencyConflict, InvalidRequest, NotFound, ThriftyError
from thrifty.guard.limits import InputLimits
from thrifty.guard.media import image_extra
from thrifty.guard.output import OutputCeiling, choices, requested_output
from thrifty.pipeline import Completion, Handler, RequestContext, Result, build_chain
from thrifty.providers.anthropic_request import to_anthropic_request
from thrifty.settings import DeferSettings, parse_window
from thrifty.types import Tags, Usage

if TYPE_CHECKING:
    from thrifty.gateway import Gateway

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
_DEFER_QUEUE = "defer"
_OUTPUT_SUFFIX = "-output"
_ERRORS_SUFFIX = "-errors"


class FileTooLarge(ThriftyError):
    status = 413
    error_type = "invalid_request_error"
    code = "file_too_large"


def new_request_id() -> str:
    # As the gateway makes them: time-ordered (ledger inserts at the index's right edge).
    return f"req_{time.time_ns():016x}{os.urandom(6).hex()}"


async def _admitted(ctx: RequestContext) -> Result:
    return Completion({}, None)


@dataclass
class Upload:
    """An input file being received: written to disk as it arrives, hashed and counted on the way."""

    path: Path
    limit: int
    size: int = 0
    newlines: int = 0
    last: bytes = b"\n"

    def __post_init__(self) -> None:
        self._fh = self.path.open("wb")
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise FileTooLarge(
                f"the file is over {self.limit} bytes (batch.max_file_bytes; OpenAI's limit is 200 MB); "
                "split it into several batches"
            )
        self._fh.write(data)
        self._sha.update(data)
        self.newlines += data.count(b"\n")
        if data:
            self.last = data[-1:]

    @property
    def lines(self) -> int:
        return self.newlines + (0 if self.last == b"\n" else 1)

    def finish(self) -> str:
        self._fh.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


class BatchService:
    def __init__(self, gateway: Gateway, adapters: dict[str, BatchAdapter]) -> None:
        self.gateway = gateway
        self.settings = gateway.settings.batch
        self.adapters = adapters
        self.pricer = BatchPricer(gateway.catalog, gateway.settings.models, gateway.settings.providers)
        routes = gateway.settings.routes
        from thrifty.gateway import _anthropic_models

        models = gateway.settings.models
        stages: list[Any] = [
            gateway.resolver,
            OutputCeiling(
                models, routes, _anthropic_models(gateway.settings), gateway.router.trained_aliases()
            ),
        ]
        if any(m.context_window for m in gateway.settings.models.values()) or any(
            r.max_input_tokens for r in routes.values()
        ):
            stages.append(InputLimits(gateway.counter, routes))
        self._admit: Handler = build_chain(stages, _admitted)
        self._anthropic = {n for n, p in gateway.settings.providers.items() if p.kind == "anthropic"}
        self.defer_routes = {name: r.defer for name, r in routes.items() if r.defer is not None}
        db = gateway.db_path
        self.files_dir = (
            Path(self.settings.files_dir) if self.settings.files_dir else db.parent / (db.name + ".files")
        )
        self.store: BatchStore | None = None
        self.reservations = BatchReservations(
            gateway.budget_plan, gateway.budget_book, gateway.stores.shared_budgets
        )
        self.wake: Any = None  # set by the runner: called when there is new work

    def start(self) -> None:
        from thrifty.stores.factory import open_batch_store

        # Uploads arrive here (with PostgreSQL they move into the database once complete).
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_batch_store(self.gateway.settings)
        for warning in self.pricer.gaps(self.gateway.settings.models):
            log.warning("%s", warning)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def db(self) -> BatchStore:
        if self.store is None:
            raise RuntimeError("batch service used before start()")
        return self.store

    def _notify(self) -> None:
        if self.wake is not None:
            self.wake()

    # -- files ------------------------------------------------------------------------------

    def open_upload(self) -> Upload:
        return Upload(self.files_dir / f"upload-{os.urandom(8).hex()}.part", self.settings.max_file_bytes)

    def finish_upload(self, tenant: str, upload: Upload, filename: str, purpose: str) -> FileRecord:
        sha = upload.finish()
        if purpose != "batch":
            upload.abort()
            raise InvalidRequest(
                f"purpose {purpose!r} is not served by thrifty; upload batch input files as purpose 'batch'",
                param="purpose",
            )
        file_id = "file-" + os.urandom(12).hex()
        path = self.files_dir / f"{file_id}.jsonl"
        upload.path.rename(path)
        record = FileRecord(
            file_id, tenant, purpose, filename, upload.size, upload.lines, sha, str(path), time.time()
        )
        return self.db.add_file(record)

    @staticmethod
    def file_object(record: FileRecord) -> dict[str, Any]:
        return {
            "id": record.file_id,
            "object": "file",
            "bytes": record.bytes,
            "created_at": int(record.created_at),
            "filename": record.filename,
            "purpose": record.purpose,
            "status": "processed",
            "status_details": None,
        }

    def file(self, tenant: str, file_id: str) -> dict[str, Any]:
        job, errors = self._output_job(tenant, file_id)
        if job is not None:
            return {
                "id": file_id,
                "object": "file",
                "bytes": 0,
                "created_at": int(job.times.get("completed_at") or job.created_at),
                "filename": f"{job.job_id}_{'error' if errors else 'output'}.jsonl",
                "purpose": "batch_output",
                "status": "processed",
                "status_details": None,
            }
        record = self.db.get_file(tenant, file_id)
        if record is None:
            raise NotFound(f"no file {file_id!r} for this key's tenant", param="file_id")
        return self.file_object(record)

    def _output_job(self, tenant: str, file_id: str) -> tuple[JobRecord | None, bool]:
        for suffix, errors in ((_OUTPUT_SUFFIX, False), (_ERRORS_SUFFIX, True)):
            if file_id.startswith("file-batch_") and file_id.endswith(suffix):
                job = self.db.get_job(file_id.removeprefix("file-").removesuffix(suffix))
                if job is None or job.tenant_id != tenant:
                    raise NotFound(f"no file {file_id!r} for this key's tenant", param="file_id")
                return job, errors
        return None, False

    def content(self, tenant: str, file_id: str) -> Iterator[bytes]:
        """A file's bytes in chunks: an uploaded input file, or a batch's output or error file,
        written from the store line by line (never held whole)."""
        job, errors = self._output_job(tenant, file_id)
        if job is not None:
            return self._output_lines(job, errors)
        record = self.db.get_file(tenant, file_id)
        if record is None:
            raise NotFound(f"no file {file_id!r} for this key's tenant", param="file_id")
        return self.db.read_file(record)

    def _output_lines(self, job: JobRecord, errors: bool) -> Iterator[bytes]:
        chunk: list[bytes] = []
        for item in self.db.items_of_job(job.job_id):
            if item.state in ("queued", "submitted") or (item.state == "done") == errors:
                continue
            chunk.append(orjson.dumps(output_line(item)) + b"\n")
            if len(chunk) >= 256:
                yield b"".join(chunk)
                chunk.clear()
        if chunk:
            yield b"".join(chunk)

    # -- batches ----------------------------------------------------------------------------

    def create_batch(self, tenant: str, body: Any, tags: Tags, route: str | None) -> JobRecord:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequest(
                "'input_file_id' is required (the id from POST /v1/files)", param="input_file_id"
            )
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint {endpoint!r} is not served; thrifty batches {CHAT_ENDPOINT}", param="endpoint"
            )
        window = body.get("completion_window")
        if window != "24h":
            raise InvalidRequest("'completion_window' must be \"24h\"", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise InvalidRequest("'metadata' must be an object of strings", param="metadata")
        record = self.db.get_file(tenant, file_id)
        if record is None:
            raise NotFound(
                f"no file {file_id!r} for this key's tenant; upload it first", param="input_file_id"
            )
        if record.lines > self.settings.max_lines:
            raise InvalidRequest(
                f"file {file_id!r} has {record.lines} lines, over the limit of {self.settings.max_lines} "
                "(batch.max_lines; OpenAI's limit is 50,000); split it into several batches",
                param="input_file_id",
                code="too_many_lines",
            )
        meta = metadata or {}
        now = time.time()
        job = JobRecord(
            job_id="batch_" + os.urandom(12).hex(),
            kind="file",
            tenant_id=tenant,
            input_file_id=file_id,
            endpoint=str(endpoint),
            completion_window="24h",
            status="validating",
            metadata=metadata,
            tags={
                "feature": tags.feature or meta.get("feature"),
                "prompt_version": tags.prompt_version or meta.get("prompt_version"),
                "user": tags.user or meta.get("user"),
                "route": route or meta.get("route"),
            },
            created_at=now,
            expires_at=now + 86400,
        )
        self.db.create_job(job)
        self._notify()
        return job

    def job(self, tenant: str, job_id: str, kind: str = "file") -> JobRecord:
        job = self.db.get_job(job_id)
        if job is None or job.tenant_id != tenant or job.kind != kind:
            what = "batch" if kind == "file" else "job"
            raise NotFound(f"no {what} {job_id!r} for this key's tenant", param=f"{what}_id")
        return job

    def batch_object(self, job: JobRecord) -> dict[str, Any]:
        counts = self.db.item_counts(job.job_id)
        done = job.status in JOB_FINAL
        unanswered = sum(n for state, n in counts.items() if state != "done")
        t = job.times
        return {
            "id": job.job_id,
            "object": "batch",
            "endpoint": job.endpoint,
            "errors": {"object": "list", "data": job.errors} if job.errors else None,
            "input_file_id": job.input_file_id,
            "completion_window": job.completion_window,
            "status": job.status,
            "output_file_id": f"file-{job.job_id}{_OUTPUT_SUFFIX}" if done and counts.get("done") else None,
            "error_file_id": f"file-{job.job_id}{_ERRORS_SUFFIX}" if done and unanswered else None,
            "created_at": int(job.created_at),
            "in_progress_at": _int(t.get("in_progress_at")),
            "expires_at": int(job.expires_at),
            "finalizing_at": _int(t.get("finalizing_at")),
            "completed_at": _int(t.get("completed_at")),
            "failed_at": _int(t.get("failed_at")),
            "expired_at": _int(t.get("expired_at")),
            "cancelling_at": _int(t.get("cancelling_at")),
            "cancelled_at": _int(t.get("cancelled_at")),
            "request_counts": request_counts(counts),
            "metadata": job.metadata,
        }

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        job = self.job(tenant, job_id)
        if job.status in JOB_FINAL:
            raise InvalidRequest(
                f"batch {job_id!r} is {job.status} already; only an unfinished batch can be cancelled",
                code="batch_not_cancellable",
            )
        if job.status != "cancelling":
            self.db.set_job_status(job.job_id, "cancelling", time.time())
        self._notify()
        refreshed = self.db.get_job(job.job_id)
        assert refreshed is not None
        return refreshed

    def list_batches(self, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
        jobs = self.db.jobs_of_tenant(tenant, limit + 1, after)
        data = [self.batch_object(j) for j in jobs[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(jobs) > limit,
        }

    def batches_for_sha256(self, tenant: str, sha256: str) -> list[dict[str, Any]]:
        return [self.batch_object(j) for j in self.db.jobs_for_sha256(tenant, sha256)]

    # -- admission (lines and deferred requests) --------------------------------------------

    async def admit(
        self, line: InputLine, tags: Tags, job_id: str, queue: str, defer: DeferSettings
    ) -> NewItem:
        """Run a line through the pre-call stages; a refusal raises LineError naming the line."""
        ctx = self.gateway.new_context(line.body, len(orjson.dumps(line.body)), tags)
        try:
            await self._admit(ctx)
        except ThriftyError as err:
            raise LineError(line.line_no, line.custom_id, err.code or err.error_type, err.message) from err
        assert ctx.target is not None
        if ctx.target.provider in self._anthropic:
            try:  # what the adapter will send: a line Anthropic's shape cannot carry fails alone
                to_anthropic_request(ctx.body, ctx.target.upstream_model)
            except ThriftyError as err:
                raise LineError(
                    line.line_no, line.custom_id, err.code or err.error_type, err.message
                ) from err
        usd, tokens = self._worst_case(ctx)
        now = time.time()
        return NewItem(
            request_id=ctx.request_id,
            job_id=job_id,
            line_no=line.line_no,
            custom_id=line.custom_id,
            state="queued",
            queue=queue,
            created_at=now,
            flush_at=now + defer.max_age_s if queue == _DEFER_QUEUE else now,
            flush_size=defer.max_batch if queue == _DEFER_QUEUE else 1,
            model=ctx.target.alias,
            route=ctx.route,
            provider=ctx.target.provider,
            body=ctx.body,
            reserve_usd=usd,
            reserve_tokens=tokens,
        )

    def _worst_case(self, ctx: RequestContext) -> tuple[Decimal | None, int]:
        if self.gateway.budget_plan.empty:
            return None, 0  # nothing to reserve: counting tokens would only cost time
        assert ctx.target is not None
        prompt = ctx.prompt_tokens or self.gateway.counter.count_messages(
            ctx.body.get("messages") or [], ctx.target.upstream_model, tools=ctx.body.get("tools")
        )
        # The output ceiling stage has set the cap that is sent; each of n choices may reach it.
        output = choices(ctx.body) * (
            requested_output(ctx.body) or self.gateway.settings.models[ctx.target.alias].max_output_tokens
        )
        model = self.gateway.settings.models[ctx.target.alias]
        prompt_worst = prompt.tokens + image_extra(prompt, ctx.target.alias, model)
        usd = self.pricer.cost(ctx.target.alias, Usage(input_tokens=prompt_worst, output_tokens=output))
        return usd, prompt_worst + output

    # -- deferred requests ------------------------------------------------------------------

    def defer_settings(self, headers: dict[str, str], body: dict[str, Any]) -> DeferSettings | None:
        """The deferral a request asks for (x-thrifty-defer) or its route gives, or None."""
        header = headers.get("x-thrifty-defer")
        model = body.get("model")
        route = (
            model.removeprefix("route:") if isinstance(model, str) and model.startswith("route:") else None
        )
        configured = self.defer_routes.get(route) if route else None
        if header is None:
            return configured
        if header.strip().lower() in ("0", "no", "false", "off"):
            return None  # the caller needs the answer now, whatever the route says
        try:
            window = parse_window(header)
        except ValueError as err:
            raise InvalidRequest(f"x-thrifty-defer: {err}", param="x-thrifty-defer") from err
        base = configured or self.settings.defer
        # A window shorter than the queue's age limit: flushed by half the window at the latest.
        return base.model_copy(
            update={"after": header.strip().lower(), "max_age_s": min(base.max_age_s, window / 2)}
        )

    async def defer(
        self, body: dict[str, Any], tags: Tags, defer: DeferSettings, webhook: str | None
    ) -> tuple[JobRecord, bool]:
        """Queue one chat request; (its job, whether it was queued now rather than before)."""
        if body.get("stream"):
            raise InvalidRequest(
                "a deferred request is answered later, so it cannot stream: leave out 'stream', "
                "or send x-thrifty-defer: no for an answer now",
                param="stream",
            )
        job_id = "job_" + os.urandom(12).hex()
        recorder = self.gateway.recorder
        sent = orjson.loads(orjson.dumps(body)) if recorder.active else None  # before admission rewrites it
        line = InputLine(1, job_id, body)
        try:
            item = await self.admit(line, tags, job_id, _DEFER_QUEUE, defer)
        except LineError as err:
            cause = err.__cause__
            if isinstance(cause, ThriftyError):
                raise cause from None
            raise InvalidRequest(err.message) from err
        now = time.time()
        job = JobRecord(
            job_id=job_id,
            kind="deferred",
            tenant_id=tags.tenant_id,
            input_file_id=None,
            endpoint=CHAT_ENDPOINT,
            completion_window=defer.after,
            status="in_progress",
            metadata=None,
            tags={
                "feature": tags.feature,
                "prompt_version": tags.prompt_version,
                "user": tags.user,
                "route": item.route,
                "idempotency_key": tags.idempotency_key,
            },
            created_at=now,
            expires_at=now + parse_window(defer.after),
            webhook_url=webhook or defer.webhook_url,
            idempotency_key=tags.idempotency_key,
            times={"in_progress_at": now},
        )
        await self.reservations.reserve(tags.tenant_id, job.tags, [item])
        stored = self.db.create_job(job, [item])
        if stored.job_id != job.job_id:
            # A repeat: the first one holds the reservation.
            await self.reservations.settle(item.request_id, _ZERO, 0)
            first = next(self.db.items_of_job(stored.job_id), None)
            if first is None or first.body != item.body or first.model != item.model:
                raise IdempotencyConflict(
                    f"Idempotency-Key {tags.idempotency_key!r} was already used with a different request "
                    f"(job {stored.job_id}); use a new key for a new request",
                    param="Idempotency-Key",
                )
            return stored, False
        if sent is not None:
            target = self.gateway.targets.get(item.model or "")
            model = target.upstream_model if target is not None else item.model
            recorder.record_deferred(item.request_id, item.route, tags, sent, model)
        self._notify()
        return stored, True

    def job_view(self, job: JobRecord) -> dict[str, Any]:
        items = list(self.db.items_of_job(job.job_id))
        item = items[0] if items else None
        state = item.state if item is not None else "queued"
        status = {"done": "completed"}.get(state, state)
        view: dict[str, Any] = {
            "id": job.job_id,
            "object": "thrifty.job",
            "status": status,
            "created_at": int(job.created_at),
            "expires_at": int(job.expires_at),
            "defer": job.completion_window,
            "request_id": item.request_id if item else None,
            "model": item.model if item else None,
            "response": None,
            "error": None,
        }
        if item is not None and item.state not in ("queued", "submitted"):
            if item.response is not None:
                view["response"] = {"status_code": item.status_code, "body": item.response}
            view["error"] = item.error
        return view


def output_line(item: Item) -> dict[str, Any]:
    """A line of an output or error file, in OpenAI's format."""
    line_id = "batch_req_" + item.request_id.removeprefix("req_")
    if item.response is not None:
        return {
            "id": line_id,
            "custom_id": item.custom_id,
            "response": {
                "status_code": item.status_code,
                "request_id": item.request_id,
                "body": item.response,
            },
            "error": None,
        }
    return {"id": line_id, "custom_id": item.custom_id, "response": None, "error": item.error}


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
