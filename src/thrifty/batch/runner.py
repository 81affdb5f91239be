"""The runner: one task that validates new jobs, flushes the queue into provider batches, polls
them, collects their results into the ledger, and delivers webhooks.

Everything it knows is in the store, so a restart resumes where the last process stopped:
queued items are sent, sent batches are polled, and an item's result is recorded once (the store
ends an item and writes its ledger row in one transaction, and only while the item is open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

from thrifty.batch.adapters.base import Outbound, Outcome
from thrifty.batch.entries import refused_entry, result_entry
from thrifty.batch.flush import due, next_wake
from thrifty.batch.lines import LineError, parse_line, split_lines
from thrifty.batch.recovery import UnsentRecovery
from thrifty.batch.service import BatchService, new_request_id
from thrifty.batch.states import ITEM_FINAL, STATUS_TIME, next_status
from thrifty.batch.store import Item, ItemResult, JobRecord, NewItem, UpstreamBatch
from thrifty.batch.webhooks import WebhookDelivery
from thrifty.errors import BudgetExceeded, ThriftyError
from thrifty.types import LedgerEntry, Tags, Usage

log = logging.getLogger(__name__)

_CHUNK = 500  # lines validated (and results recorded) per transaction


class BatchRunner:
    def __init__(self, service: BatchService) -> None:
        self.service = service
        self._task: asyncio.Task[None] | None = None
        self._event = asyncio.Event()
        self._cancel_sent: set[str] = set()
        self._jobs: dict[str, JobRecord] = {}
        self._owner = f"{os.getpid()}-{os.urandom(4).hex()}"  # this process, for leases
        self._lease_s = service.settings.lease_s
        self._sending: set[str] = set()  # provider batches this runner is sending right now
        self._recovery = UnsentRecovery(service, self._owner, self._sending)
        self._sweep_at = 0.0  # when holds of items recorded by other processes are next looked at
        self._webhooks = WebhookDelivery(service, self._owner)
        # Queues whose submission failed: not retried before then.
        self._submit_retry_at: dict[tuple[str, str, str], float] = {}
        service.wake = self._event.set

    async def start(self) -> None:
        db = self.service.db
        for adapter in self.service.adapters.values():
            await adapter.start()
        if not self.service.gateway.budget_plan.empty:
            open_items = db.open_items()
            owners = {}
            for item in open_items:
                job = self._job(item.job_id)
                owners[item.job_id] = (job.tenant_id, job.tags)
            self.service.reservations.rereserve(owners, open_items)
        self._webhooks.start()
        self._task = asyncio.ensure_future(self._loop())

    async def pause(self) -> None:
        """Stop the background loop (the adapters stay open; `drain` still works): for `thrifty
        simulate`, which drains each step's queue at the end instead of ticking through it."""
        if self._task is not None:
            # Python 3.11's wait_for swallows a cancel that lands as the awaited event fires, and the
            # loop then runs on: cancel until the task has ended.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.pause()
        for adapter in self.service.adapters.values():
            await adapter.close()
        await self._webhooks.close()

    async def _loop(self) -> None:
        while True:
            try:
                wait = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the runner must outlive one bad tick; the next retries
                log.exception("batch runner tick failed")
                wait = self.service.settings.poll_interval_s
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=wait)

    async def tick(self) -> float:
        """One round of work; returns how long to sleep before the next unless woken."""
        now = time.time()
        for job in self.service.db.jobs_with_status(["validating"]):
            await self._validate(job)
        await self._cancel_requested()
        # Here, not in start(): a provider that is down must not hold up the gateway's start.
        await self._recovery.run()
        await self._flush(now)
        await self._poll(time.time())
        await self._webhooks.deliver()
        self._sweep_holds(time.time())
        poll = self.service.settings.poll_interval_s
        now = time.time()
        waits = [next_wake(self.service.db.queue_groups(), now, poll)]
        waits += [max(0.0, u.next_poll_at - now) for u in self.service.db.upstream_batches(["submitted"])]
        return max(0.01, min(waits))

    async def drain(self, now: float, rounds: int = 100) -> int:
        """Send every queued item and collect every ended provider batch as if the clock read
        `now`; the items still open after `rounds` rounds (0 when all ended). For `thrifty
        simulate`, which replays a day in minutes and reads the ledger when the replay is done."""
        for _ in range(rounds):
            await self._flush(now)
            await self._poll(now)
            left = len(self.service.db.open_items())
            if not left:
                return 0
        return left

    def _sweep_holds(self, now: float) -> None:
        """Holds this process took for items another process (sharing the store) recorded: let
        them go, so neither a budget nor this process's memory keeps them. Only items stored in a
        final state count: one not stored yet is a deferral in flight."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + self._lease_s
        held = list(self.service.reservations.held)
        for start in range(0, len(held), _CHUNK):
            items = self.service.db.get_items(held[start : start + _CHUNK])
            self.service.reservations.drop_ended(
                request_id for request_id, item in items.items() if item.state in ITEM_FINAL
            )

    def _job(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            job = self.service.db.get_job(job_id)
            assert job is not None, job_id
            self._jobs[job_id] = job
        return job

    # -- validation -------------------------------------------------------------------------

    async def _validate(self, job: JobRecord) -> None:
        service, db = self.service, self.service.db
        assert job.input_file_id is not None
        if not db.lease(job.job_id, self._owner, time.time(), self._lease_s):
            return  # another process sharing the store is validating it
        record = db.get_file(job.tenant_id, job.input_file_id)
        if record is None:
            db.set_job_status(
                job.job_id, "failed", time.time(), [_error("file_gone", "the input file is gone")]
            )
            return
        tags = Tags(
            job.tenant_id, job.tags.get("feature"), job.tags.get("prompt_version"), job.tags.get("user")
        )
        route = job.tags.get("route")
        # A restart during validation resumes after the last chunk stored (each chunk, with the
        # ledger rows of its refused lines, is one transaction): no line is added twice.
        done_line, seen = db.validated_so_far(job.job_id)
        items: list[NewItem] = []
        refused: list[LedgerEntry] = []
        try:
            chunks = db.read_file(record)
            line_no = 0
            for raw in split_lines(chunks):
                line_no += 1
                if line_no <= done_line or not raw.strip():
                    continue
                try:
                    line = parse_line(raw, line_no, job.endpoint, seen, route)
                    seen.add(line.custom_id)
                    item = await service.admit(line, tags, job.job_id, job.job_id, service.settings.defer)
                except LineError as err:
                    if err.custom_id is not None:
                        seen.add(err.custom_id)
                    item = _refused_item(job, err)
                    refused.append(
                        refused_entry(item.request_id, job.tenant_id, job.tags, err, item.created_at)
                    )
                items.append(item)
                if len(items) >= _CHUNK:
                    if not db.lease(job.job_id, self._owner, time.time(), self._lease_s):
                        return  # the lease ran out and another process took the job over
                    if not await self._store_chunk(job, items, refused):
                        return
                    items, refused = [], []
                    await asyncio.sleep(0)  # let requests in between chunks
        except FileNotFoundError:
            db.set_job_status(
                job.job_id, "failed", time.time(), [_error("file_gone", "the input file is gone")]
            )
            return
        if await self._store_chunk(job, items, refused):
            db.set_job_status(job.job_id, "in_progress", time.time())
            self._advance(job.job_id)

    async def _store_chunk(self, job: JobRecord, items: list[NewItem], refused: list[LedgerEntry]) -> bool:
        """Reserve the chunk's worst case and store it; a job over its budget fails whole (its
        earlier chunks' reservations released), before any line is sent."""
        queued = [i for i in items if i.state == "queued"]
        try:
            await self.service.reservations.reserve(job.tenant_id, job.tags, queued)
        except BudgetExceeded as err:
            self.service.db.add_items(items, refused)
            await self._drop_queued(job, "budget_exceeded", err.message)
            self.service.db.set_job_status(
                job.job_id, "failed", time.time(), [_error("budget_exceeded", err.message)]
            )
            return False
        self.service.db.add_items(items, refused)
        return True

    async def _drop_queued(self, job: JobRecord, code: str, message: str, state: str = "failed") -> None:
        ts = time.time()
        results = []
        for item in self.service.db.queued_items(job.job_id):
            entry = result_entry(
                item,
                job.tenant_id,
                job.tags,
                ok=False,
                status_code=0,
                usage=Usage(),
                cost=Decimal(0),
                realtime=None,
                error=message,
                ts=ts,
            )
            results.append(
                ItemResult(
                    item.request_id,
                    state,
                    None,
                    None,
                    _error(code, message),
                    entry,
                    (job.tenant_id, job.tags, item.route, item.created_at),
                )
            )
        owners = {r.request_id: r.owner for r in results}
        for request_id in self.service.db.record_results(results, ts):
            await self.service.reservations.settle(request_id, Decimal(0), 0, owners[request_id])
        self._to_recordings(results)

    # -- cancel -----------------------------------------------------------------------------

    async def _cancel_requested(self) -> None:
        db = self.service.db
        for job in db.jobs_with_status(["cancelling"]):
            await self._drop_queued(job, "batch_cancelled", "cancelled before it was sent", "cancelled")
            for upstream in db.upstream_batches(["submitted"]):
                if upstream.upstream_id in self._cancel_sent or upstream.remote_id is None:
                    continue
                first = next(db.items_of_upstream(upstream.upstream_id), None)
                if first is None or first.job_id != job.job_id:
                    continue  # a deferred queue's batch carries other jobs' requests too
                if not db.lease_upstream(upstream.upstream_id, self._owner, time.time(), self._lease_s):
                    continue  # another process drives it; it sends the cancel
                self._cancel_sent.add(upstream.upstream_id)
                try:
                    await self.service.adapters[upstream.provider].cancel(upstream.remote_id)
                except ThriftyError as err:
                    log.warning("cancelling provider batch %s: %s", upstream.remote_id, err.message)
            self._advance(job.job_id)

    # -- flush ------------------------------------------------------------------------------

    async def _expire_queued(self, now: float) -> None:
        """Items still queued when their window ends (every submission failed) end expired."""
        while stale := self.service.db.queued_past_window(now):
            jobs = {item.job_id for item in stale}
            outcome = Outcome("", "expired", error=_error("batch_expired", "not sent within its window"))
            await self._record(
                [self._result(item, replace(outcome, request_id=item.request_id)) for item in stale]
            )
            for job_id in jobs:
                self._advance(job_id)

    async def _flush(self, now: float) -> None:
        db = self.service.db
        await self._expire_queued(now)
        for group in due(db.queue_groups(), now):
            adapter = self.service.adapters.get(group.provider)
            key = (group.provider, group.model, group.queue)
            if adapter is None or self._submit_retry_at.get(key, 0.0) > now:
                continue
            while True:
                upstream_id = "ub_" + os.urandom(10).hex()
                claimed = db.claim(
                    group, adapter.max_items, upstream_id, time.time(), self._owner, self._lease_s
                )
                if not claimed:
                    break
                self._sending.add(upstream_id)
                renewal = asyncio.ensure_future(self._hold(upstream_id))
                try:
                    outbound = self._outbound(db.items_of_upstream(upstream_id))
                    remote_id = await adapter.submit(outbound, upstream_id)
                except ThriftyError as err:
                    log.warning(
                        "submitting a %s batch failed (%s); retrying later", group.provider, err.message
                    )
                    db.requeue_unsent(upstream_id)
                    self._submit_retry_at[key] = time.time() + self.service.settings.poll_interval_s
                    break
                finally:
                    renewal.cancel()
                    self._sending.discard(upstream_id)
                db.mark_submitted(upstream_id, remote_id, time.time() + self.service.settings.poll_interval_s)
                if claimed < adapter.max_items:
                    break

    async def _hold(self, upstream_id: str) -> None:
        """Renew the lease of a provider batch while it is being sent (a large upload takes a while):
        another process must not take it for abandoned and look for it meanwhile."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            self.service.db.lease_upstream(upstream_id, self._owner, time.time(), self._lease_s)

    def _outbound(self, items: Iterable[Item]) -> Iterator[Outbound]:
        targets = self.service.gateway.targets
        return (Outbound(i.request_id, targets[i.model or ""], i.body or {}) for i in items)

    # -- poll and collect -------------------------------------------------------------------

    async def _poll(self, now: float) -> None:
        db = self.service.db
        for upstream in db.upstream_batches(["submitted"]):
            if upstream.next_poll_at > now or upstream.remote_id is None:
                continue
            adapter = self.service.adapters.get(upstream.provider)
            if adapter is None or not db.lease_upstream(
                upstream.upstream_id, self._owner, now, self._lease_s
            ):
                continue  # another process polls it (its lease); a dead one's runs out
            try:
                state = await adapter.poll(upstream.remote_id)
                if not state.ended:
                    db.poll_later(
                        upstream.upstream_id,
                        time.time() + self.service.settings.poll_interval_s,
                        state.status,
                    )
                    continue
                await self._collect(upstream, state.status)
            except ThriftyError as err:
                log.warning("polling provider batch %s: %s", upstream.remote_id, err.message)
                db.poll_later(
                    upstream.upstream_id, time.time() + self.service.settings.poll_interval_s, "poll_error"
                )

    async def _collect(self, upstream: UpstreamBatch, remote_status: str) -> None:
        """Record every result of an ended provider batch, a page at a time (memory does not grow
        with the batch); an item the provider returned nothing for ends failed (or expired)."""
        db = self.service.db
        assert upstream.remote_id is not None
        jobs: set[str] = set()
        page: list[Outcome] = []
        adapter = self.service.adapters[upstream.provider]
        items = self._outbound(db.items_of_upstream(upstream.upstream_id, "submitted"))
        async for outcome in adapter.results(upstream.remote_id, items):
            page.append(outcome)
            if len(page) >= _CHUNK:
                jobs |= await self._record_page(page)
                page = []
                db.lease_upstream(upstream.upstream_id, self._owner, time.time(), self._lease_s)
        jobs |= await self._record_page(page)
        if (
            upstream.adopted
            and _count(db.items_of_upstream(upstream.upstream_id, "submitted")) == upstream.items
        ):
            # Adopted after a crash, and not one of its items came back: the provider's batch was
            # another one of the same size after all, so these were never sent. Queued again.
            log.warning(
                "provider batch %s held none of %s's items: queued again",
                upstream.remote_id,
                upstream.upstream_id,
            )
            db.requeue_unsent(upstream.upstream_id)
            return
        missing = Outcome(
            "",
            "expired" if remote_status == "expired" else "failed",
            error=_error(
                "missing_result", f"{upstream.provider} returned no result for it ({remote_status})"
            ),
        )
        page = [
            replace(missing, request_id=i.request_id)
            for i in db.items_of_upstream(upstream.upstream_id, "submitted")
        ]
        jobs |= await self._record_page(page)
        db.finish_upstream(upstream.upstream_id, remote_status, time.time())
        for job_id in jobs:
            self._advance(job_id)

    async def _record_page(self, outcomes: list[Outcome]) -> set[str]:
        items = self.service.db.get_items(o.request_id for o in outcomes)
        results = [
            self._result(item, o)
            for o in outcomes
            if (item := items.get(o.request_id)) is not None and item.state == "submitted"
        ]  # not ours, or recorded before a restart: left alone
        await self._record(results)
        return {item.job_id for item in items.values()}

    def _to_recordings(self, results: list[ItemResult]) -> None:
        """Deferred requests a route records: their answer, or how they failed, now it is known."""
        recorder = self.service.gateway.recorder
        if not recorder.active:
            return
        for r in results:
            done = r.state == "done"
            error = None
            if not done:
                error = {
                    "type": f"batch_{r.state}",
                    "code": (r.error or {}).get("code"),
                    "status": r.status_code,
                    "message": (r.error or {}).get("message") or r.entry.error,
                }
            recorder.deferred_result(r.request_id, r.entry.route, r.response if done else None, error)

    async def _record(self, results: list[ItemResult]) -> None:
        recorded = set(self.service.db.record_results(results, time.time()))
        self._to_recordings([r for r in results if r.request_id in recorded])
        for r in results:
            if r.request_id in recorded:
                e = r.entry
                await self.service.reservations.settle(
                    r.request_id,
                    e.cost_usd,
                    e.usage.input_tokens + e.usage.output_tokens,
                    r.owner,
                )

    def _result(self, item: Item, outcome: Outcome) -> ItemResult:
        job = self._job(item.job_id)
        pricer = self.service.pricer
        usage = outcome.usage or Usage()
        assert item.model is not None
        ok = outcome.kind == "done"
        cost = pricer.cost(item.model, usage) if outcome.usage is not None else Decimal(0)
        realtime = pricer.realtime(item.model, usage) if outcome.usage is not None else Decimal(0)
        message = None
        if not ok:
            message = _message(outcome)
        entry = result_entry(
            item,
            job.tenant_id,
            job.tags,
            ok=ok,
            status_code=outcome.status_code or 0,
            usage=usage,
            cost=cost,
            realtime=realtime,
            error=message,
            ts=time.time(),
        )
        body = outcome.body
        if ok and body is not None and cost is not None:
            body = {**body, "thrifty": {"cost_usd": format(cost, "f"), "batch": True}}
        owner = (job.tenant_id, job.tags, item.route, item.created_at)
        return ItemResult(
            item.request_id, outcome.kind, outcome.status_code, body, outcome.error, entry, owner
        )

    def _advance(self, job_id: str) -> None:
        db = self.service.db
        job = db.get_job(job_id)
        if job is None:
            return
        new = next_status(job.status, db.item_counts(job_id))
        if new == job.status:
            return
        now = time.time()
        if new in ("completed", "expired"):
            db.set_job_status(job_id, "finalizing", now)
        db.set_job_status(job_id, new, now)
        self._jobs.pop(job_id, None)
        assert new in STATUS_TIME


def _count(items: Iterable[Item]) -> int:
    return sum(1 for _ in items)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _message(outcome: Outcome) -> str:
    if outcome.error is not None:
        return str(outcome.error.get("message"))
    err = (outcome.body or {}).get("error")
    if isinstance(err, dict) and err.get("message"):
        return f"HTTP {outcome.status_code}: {err['message']}"
    return f"HTTP {outcome.status_code}"


def _refused_item(job: JobRecord, err: LineError) -> NewItem:
    now = time.time()
    return NewItem(
        request_id=new_request_id(),
        job_id=job.job_id,
        line_no=err.line_no,
        custom_id=err.custom_id or f"line-{err.line_no}",
        state="failed",
        queue=job.job_id,
        created_at=now,
        flush_at=now,
        flush_size=1,
        error=_error(err.code, err.message),
    )
