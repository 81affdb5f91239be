"""At-most-once generation per tenant.

With an `Idempotency-Key`, a repeat while the first request runs waits for it and gets the same
response; a repeat after it finished gets the stored result (for `idempotency.ttl_s`) without a
new call and without a charge. Without a key, identical in-flight requests of one tenant are
merged into one upstream call on routes that set `coalesce: true`. A key reused with another
body is refused (422), as payment APIs do. A failed leader stores nothing, so a retry runs anew.

The store is in-process and bounded; the Redis implementation of the same port will share it
across replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from thrifty.errors import IdempotencyConflict, IdempotentRequestUnfinished
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, relay_and_keep
from thrifty.settings import IdempotencySettings, RouteSettings
from thrifty.shapes import as_chunks, as_completion, stream_from
from thrifty.stores.ports import FlightStorePort


@dataclass(slots=True)
class Outcome:
    body: dict[str, Any] | None = None
    chunks: list[StreamChunk] | None = None
    cost_usd: Decimal | None = None


@dataclass(slots=True)
class Flight:
    fingerprint: str
    future: asyncio.Future[Outcome]
    expires: float = float("inf")


@dataclass(slots=True)
class FlightStore:
    """Running and finished flights by key, oldest dropped first beyond `max_entries`."""

    ttl_s: float
    max_entries: int
    flights: OrderedDict[tuple[str, ...], Flight] = field(default_factory=OrderedDict)

    def get(self, key: tuple[str, ...], now: float) -> Flight | None:
        flight = self.flights.get(key)
        if flight is not None and flight.expires <= now:
            del self.flights[key]
            return None
        return flight

    def begin(self, key: tuple[str, ...], fingerprint: str) -> Flight:
        flight = Flight(fingerprint, asyncio.get_running_loop().create_future())
        self.flights[key] = flight
        while len(self.flights) > self.max_entries:
            _, oldest = self.flights.popitem(last=False)
            if not oldest.future.done():
                oldest.future.cancel()  # its waiters retry as leaders; memory stays bounded
        return flight

    def finish(self, key: tuple[str, ...], flight: Flight, outcome: Outcome, *, keep: bool) -> None:
        if not flight.future.done():
            flight.future.set_result(outcome)
        if keep:
            flight.expires = time.monotonic() + self.ttl_s
        elif self.flights.get(key) is flight:
            del self.flights[key]

    def fail(self, key: tuple[str, ...], flight: Flight, error: BaseException) -> None:
        if self.flights.get(key) is flight:
            del self.flights[key]
        if not flight.future.done():
            flight.future.set_exception(error)
            flight.future.exception()  # retrieved here: waiters are optional


_DELIVERY_FIELDS = frozenset({"stream", "stream_options"})


def fingerprint(ctx: RequestContext) -> str:
    """The generation asked for; how it is delivered (streamed or not) does not make it another."""
    sent = ctx.client_body if ctx.client_body is not None else ctx.body
    body = {k: v for k, v in sent.items() if k not in _DELIVERY_FIELDS}
    return hashlib.sha256(orjson.dumps([ctx.requested_model, body], option=orjson.OPT_SORT_KEYS)).hexdigest()


class Deduplicate:
    def __init__(
        self,
        settings: IdempotencySettings,
        routes: Mapping[str, RouteSettings],
        store: FlightStorePort | None = None,
    ) -> None:
        self._store: FlightStorePort = store or FlightStore(settings.ttl_s, settings.max_entries)
        self._coalesce = frozenset(name for name, r in routes.items() if r.coalesce)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        idem = ctx.tags.idempotency_key
        if idem is not None:
            key: tuple[str, ...] = (ctx.tags.tenant_id, "key", idem)
        elif ctx.route is not None and ctx.route in self._coalesce:
            key = (ctx.tags.tenant_id, "flight", fingerprint(ctx))
        else:
            return await call_next(ctx)
        request_fingerprint = fingerprint(ctx)
        while True:
            flight = self._store.get(key, time.monotonic())
            if flight is None:
                break
            if flight.fingerprint != request_fingerprint:
                raise IdempotencyConflict(
                    f"Idempotency-Key {idem!r} was already used with a different request; "
                    "use a new key for a new request",
                    param="Idempotency-Key",
                )
            try:
                outcome = await asyncio.shield(flight.future)
            except asyncio.CancelledError:
                if flight.future.cancelled():
                    continue  # evicted while running: take the lead ourselves
                raise
            return _replay(ctx, outcome)
        flight = self._store.begin(key, request_fingerprint)
        keep = idem is not None
        try:
            result = await call_next(ctx)
        except BaseException as err:
            self._store.fail(key, flight, err)
            raise
        if isinstance(result, Completion):
            self._store.finish(key, flight, Outcome(body=result.body, cost_usd=_cost(ctx)), keep=keep)
            return result
        return Streamed(relay_and_keep(result.chunks, self._settle_flight(ctx, key, flight, keep)))

    def _settle_flight(
        self, ctx: RequestContext, key: tuple[str, ...], flight: Flight, keep: bool
    ) -> Callable[[list[StreamChunk] | None], None]:
        def on_end(kept: list[StreamChunk] | None) -> None:
            if kept is not None:
                self._store.finish(key, flight, Outcome(chunks=kept, cost_usd=_cost(ctx)), keep=keep)
            else:
                error = IdempotentRequestUnfinished(
                    "the first request with this key did not finish; retry it"
                )
                self._store.fail(key, flight, error)

        return on_end


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
    if outcome.chunks is not None:
        if ctx.stream:
            return Streamed(stream_from(outcome.chunks))
        return Completion(as_completion(outcome.chunks), None)
    assert outcome.body is not None
    if ctx.stream:
        return Streamed(stream_from(as_chunks(outcome.body, with_usage=ctx.client_wants_usage)))
    return Completion(outcome.body, None)
