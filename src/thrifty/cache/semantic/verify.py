"""Live verification of semantic hits: sampled shadow calls, near-miss checks and user feedback.

On a route whose semantic cache has ``verify``, every partition keeps an ``adaptive.PartitionState``
and its threshold comes from ``adaptive.bound`` instead of the shipped rule alone. What feeds it:

* **shadow calls**: a sampled share of paraphrase hits (``adaptive.sample_rate``) is also sent
  upstream *after* the cached answer has been returned, as a background task; the fresh answer is
  compared with the cached one (``compare``) and the call is one ledger entry of its own,
  ``<request_id>.verify``, whose attempts have ``role: verify`` and its cost. A wrong hit's fresh
  answer is stored as an entry, so the next paraphrase finds the right answer beside the wrong one;
* **near misses**: a lookup whose candidate scored below the threshold goes upstream anyway; its
  fresh answer is compared with the candidate it was not given, at no cost (this is how a threshold
  learns it may come down);
* **evidence**: with ``compare: evidence`` a request that names its evidence ids is checked before
  it is served (the candidate's answer id is the hash of its evidence): a mismatch is a detected
  wrong hit and a miss;
* **feedback**: ``feedback(tenant, request_id, wrong)``, from the ``x-thrifty-cache-wrong`` header on
  a later request or the feedback endpoint; each hit's feedback counts once, and only the tenant
  whose request it was can give it. Hits are written to ``semantic_hits`` (``hit_log``) in batches
  off the response path, so feedback on one is matched after a restart, on another replica, and
  however many hits came since (for ``semantic.hit_retention_s``); a hit not written yet is matched
  in memory.

State is in memory and written to ``semantic_partition_state`` (``state_store``) every few seconds
and at shutdown, so ``thrifty cache stats`` and a restart see it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from decimal import Decimal
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import orjson

from thrifty.cache.semantic.adaptive import (
    Bound,
    PartitionState,
    Policy,
    answer_threshold,
    bound,
    merged,
    sample_rate,
)
from thrifty.cache.semantic.compare import same_answer
from thrifty.cache.semantic.hit_log import HitLog, HitRecord
from thrifty.cache.semantic.judge import judge_body, judge_context, parse_verdict
from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
from thrifty.errors import ThriftyError
from thrifty.pipeline import Completion, Handler, RequestContext
from thrifty.settings import CacheVerifySettings
from thrifty.shapes import last_user_message_text
from thrifty.types import ModelTarget, RequestStatus

if TYPE_CHECKING:
    from thrifty.stores.postgres_semantic_state import PostgresPartitionStateStore

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 2.0
# Hits held in memory for feedback until they are written (oldest forgotten first when the store
# does not take them, or with no store).
REMEMBER_HITS = 50_000
HIT_WRITE_PATIENCE = 10  # busy flushes in a row before the log says so
# Hits are written in batches of at most this many; stored hits older than the retention go, at
# most this often.
HIT_BATCH = 2_000
PRUNE_EVERY_S = 60.0
HIT_RETENTION_S = 7 * 86400.0
HIT_MAX_ROWS = 1_000_000
REVERDICT_LOOKUPS = 64
# Rows of the shared store written this long before the last one seen are read again (replicas'
# clocks differ; reading a row twice changes nothing).
_CLOCK_MARGIN_S = 5.0
# Partition states kept in memory at once.
MAX_STATES = 20_000

# Writes one ledger entry for a finished shadow call (the gateway's accountant).
Recorder = Callable[[RequestContext, RequestStatus, int, "str | None"], Awaitable[None]]
# Stores a fresh answer the shadow call found to differ, as an entry for the query.
OnWrong = Callable[[RequestContext, dict[str, Any]], None]
# The model target of a route (the gateway's resolver), for the judge route's calls.
RouteTarget = Callable[[str], ModelTarget]


def policy_of(settings: CacheVerifySettings) -> Policy:
    return Policy(
        error_bound=settings.error_bound,
        z=NormalDist().inv_cdf(settings.confidence),
        min_rate=settings.min_rate,
        max_rate=settings.max_rate,
    )


class Verifier:
    def __init__(
        self,
        settings: Mapping[str, CacheVerifySettings],
        *,
        rng: random.Random | None = None,
        remember_hits: int = REMEMBER_HITS,
        flush_every_s: float = FLUSH_EVERY_S,
        max_states: int = MAX_STATES,
        hit_retention_s: float = HIT_RETENTION_S,
        hit_max_rows: int = HIT_MAX_ROWS,
    ) -> None:
        self._settings = dict(settings)
        self._policies = {route: policy_of(s) for route, s in settings.items()}
        self._rng = rng or random.Random()
        # Most recently used last; bounded (per-user partitions are many): the least recently used
        # is written and dropped, and read back from the store when its partition is asked again.
        self._states: OrderedDict[str, PartitionState] = OrderedDict()
        self._max_states = max_states
        # partition -> (shipped threshold, verified outcomes, lookups, verdict) it was computed at
        self._verdicts: dict[str, tuple[float, int, int, Bound]] = {}
        self._dirty: set[str] = set()
        self._flushed = 0.0
        self._flush_every = flush_every_s
        self._store: SqlitePartitionStateStore | None = None
        # (tenant, request id) -> hit, served and not yet written to the hit log (with none: the
        # last ``remember_hits``).
        self._hits: OrderedDict[tuple[str, str], HitRecord] = OrderedDict()
        self._remember = remember_hits
        self._hit_log: HitLog | None = None
        self._hit_task: asyncio.Task[None] | None = None
        # The hits of the write under way, and its end: feedback on one waits for it, then claims
        # the row (so no other replica can claim it between the commit and this one's memory).
        self._in_write: set[tuple[str, str]] = set()
        self._written = asyncio.Event()
        self._retention_s = hit_retention_s
        self._hit_max_rows = hit_max_rows
        self._pruned_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._claims: set[asyncio.Task[bool]] = set()
        self.recorder: Recorder | None = None
        self.route_target: RouteTarget | None = None
        # PostgreSQL: the replicas' shared states, the rows as this replica last read them, and
        # the newest row time seen.
        self._shared: PostgresPartitionStateStore | None = None
        self._base: dict[str, PartitionState] = {}
        self._seen_at = 0.0
        self._sync_task: asyncio.Task[None] | None = None

    def covers(self, route: str) -> bool:
        return route in self._settings

    def method(self, route: str) -> str:
        return self._settings[route].compare

    def start(self, store: SqlitePartitionStateStore, hits: HitLog | None = None) -> None:
        self._store = store
        routes = set(self._settings)
        rows = [(p, s) for p, s in store.load(limit=self._max_states) if s.route in routes]
        self._states = OrderedDict(reversed(rows))  # the store gives the newest first
        self._start_hits(hits)

    async def start_shared(self, store: PostgresPartitionStateStore, hits: HitLog | None = None) -> None:
        """Load the replicas' shared states and keep them in step (``sync``) every few seconds."""
        self._shared = store
        self._start_hits(hits)
        routes = set(self._settings)
        rows = [r for r in await store.load(limit=self._max_states) if r[1].route in routes]
        self._states = OrderedDict((p, s) for p, s, _ in reversed(rows))
        self._base = {p: PartitionState.from_dict(s.to_dict()) for p, s, _ in rows}
        self._seen_at = max((t for _, _, t in rows), default=0.0)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self._flush_every, 0.05))
            try:
                await self.sync()
            except Exception as err:  # noqa: BLE001 - the database is away: the deltas wait, retry
                log.warning("semantic cache partition states not synced: %r", err)

    async def sync(self) -> None:
        """Send what this replica learned since it last read each row, and take in what the others
        wrote meanwhile (``PostgresPartitionStateStore``)."""
        store = self._shared
        if store is None:
            return
        dirty, self._dirty = self._dirty, set()
        sent = [
            (p, PartitionState.from_dict(self._states[p].to_dict()), self._base.get(p))
            for p in dirty
            if p in self._states
        ]
        try:
            written = await store.merge(sent, time.time())
        except BaseException:
            self._dirty |= dirty
            raise
        for partition, snapshot, _ in sent:
            row = written.get(partition)
            if row is not None:
                self._adopt(partition, row, snapshot)
        changed = await store.changed_since(self._seen_at - _CLOCK_MARGIN_S)
        routes = set(self._settings)
        for partition, row, at in changed:
            self._seen_at = max(self._seen_at, at)
            if row.route in routes and partition not in written:
                self._adopt(partition, row, self._base.get(partition))

    def _adopt(self, partition: str, row: PartitionState, base: PartitionState | None) -> None:
        """The shared row, plus what this replica learned since ``base`` and has not sent yet."""
        local = self._states.get(partition)
        if local is not None and local.tenant_id != row.tenant_id:
            return
        self._states[partition] = (
            row if local is None else merged(row, local, base or PartitionState(local.tenant_id, local.route))
        )
        self._base[partition] = PartitionState.from_dict(row.to_dict())
        self._verdicts.pop(partition, None)

    async def stop_shared(self) -> None:
        """Stop syncing, after a last sync of what is still unsent."""
        if self._sync_task is None:
            return
        self._sync_task.cancel()
        await asyncio.gather(self._sync_task, return_exceptions=True)
        self._sync_task = None
        try:
            await self.sync()
        except Exception as err:  # noqa: BLE001 - shutting down: log, never raise
            log.warning("semantic cache partition states not synced at shutdown: %r", err)

    def states(self) -> list[tuple[str, PartitionState]]:
        """Copies of the partition states in memory (for the gateway's metrics and tests)."""
        return [(p, PartitionState.from_dict(s.to_dict())) for p, s in self._states.items()]

    def state(self, partition: str, tenant_id: str, route: str) -> PartitionState:
        state = self._states.get(partition)
        if state is not None:
            self._states.move_to_end(partition)
            return state
        stored = self._store.get(partition) if self._store is not None else None
        state = (
            stored
            if stored is not None and stored.tenant_id == tenant_id
            else PartitionState(tenant_id, route)
        )
        self._states[partition] = state
        while len(self._states) > self._max_states:
            oldest, evicted = self._states.popitem(last=False)
            self._verdicts.pop(oldest, None)
            self._base.pop(oldest, None)
            if oldest in self._dirty and self._store is not None:
                self._store.save([(oldest, evicted)], time.time())
                self._dirty.discard(oldest)
        return state

    def verdict(self, partition: str, tenant_id: str, route: str, shipped: float) -> Bound:
        """The partition's threshold now. Recomputed when a verified outcome arrived, the shipped
        threshold moved (the partition grew past a size step) or every ``REVERDICT_LOOKUPS`` lookups
        (their counts only reweigh the bins): the lookup path pays a dict read, not the bound."""
        state = self.state(partition, tenant_id, route)
        observed = sum(state.right) + sum(state.wrong)
        cached = self._verdicts.get(partition)
        if (
            cached is not None
            and cached[0] == shipped
            and cached[1] == observed
            and state.semantic_lookups - cached[2] < REVERDICT_LOOKUPS
        ):
            return cached[3]
        verdict = bound(state, shipped, self._policies[route])
        self._verdicts[partition] = (shipped, observed, state.semantic_lookups, verdict)
        return verdict

    def threshold(self, partition: str, route: str, verdict: Bound, answer_id: str) -> float:
        """The score ``answer_id`` needs here: the partition's, raised for an answer often wrong."""
        state = self._states[partition]
        return answer_threshold(state, answer_id, verdict.threshold, self._policies[route])

    def looked_up(self, partition: str, tenant_id: str, route: str, score: float | None) -> None:
        state = self.state(partition, tenant_id, route)
        state.semantic_lookups += 1
        if score is not None and score > 0:
            state.looked_up(score)
        self._touch(partition)

    def served(
        self,
        ctx: RequestContext,
        partition: str,
        score: float | None,
        verdict: Bound | None,
        answer_id: str,
    ) -> bool:
        """A hit was served: remember it for feedback; True when it is to be verified by a shadow call."""
        assert ctx.route is not None
        state = self.state(partition, ctx.tags.tenant_id, ctx.route)
        state.served(repeat=score is None, saved=ctx.saved_usd)
        tenant = ctx.tags.tenant_id
        self._hits[(tenant, ctx.request_id)] = HitRecord(
            tenant, ctx.request_id, ctx.route, partition, score, answer_id, ctx.ts
        )
        while len(self._hits) > self._remember:
            self._hits.popitem(last=False)
        self._touch(partition)
        if score is None or verdict is None or (self.method(ctx.route) == "evidence" and ctx.tags.evidence):
            return False  # repeats are not sampled; evidence was checked before serving
        if len(self._tasks) >= self._settings[ctx.route].max_in_flight:
            return False
        return self._rng.random() < sample_rate(state, verdict, self._policies[ctx.route])

    def observe(
        self,
        partition: str,
        tenant_id: str,
        route: str,
        score: float,
        correct: bool,
        answer_id: str,
        *,
        near_miss: bool,
    ) -> None:
        """A verdict reached without a shadow call (a near miss's fresh answer, an evidence check)."""
        state = self.state(partition, tenant_id, route)
        state.observe(score, correct, answer_id)
        if near_miss:
            state.near_miss_checks += 1
        else:
            state.verifications += 1
            state.verified_wrong += not correct
        self._touch(partition)

    async def feedback(self, tenant_id: str, request_id: str, wrong: bool) -> bool:
        """Feedback on an earlier answer; True when it named a semantic hit of this tenant's not yet
        judged (a wrong one tightens that partition's threshold like a failed verification). A hit
        not written yet is judged in memory (it is written judged: nobody else can see it before);
        a written one is claimed in the hit log, which says whether it was judged already (here,
        on another replica, or before a restart)."""
        key = (tenant_id, request_id)
        while key in self._in_write:
            await self._written.wait()
        hit = self._hits.get(key)
        if hit is not None:
            if hit.feedback:
                return False
            hit.feedback = True
            self._count_feedback(hit, wrong)
            return True
        if self._hit_log is None or not self._settings:
            return False
        try:
            claimed = await self._hit_log.claim(tenant_id, request_id)
        except Exception as err:  # noqa: BLE001 - the store is away or busy: the feedback is lost
            log.warning("semantic cache feedback on %s not applied: %r", request_id, err)
            return False
        if claimed is None or not self.covers(claimed.route):
            return False
        self._count_feedback(claimed, wrong)
        return True

    def feedback_soon(self, tenant_id: str, request_id: str, wrong: bool) -> None:
        """``feedback`` in the background: a request carrying feedback does not wait for the store."""
        if not self._settings:
            return  # no route verifies: nothing to match, and nothing to spawn
        task = asyncio.get_running_loop().create_task(self.feedback(tenant_id, request_id, wrong))
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)

    def _count_feedback(self, hit: HitRecord, wrong: bool) -> None:
        state = self.state(hit.partition, hit.tenant_id, hit.route)
        state.feedback += 1
        state.feedback_wrong += wrong
        if hit.score is not None:
            state.observe(hit.score, not wrong, hit.answer_id)
        self._touch(hit.partition)

    def _start_hits(self, hits: HitLog | None) -> None:
        self._hit_log = hits
        if hits is not None and self._settings:
            self._hit_task = asyncio.get_running_loop().create_task(self._write_hits_forever())

    async def _write_hits_forever(self) -> None:
        failed = 0  # writes failed in a row
        while True:
            await asyncio.sleep(max(self._flush_every, 0.05))
            try:
                await self.write_hits()
                failed = 0
            except Exception as err:  # noqa: BLE001 - busy or away: the hits wait in memory, retry
                failed += 1
                # A busy SQLite lock (the ledger or a fold writing) is routine and the next flush
                # retries; say so only when it lasts, or when the store is failing otherwise.
                busy = isinstance(err, sqlite3.OperationalError) and "locked" in str(err)
                if not busy or failed == HIT_WRITE_PATIENCE:
                    log.warning(
                        "semantic cache hits not written yet (%d tries): %r; %d wait in memory",
                        failed,
                        err,
                        len(self._hits),
                    )

    async def write_hits(self, now: float | None = None) -> None:
        """Write the hits served since the last write (in batches, each all or nothing), and forget
        stored hits older than the retention every ``PRUNE_EVERY_S``."""
        log_ = self._hit_log
        if log_ is None:
            return
        while self._hits and not self._in_write:
            batch = list(self._hits.items())[:HIT_BATCH]
            self._in_write = {key for key, _ in batch}
            self._written = asyncio.Event()
            try:
                await log_.write([hit for _, hit in batch])
                for key, _ in batch:
                    self._hits.pop(key, None)
            finally:
                self._in_write = set()
                self._written.set()
            if len(batch) < HIT_BATCH:
                break
        now = time.time() if now is None else now
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            await log_.prune(now - self._retention_s, self._hit_max_rows)

    async def stop_hits(self) -> None:
        """Stop the periodic writes, after a last write of the hits still held (shutdown)."""
        if self._hit_task is None:
            return
        self._hit_task.cancel()
        await asyncio.gather(self._hit_task, return_exceptions=True)
        self._hit_task = None
        try:
            await self.write_hits()
        except Exception as err:  # noqa: BLE001 - shutting down: log, never raise
            log.warning("semantic cache hits not written at shutdown (%d): %r", len(self._hits), err)

    def shadow(
        self,
        ctx: RequestContext,
        call_next: Handler,
        partition: str,
        score: float,
        answer_id: str,
        cached: dict[str, Any],
        on_wrong: OnWrong,
    ) -> None:
        """Send the request upstream in the background and judge the cached answer by the fresh one."""
        task = asyncio.get_running_loop().create_task(
            self._shadow(shadow_context(ctx), call_next, partition, score, answer_id, cached, on_wrong)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(
        self,
        ctx: RequestContext,
        call_next: Handler,
        partition: str,
        score: float,
        answer_id: str,
        cached: dict[str, Any],
        on_wrong: OnWrong,
    ) -> None:
        assert ctx.route is not None
        status: RequestStatus = "ok"
        http_status, error = 200, None
        fresh: dict[str, Any] | None = None
        try:
            result = await call_next(ctx)
            if isinstance(result, Completion):
                fresh = result.body
        except ThriftyError as err:
            status, http_status, error = "error", err.status, err.message
            log.info("semantic cache verification of %s failed: %s", ctx.request_id, err.message)
        except Exception as err:  # a bug must not kill the loop's task silently
            status, http_status, error = "error", 500, f"internal error: {type(err).__name__}: {err}"
            log.exception("semantic cache verification of %s failed", ctx.request_id)
        ctx.attempts = [replace(a, role="verify") for a in ctx.attempts]
        cost = sum((a.cost_usd for a in ctx.attempts if a.cost_usd is not None), Decimal(0))
        if ctx.attempts and self.recorder is not None:
            await self.recorder(ctx, status, http_status, error)
        state = self.state(partition, ctx.tags.tenant_id, ctx.route)
        state.verify_cost_usd += cost
        correct: bool | None = True
        if fresh is not None:
            settings = self._settings[ctx.route]
            if settings.compare == "judge":
                assert settings.judge_route is not None
                correct = await self._judge(ctx, call_next, settings.judge_route, cached, fresh, state)
            else:
                correct = same_answer(settings.compare, cached, fresh, settings.json_field)
        if fresh is not None and correct is not None:
            state.verifications += 1
            state.verified_wrong += not correct
            state.observe(score, correct, answer_id)
        self._touch(partition)  # after every change: a flush clears the dirty mark
        if fresh is not None and correct is False:
            on_wrong(ctx, fresh)

    async def _judge(
        self,
        shadow: RequestContext,
        call_next: Handler,
        route: str,
        cached: dict[str, Any],
        fresh: dict[str, Any],
        state: PartitionState,
    ) -> bool | None:
        """Ask the judge route whether the cached and the fresh answer are the same; None: no
        verdict (the call failed or the reply was neither yes nor no). Its cost is the partition's."""
        assert self.route_target is not None
        question = last_user_message_text(shadow.body.get("messages")) or ""
        ctx = judge_context(
            shadow, route, self.route_target(route), question, judge_body(route, question, cached, fresh)
        )
        status: RequestStatus = "ok"
        http_status, error = 200, None
        verdict: bool | None = None
        try:
            result = await call_next(ctx)
            if isinstance(result, Completion):
                verdict = parse_verdict(result.body)
                if verdict is None:
                    log.info("semantic cache judge %s replied neither yes nor no: no verdict", ctx.request_id)
        except ThriftyError as err:
            status, http_status, error = "error", err.status, err.message
            log.info("semantic cache judge %s failed: %s", ctx.request_id, err.message)
        except Exception as err:  # a bug must not kill the loop's task silently
            status, http_status, error = "error", 500, f"internal error: {type(err).__name__}: {err}"
            log.exception("semantic cache judge %s failed", ctx.request_id)
        ctx.attempts = [replace(a, role="judge") for a in ctx.attempts]
        state.verify_cost_usd += sum((a.cost_usd for a in ctx.attempts if a.cost_usd is not None), Decimal(0))
        if ctx.attempts and self.recorder is not None:
            await self.recorder(ctx, status, http_status, error)
        return verdict

    async def drain(self) -> None:
        """Wait for the shadow calls and feedback claims in flight (shutdown, tests)."""
        while self._tasks or self._claims:
            await asyncio.gather(*list(self._tasks), *list(self._claims), return_exceptions=True)

    def _touch(self, partition: str) -> None:
        self._dirty.add(partition)
        now = time.monotonic()
        if now - self._flushed >= self._flush_every:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._store is None or not self._dirty:
            return
        dirty = [(p, self._states[p]) for p in self._dirty if p in self._states]
        if self._store.save(dirty, time.time()):
            self._dirty.clear()
        self._flushed = time.monotonic() if now is None else now


def shadow_context(ctx: RequestContext) -> RequestContext:
    """The hit's request again, for the upstream: not streamed, no idempotency key, its own id."""
    body = orjson.loads(orjson.dumps(ctx.body))  # as the stages above left it (context budgets)
    body["stream"] = False
    body.pop("stream_options", None)
    return RequestContext(
        request_id=f"{ctx.request_id}.verify",
        ts=time.time(),
        started=time.perf_counter(),
        tags=replace(ctx.tags, idempotency_key=None),
        body=body,
        body_bytes=ctx.body_bytes,
        requested_model=ctx.requested_model,
        stream=False,
        client_wants_usage=False,
        route=ctx.route,
        target=ctx.target,
        prompt_tokens=ctx.prompt_tokens,
        output_ceiling_implied=ctx.output_ceiling_implied,
    )


__all__ = ["Verifier", "policy_of", "shadow_context"]
