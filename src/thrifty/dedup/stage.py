"""At-most-once generation per tenant.

With an `Idempotency-Key`, a repeat while the first request runs waits for it and gets the same
response; a repeat after it finished gets the stored result (for `idempotency.ttl_s`) without a
new call and without a charge, also after a restart: the result is in the durable
`IdempotencyStore` before the first response is released. A key that was running when its
gateway died is refused with a 409 until its lease ends, rather than generated twice; that lease
is short (`idempotency.flight_lease_s`) and renewed by a live owner while it generates, so a
dead owner's key is free again within one short lease. Without a key, identical in-flight
requests of one tenant are merged into one upstream call on routes that set `coalesce: true`. A
key reused with another body is refused (422), as payment APIs do. A failed leader stores
nothing, so a retry runs anew.

Waiting for a running generation is in-process (`Flights`, futures on this event loop); the
durable record is what answers across restarts and replicas. Flights are bounded by
`idempotency.max_entries` and a running one is never dropped: a new key past the bound is refused
(503), a request that would only have been coalesced simply runs on its own. With a shared store
(Redis, several replicas), a repeat on another replica waits for the running generation's result
(polling the store) rather than taking a 409; if its leader died, its short lease is no longer
renewed and ends, and one waiting replica generates.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from thrifty.dedup.heartbeat import Heartbeat
from thrifty.errors import (
    IdempotencyCapacity,
    IdempotencyConflict,
    IdempotentRequestInProgress,
    IdempotentRequestUnfinished,
    SharedStateUnavailable,
)
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.settings import IdempotencySettings, RouteSettings
from thrifty.shapes import as_chunks, as_completion, stream_from
from thrifty.stores.ports import IdempotencyKey, IdempotencyStore, SharedFlights, StoredResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """A finished generation, as the waiters of its flight are answered."""

    body: dict[str, Any] | None = None
    chunks: list[StreamChunk] | None = None
    cost_usd: Decimal | None = None


@dataclass(slots=True)
class Flight:
    fingerprint: str
    future: asyncio.Future[Outcome]


@dataclass(slots=True)
class Flights:
    """The generations running in this process, by key, for requests that wait on them."""

    max_running: int
    running: dict[tuple[str, ...], Flight] = field(default_factory=dict)

    def get(self, key: tuple[str, ...]) -> Flight | None:
        return self.running.get(key)

    def begin(self, key: tuple[str, ...], fingerprint: str) -> Flight | None:
        """The one flight for `key` (callers checked `get` first); None when the table is full."""
        if len(self.running) >= self.max_running:
            return None
        flight = Flight(fingerprint, asyncio.get_running_loop().create_future())
        self.running[key] = flight
        return flight

    def finish(self, key: tuple[str, ...], flight: Flight, outcome: Outcome) -> None:
        self._drop(key, flight)
        if not flight.future.done():
            flight.future.set_result(outcome)

    def fail(self, key: tuple[str, ...], flight: Flight, error: BaseException) -> None:
        self._drop(key, flight)
        if not flight.future.done():
            flight.future.set_exception(error)
            flight.future.exception()  # retrieved here: waiters are optional

    def _drop(self, key: tuple[str, ...], flight: Flight) -> None:
        if self.running.get(key) is flight:
            del self.running[key]


_DELIVERY_FIELDS = frozenset({"stream", "stream_options"})


def fingerprint(ctx: RequestContext) -> str:
    """The generation asked for; how it is delivered (streamed or not) does not make it another."""
    sent = ctx.client_body if ctx.client_body is not None else ctx.body
    body = {k: v for k, v in sent.items() if k not in _DELIVERY_FIELDS}
    return hashlib.sha256(orjson.dumps([ctx.requested_model, body], option=orjson.OPT_SORT_KEYS)).hexdigest()


_WAIT_POLL_S = 0.05  # how often a replica looks for another replica's result
# A coalesced result waits this long for the waiters on other replicas (they poll every 50 ms);
# only they read it: a request that arrives after the flight ended starts a new one.
_FLIGHT_RESULT_TTL_S = 10.0


class Deduplicate:
    def __init__(
        self,
        settings: IdempotencySettings,
        routes: Mapping[str, RouteSettings],
        store: IdempotencyStore,
        *,
        wait_elsewhere: bool = False,
        shared_flights: SharedFlights | None = None,
    ) -> None:
        self._settings = settings
        # Running records are written with the short lease their live owner renews (heartbeat.py).
        self._lease_s = settings.running_lease_s
        # Shared store (several replicas): a key running under another owner is most likely being
        # generated by a live replica, so wait for its result (or the lease's end) instead of a 409.
        self._wait_elsewhere = wait_elsewhere
        self._flights = Flights(settings.max_entries)
        self._store = store
        # Several replicas: coalescing goes through the shared state too (a round trip to join,
        # paid only by requests on coalescing routes); without it, per process.
        self._shared_flights = shared_flights
        self._coalesce = frozenset(name for name, r in routes.items() if r.coalesce)
        # This gateway's running records: a restarted process is another owner, so what its
        # previous life left running is refused until the lease ends, not taken over.
        self._owner = os.urandom(8).hex()
        self._background: set[asyncio.Task[None]] = set()

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        idem = ctx.tags.idempotency_key
        if idem is not None:
            key: tuple[str, ...] = (ctx.tags.tenant_id, "key", idem)
        elif ctx.route is not None and ctx.route in self._coalesce:
            # An experiment's arms answer the same question differently: never one arm for another.
            # Nor do tasks: a task may be pinned to another model or drive a trained router, so an
            # identical body of another task (or none) is another generation.
            key = (ctx.tags.tenant_id, "flight", fingerprint(ctx), ctx.variant or "", ctx.tags.task or "")
        else:
            return await call_next(ctx)
        request_fingerprint = fingerprint(ctx)
        flight = self._flights.get(key)
        if flight is not None:
            if flight.fingerprint != request_fingerprint:
                raise _conflict(idem)
            try:
                outcome = await asyncio.shield(flight.future)
            except IdempotentRequestUnfinished:
                if idem is not None:
                    raise  # its client retries with the key (the first generation was cut)
                # A coalesced leader whose own client left: this request sent no key to retry with,
                # and it was never its to lose. The first such waiter leads anew, the others join it.
                return await self(ctx, call_next)
            return _replay(ctx, outcome)
        flight = self._flights.begin(key, request_fingerprint)  # no await since get: one leader
        if flight is None:
            if idem is None:
                return await call_next(ctx)  # coalescing is an optimisation: run on our own
            raise IdempotencyCapacity(
                f"{self._settings.max_entries} requests with an Idempotency-Key are running on this "
                "gateway (idempotency.max_entries); retry in a moment"
            )
        if idem is None:
            if self._shared_flights is not None:
                return await self._fly_shared(ctx, call_next, key, flight)
            return await self._lead(ctx, call_next, key, flight, None)
        durable = IdempotencyKey(ctx.tags.tenant_id, idem)
        try:
            record = await self._store.claim(
                durable,
                request_fingerprint,
                owner=self._owner,
                now=time.time(),
                lease_s=self._lease_s,
            )
            while self._wait_elsewhere and record is not None and record.result is None:
                if record.fingerprint != request_fingerprint:
                    break
                await asyncio.sleep(_WAIT_POLL_S)
                # None once the lease has ended: the leader died, and this request generates.
                record = await self._store.claim(
                    durable,
                    request_fingerprint,
                    owner=self._owner,
                    now=time.time(),
                    lease_s=self._lease_s,
                )
            if record is not None:
                if record.fingerprint != request_fingerprint:
                    raise _conflict(idem)
                if record.result is None:
                    wait = max(1.0, record.expires_at - time.time())
                    raise IdempotentRequestInProgress(
                        f"the first request with Idempotency-Key {idem!r} was still running when the "
                        f"gateway stopped, or runs elsewhere; retry in {wait:.0f}s to get its result "
                        "(a new generation is allowed only once its lease has ended)",
                        retry_after_s=wait,
                    )
        except BaseException as err:
            self._flights.fail(key, flight, err)
            raise
        if record is not None:
            assert record.result is not None
            outcome = Outcome(body=record.result.body, cost_usd=record.result.cost_usd)
            self._flights.finish(key, flight, outcome)
            return _replay(ctx, outcome)
        return await self._lead(ctx, call_next, key, flight, durable)

    async def _fly_shared(
        self, ctx: RequestContext, call_next: Handler, key: tuple[str, ...], flight: Flight
    ) -> Result:
        """Join the flight across replicas: lead it, or wait for the replica that leads it (polling;
        if that leader dies, its lease ends and a waiter leads). Local duplicates wait on this
        request's local flight meanwhile, at no round trip of their own."""
        assert self._shared_flights is not None
        shared = (key[0], ":".join(key[2:]))
        joined: StoredResult | bool
        try:
            joined = await self._shared_flights.join(
                *shared, owner=self._owner, lease_s=self._lease_s, waiting=False
            )
        except SharedStateUnavailable as err:
            # Coalescing is an optimisation: without Redis this replica runs the request itself.
            log.warning("coalescing on this replica only: %s", err.message)
            return await self._lead(ctx, call_next, key, flight, None)
        except BaseException as err:
            self._flights.fail(key, flight, err)
            raise
        try:
            waited_until = time.monotonic() + self._settings.lease_s
            while joined is False:
                await asyncio.sleep(_WAIT_POLL_S)
                try:
                    joined = await self._shared_flights.join(
                        *shared, owner=self._owner, lease_s=self._lease_s, waiting=True
                    )
                except SharedStateUnavailable as err:
                    # A poll that failed: the flight still runs elsewhere; look again, up to a lease.
                    if time.monotonic() > waited_until:
                        log.warning("coalescing on this replica only: %s", err.message)
                        return await self._lead(ctx, call_next, key, flight, None)
        except BaseException as err:
            self._flights.fail(key, flight, err)
            raise
        if isinstance(joined, StoredResult):
            outcome = Outcome(body=joined.body, cost_usd=joined.cost_usd)
            self._flights.finish(key, flight, outcome)
            return _replay(ctx, outcome)
        return await self._lead(ctx, call_next, key, flight, None, shared)

    async def _lead(
        self,
        ctx: RequestContext,
        call_next: Handler,
        key: tuple[str, ...],
        flight: Flight,
        durable: IdempotencyKey | None,
        shared: tuple[str, str] | None = None,
    ) -> Result:
        beat = self._heartbeat(durable, shared)
        try:
            result = await call_next(ctx)
        except BaseException as err:
            _stop(beat)
            self._abandon(key, flight, durable, err, shared)
            raise
        if isinstance(result, Streamed):
            return Streamed(self._relay(ctx, key, flight, durable, result.chunks, shared, beat))
        _stop(beat)
        outcome = Outcome(body=result.body, cost_usd=_cost(ctx))
        await self._keep(durable, result.body, outcome.cost_usd, shared)
        self._flights.finish(key, flight, outcome)
        return result

    async def _relay(
        self,
        ctx: RequestContext,
        key: tuple[str, ...],
        flight: Flight,
        durable: IdempotencyKey | None,
        chunks: AsyncIterator[StreamChunk],
        shared: tuple[str, str] | None = None,
        beat: Heartbeat | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Relay the leader's stream, keeping its chunks; once it ended, store the result before the
        stream's end reaches the client (the server holds the last event until then)."""
        kept: list[StreamChunk] = []
        try:
            async for chunk in chunks:
                kept.append(chunk)
                yield chunk
        except BaseException as err:
            _stop(beat)
            await close_stream(chunks)
            self._abandon(key, flight, durable, err, shared)
            raise
        _stop(beat)
        await close_stream(chunks)
        outcome = Outcome(chunks=kept, cost_usd=_cost(ctx))
        await self._keep(durable, as_completion(kept), outcome.cost_usd, shared)
        self._flights.finish(key, flight, outcome)

    def _heartbeat(self, durable: IdempotencyKey | None, shared: tuple[str, str] | None) -> Heartbeat | None:
        """Renew this leader's running record while it generates (none to renew: nothing runs)."""
        renew: Callable[[], Awaitable[bool]]
        if durable is not None:
            store, owner, lease_s = self._store, self._owner, self._lease_s

            def renew() -> Awaitable[bool]:
                return store.renew(durable, owner=owner, now=time.time(), lease_s=lease_s)

            what = f"Idempotency-Key {durable.key!r}"
        elif shared is not None:
            assert self._shared_flights is not None
            flights, owner, lease_s = self._shared_flights, self._owner, self._lease_s

            def renew() -> Awaitable[bool]:
                return flights.renew(*shared, owner=owner, lease_s=lease_s)

            what = "a coalesced request"
        else:
            return None
        return Heartbeat(
            renew, lease_s=self._lease_s, hold_s=self._settings.lease_s, what=what, spawn=self._spawn
        )

    async def _keep(
        self,
        durable: IdempotencyKey | None,
        body: dict[str, Any],
        cost: Decimal | None,
        shared: tuple[str, str] | None = None,
    ) -> None:
        """Store the result before it is answered. The generation is made and paid for: should the
        store fail, it is answered all the same (an error would only make the client generate again),
        and its running record stays until the lease ends, refusing repeats elsewhere meanwhile."""
        if shared is not None:
            assert self._shared_flights is not None
            try:
                await self._shared_flights.publish(
                    *shared, StoredResult(body, cost), owner=self._owner, ttl_s=_FLIGHT_RESULT_TTL_S
                )
            except SharedStateUnavailable as err:  # its waiters elsewhere lead once the lease ends
                log.warning("could not publish a coalesced result: %s", err.message)
        if durable is None:
            return
        try:
            await self._store.complete(
                durable,
                StoredResult(body, cost),
                owner=self._owner,
                now=time.time(),
                ttl_s=self._settings.ttl_s,
            )
        except Exception:
            log.exception("could not store the result of Idempotency-Key %r", durable.key)

    def _abandon(
        self,
        key: tuple[str, ...],
        flight: Flight,
        durable: IdempotencyKey | None,
        err: BaseException,
        shared: tuple[str, str] | None = None,
    ) -> None:
        """The leader ended without a result: waiters get the error, and the running record goes,
        so a retry generates anew. Not awaited: it may run while the request is being cancelled."""
        if isinstance(err, GeneratorExit | asyncio.CancelledError):
            err = IdempotentRequestUnfinished("the first request with this key did not finish; retry it")
        self._flights.fail(key, flight, err)
        if durable is not None:
            self._spawn(self._store.release(durable, owner=self._owner))
        if shared is not None:
            assert self._shared_flights is not None
            self._spawn(self._shared_flights.release(*shared, owner=self._owner))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The record stays running until its lease ends: repeats get a 409 meanwhile.
            log.warning("could not release an idempotency record: %s", task.exception())


def _stop(beat: Heartbeat | None) -> None:
    if beat is not None:
        beat.stop()


def _conflict(idem: str | None) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"Idempotency-Key {idem!r} was already used with a different request; "
        "use a new key for a new request",
        param="Idempotency-Key",
    )


def _cost(ctx: RequestContext) -> Decimal | None:
    total = Decimal(0)
    for attempt in ctx.attempts:
        if attempt.cost_usd is None:
            return None
        total += attempt.cost_usd
    return total


def _replay(ctx: RequestContext, outcome: Outcome) -> Result:
    # No upstream call for this request: its ledger row has no attempts and costs nothing; what
    # it would have cost is recorded as saved.
    ctx.saved_usd = outcome.cost_usd
    ctx.deduplicated = True
    ctx.cache = "dedup"
    if outcome.chunks is not None:
        if ctx.stream:
            return Streamed(stream_from(outcome.chunks))
        return Completion(as_completion(outcome.chunks), None)
    assert outcome.body is not None
    if ctx.stream:
        return Streamed(stream_from(as_chunks(outcome.body, with_usage=ctx.client_wants_usage)))
    return Completion(outcome.body, None)
