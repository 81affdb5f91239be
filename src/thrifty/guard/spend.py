"""The spend guard stage: clamp max_tokens, cap the cost of one request, reserve budgets.

Worst-case cost = prompt tokens x input price + the (clamped) output ceiling x output price. It is
reserved on every budget that applies before the call and settled to the actual cost of all the
request's attempts afterwards (released when nothing was generated). An unpriced model reserves
no dollars, only tokens: a pricing gap must not block traffic (nor let it through token limits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from decimal import Decimal

from thrifty.errors import BudgetExceeded, RequestTooExpensive, SharedStateUnavailable
from thrifty.guard.budgets import BudgetPlan, Limit, Reservation, rejection, tightest_of, tightest_usd
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.settings import ModelSettings, RouteSettings
from thrifty.stores.faults import LocalFallback
from thrifty.stores.ports import BudgetStore, SharedBudgetStore, window_bounds
from thrifty.tokens import TokenCounter
from thrifty.types import Usage, decimal_text

log = logging.getLogger(__name__)

_OUTPUT_KEYS = ("max_completion_tokens", "max_tokens")
_SETTLE_RETRY_S = (0.05, 0.2, 1.0, 5.0, 15.0)  # a settle is idempotent: retrying it is safe

# Told after each settlement, with (limit, window start, spent in it): budget threshold alerts.
SpendListener = Callable[[list[tuple[Limit, float, Decimal]]], None]


def requested_output(body: Mapping[str, object]) -> tuple[str | None, int | None]:
    for key in _OUTPUT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None, None


def clamp_output(body: dict[str, object], route_cap: int | None) -> None:
    """Lower (or set) the client's max_tokens to the route's ceiling: never trust the client's."""
    key, requested = requested_output(body)
    if route_cap is not None and (requested is None or requested > route_cap):
        body[key or "max_tokens"] = route_cap


class ClampOutput:
    """Runs before the prompt-size check, so the context window is checked with the clamped value."""

    def __init__(self, routes: Mapping[str, RouteSettings]) -> None:
        self._caps = {name: r.max_output_tokens for name, r in routes.items() if r.max_output_tokens}

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if ctx.route is not None and ctx.route in self._caps:
            clamp_output(ctx.body, self._caps[ctx.route])
        return await call_next(ctx)


class SpendGuard:
    def __init__(
        self,
        *,
        catalog: PriceCatalog,
        counter: TokenCounter,
        models: Mapping[str, ModelSettings],
        routes: Mapping[str, RouteSettings],
        plan: BudgetPlan,
        book: BudgetStore,
        on_spend: SpendListener | None = None,
        route_calls: Mapping[str, Sequence[str]] | None = None,
        shared: SharedBudgetStore | None = None,
        fallback: LocalFallback | None = None,
    ) -> None:
        self._catalog = catalog
        self._counter = counter
        self._models = dict(models)
        self._routes = dict(routes)
        self._plan = plan
        self._book = book
        # Several replicas: budgets live in a shared store (its calls are awaited; the local book
        # is then only the store's own fallback when it degrades to per-replica limits).
        self._shared = shared
        self._fallback = fallback  # degrade_local: the local book decides while the store is down
        self._settling: set[asyncio.Task[None]] = set()
        self._on_spend = on_spend
        # Routes that may make several calls per request (cascades): every call they may make.
        self._route_calls = {name: list(calls) for name, calls in (route_calls or {}).items() if calls}
        # No budget and no per-request cap anywhere: nothing to count or reserve, ever.
        self._unlimited = plan.empty and not any(r.max_cost_per_request_usd for r in self._routes.values())

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if self._unlimited:
            ctx.budget_remaining = "unlimited"
            return await call_next(ctx)
        target = ctx.target
        assert target is not None, "SpendGuard runs after ResolveModel"
        route = self._routes.get(ctx.route) if ctx.route else None
        max_out = requested_output(ctx.body)[1] or self._models[target.alias].max_output_tokens
        cost_cap = route.max_cost_per_request_usd if route else None
        limits = self._plan.limits_for(ctx.tags.tenant_id, ctx.tags.feature, ctx.route)
        if not limits and cost_cap is None:
            ctx.budget_remaining = "unlimited"
            if ctx.pending_admission is not None:  # shared state only: nothing to send it with
                await self._admit_alone(ctx)
            return await call_next(ctx)
        prompt = ctx.prompt_tokens or self._counter.count_messages(
            ctx.body.get("messages") or [], target.upstream_model, tools=ctx.body.get("tools")
        )
        ctx.prompt_tokens = prompt
        worst_usd = self._worst_usd(ctx, route, Usage(input_tokens=prompt.tokens, output_tokens=max_out))
        if cost_cap is not None and worst_usd is not None and worst_usd > cost_cap:
            raise RequestTooExpensive(
                f"this request may cost up to ${decimal_text(worst_usd)} ({prompt.tokens} prompt tokens, "
                f"up to {max_out} output tokens {self._worst_case_of(ctx)}), over the cap of "
                f"${decimal_text(cost_cap)} per request of route {ctx.route!r}; lower max_tokens or shorten "
                "the prompt"
            )
        if not limits:
            ctx.budget_remaining = "unlimited"
            if ctx.pending_admission is not None:
                await self._admit_alone(ctx)
            return await call_next(ctx)
        if self._shared is not None:
            reservation = await self._reserve_shared(
                ctx, limits, worst_usd or Decimal(0), prompt.tokens + max_out
            )
        else:
            ctx.budget_remaining = tightest_usd(limits, self._book, ctx.ts) or "unlimited"  # also on a 429
            reservation = self._book.reserve(limits, ctx.ts, worst_usd or Decimal(0), prompt.tokens + max_out)
            ctx.budget_remaining = tightest_usd(limits, self._book, ctx.ts) or "unlimited"
        try:
            result = await call_next(ctx)
        except BaseException:
            self._settle(ctx, reservation, limits)
            raise
        if isinstance(result, Completion):
            self._settle(ctx, reservation, limits)
            return result
        return Streamed(self._settle_after(ctx, reservation, limits, result.chunks))

    async def _reserve_shared(
        self, ctx: RequestContext, limits: list[Limit], usd: Decimal, tokens: int
    ) -> Reservation:
        assert self._shared is not None
        pending, ctx.pending_admission = ctx.pending_admission, None
        try:
            outcome = await self._shared.reserve(
                limits, ctx.ts, usd, tokens, admit=None if pending is None else pending.request
            )
        except SharedStateUnavailable as err:
            if pending is not None:
                pending.unavailable(err)  # fail_closed: raises; degrade_local: the local windows admit
            if self._fallback is None:
                raise
            self._fallback.note(err)
            reservation = self._book.reserve(limits, ctx.ts, usd, tokens)
            ctx.budget_remaining = tightest_usd(limits, self._book, ctx.ts) or "unlimited"
            return reservation
        if pending is not None and outcome.admission is not None:
            pending.check(outcome.admission)  # the rate stage's own 429s, before any budget's
        ctx.budget_remaining = tightest_of(zip(limits, outcome.left, strict=True)) or "unlimited"
        if outcome.reservation is None:
            assert outcome.refused is not None
            limit = limits[outcome.refused]
            need = usd if limit.unit == "usd" else Decimal(tokens)
            end = window_bounds(ctx.ts, limit.window)[1]
            raise BudgetExceeded(rejection(limit, outcome.left[outcome.refused], need, end))
        return outcome.reservation

    @property
    def unlimited(self) -> bool:
        return self._unlimited

    async def _admit_alone(self, ctx: RequestContext) -> None:
        pending, ctx.pending_admission = ctx.pending_admission, None
        assert pending is not None
        await pending.alone()

    async def drain(self) -> None:
        """Wait for settlements still on their way to the shared store (at shutdown)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def describe(self, ctx: RequestContext) -> str:
        """What is left, for a response that never reached this stage (cache hit, replay, rejection)."""
        if self._unlimited or self._shared is not None:
            # Shared budgets: asking the store would add a round trip to a request that spent nothing.
            return "unlimited" if self._unlimited else "unknown"
        limits = self._plan.limits_for(ctx.tags.tenant_id, ctx.tags.feature, ctx.route)
        return tightest_usd(limits, self._book, ctx.ts) or "unlimited"

    def _worst_usd(self, ctx: RequestContext, route: RouteSettings | None, usage: Usage) -> Decimal | None:
        """The dearest way the request may end: its target, a pinned model or a fallback; on a
        cascade, every call it may make (drafts, voters, the top tier) plus the dearest fallback."""
        assert ctx.target is not None
        calls = self._route_calls.get(ctx.route or "")
        fallbacks = list(route.fallbacks) if route else []
        if calls:
            priced = [c for c in (self._catalog.cost(a, usage) for a in calls) if c is not None]
            spare = [c for c in (self._catalog.cost(a, usage) for a in fallbacks) if c is not None]
            return sum(priced, Decimal(0)) + max(spare, default=Decimal(0)) if priced else None
        aliases = [ctx.target.alias, *fallbacks, *(route.pin.values() if route else ())]
        costs = [c for c in (self._catalog.cost(a, usage) for a in aliases) if c is not None]
        return max(costs) if costs else None

    def _worst_case_of(self, ctx: RequestContext) -> str:
        assert ctx.target is not None
        calls = self._route_calls.get(ctx.route or "")
        if calls:
            return f"on every call cascade route {ctx.route!r} may make ({', '.join(calls)})"
        return f"on {ctx.target.alias!r}"

    def _settle(self, ctx: RequestContext, reservation: Reservation, limits: list[Limit]) -> None:
        usd = Decimal(0)
        tokens = 0
        for attempt in ctx.attempts:
            usd += attempt.cost_usd or Decimal(0)
            tokens += attempt.usage.input_tokens + attempt.usage.output_tokens
        if not reservation.local:
            # Off the response path: the reservation holds the worst case until the settle lands.
            task = asyncio.ensure_future(self._settle_shared(reservation, limits, usd, tokens))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            return
        self._book.settle(reservation, usd, tokens)
        if self._on_spend is not None:
            self._on_spend([(limit, *self._book.spent_in_window(limit, ctx.ts)) for limit in limits])

    async def _settle_shared(
        self, reservation: Reservation, limits: list[Limit], usd: Decimal, tokens: int
    ) -> None:
        assert self._shared is not None
        for delay in (*_SETTLE_RETRY_S, None):
            try:
                spent = await self._shared.settle(reservation, usd, tokens)
                break
            except SharedStateUnavailable as err:
                if delay is None:
                    log.error("budget settlement %s lost: %s", reservation.id, err.message)
                    return
                await asyncio.sleep(delay)
        if self._on_spend is not None:
            self._on_spend(
                [
                    (limit, key[2], amount)
                    for limit, key, amount in zip(limits, reservation.keys, spent, strict=True)
                ]
            )

    async def _settle_after(
        self,
        ctx: RequestContext,
        reservation: Reservation,
        limits: list[Limit],
        chunks: AsyncIterator[StreamChunk],
    ) -> AsyncIterator[StreamChunk]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await close_stream(chunks)  # the inner stage records its attempt when it closes
            self._settle(ctx, reservation, limits)
