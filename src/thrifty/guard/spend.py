"""The spend guard stage: cap the cost of one request, reserve budgets.

Worst-case cost = prompt tokens x input price + n x the output ceiling x output price (n choices
are each billed; the ceiling is fixed by `guard.output.OutputCeiling`, which also sends it). It is
reserved on every budget that applies before the call and settled to the actual cost of all the
request's attempts afterwards (released when nothing was generated). An unpriced model reserves
no dollars, only tokens: a pricing gap must not block traffic (nor let it through token limits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from decimal import Decimal

from thrifty.errors import BudgetExceeded, RequestTooExpensive, SharedStateUnavailable
from thrifty.guard.budgets import BudgetPlan, Limit, Reservation, rejection, tightest_of, tightest_usd
from thrifty.guard.media import image_extra
from thrifty.guard.output import choices, output_ceiling
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.settings import ModelSettings, RouteSettings
from thrifty.stores.faults import LocalFallback
from thrifty.stores.ports import BudgetStore, SharedBudgetStore, window_bounds
from thrifty.tokens import TokenCounter
from thrifty.types import Usage, decimal_text

log = logging.getLogger(__name__)

_SETTLE_RETRY_S = (0.05, 0.2, 1.0, 5.0, 15.0)  # a settle is idempotent: retrying it is safe

# Told after each settlement, with (limit, window start, spent in it): budget threshold alerts.
SpendListener = Callable[[list[tuple[Limit, float, Decimal]]], None]

# An escalated cascade call carries the rejected draft (up to one output ceiling) and the reason
# for rejecting it: room for the reason and the message framing.
_FEEDBACK_TOKENS = 256
# Anthropic adds a system prompt of its own to a request with tools, billed as input: at most 530
# tokens in its tool-use pricing table (Claude 3 Opus, tool_choice auto; 346 on Claude 4 models).
ANTHROPIC_TOOL_PROMPT_TOKENS = 530


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
        route_models: Mapping[str, Sequence[str]] | None = None,
        anthropic: frozenset[str] = frozenset(),
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
        self._on_spend = on_spend  # told after each settlement (budget threshold alerts)
        # Routes that may make several calls per request (cascades): every call they may make.
        self._route_calls = {name: list(calls) for name, calls in (route_calls or {}).items() if calls}
        # Routes whose one call goes to a model the route stage picks after this stage has run (a
        # trained classifier): the request may cost what the dearest of them costs.
        self._route_models = {name: list(m) for name, m in (route_models or {}).items() if m}
        # Anthropic's models bill writing the prompt cache above the input price (a request may
        # write its whole prompt, so that is its worst case), and add a tool-use system prompt of
        # their own to a request with tools.
        self._anthropic = anthropic
        # No budget and no per-request cap anywhere: nothing to count or reserve, ever.
        self._unlimited = plan.empty and not any(r.max_cost_per_request_usd for r in self._routes.values())

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if self._unlimited:
            ctx.budget_remaining = "unlimited"
            return await call_next(ctx)
        target = ctx.target
        assert target is not None, "SpendGuard runs after ResolveModel"
        route = self._routes.get(ctx.route) if ctx.route else None
        n = choices(ctx.body)
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
        worst_usd, worst_tokens = self._worst(ctx, route, prompt.tokens, n)
        # Calls made before this stage (a context summary) were reserved and settled on their own
        # (see hold); they still count towards the request's cost cap.
        first = len(ctx.attempts)
        if worst_usd is not None and first:
            worst_usd += sum((a.cost_usd or Decimal(0) for a in ctx.attempts), Decimal(0))
        if cost_cap is not None and worst_usd is not None and worst_usd > cost_cap:
            per_choice = output_ceiling(ctx.body, self._models[target.alias])
            output = f"{n} choices x {per_choice}" if n > 1 else f"{per_choice}"
            images = len(prompt.image_details)
            raise RequestTooExpensive(
                f"this request may cost up to ${decimal_text(worst_usd)} ({prompt.tokens} prompt tokens, "
                + (f"its {images} image{'s' if images > 1 else ''} at their largest, " if images else "")
                + f"up to {output} output tokens {self._worst_case_of(ctx)}), over the cap of "
                f"${decimal_text(cost_cap)} per request of route {ctx.route!r}; lower max_tokens"
                + (" or n" if n > 1 else "")
                + " or shorten the prompt"
            )
        if not limits:
            ctx.budget_remaining = "unlimited"
            if ctx.pending_admission is not None:
                await self._admit_alone(ctx)
            return await call_next(ctx)
        if self._shared is not None:
            reservation = await self._reserve_shared(ctx, limits, worst_usd or Decimal(0), worst_tokens)
        else:
            ctx.budget_remaining = tightest_usd(limits, self._book, ctx.ts) or "unlimited"  # also on a 429
            reservation = self._book.reserve(limits, ctx.ts, worst_usd or Decimal(0), worst_tokens)
            ctx.budget_remaining = tightest_usd(limits, self._book, ctx.ts) or "unlimited"
        try:
            result = await call_next(ctx)
        except BaseException:
            self._settle(ctx, reservation, limits, first)
            raise
        if isinstance(result, Completion):
            self._settle(ctx, reservation, limits, first)
            return result
        return Streamed(self._settle_after(ctx, reservation, limits, result.chunks, first))

    def hold(self, ctx: RequestContext, aliases: Sequence[str], usage: Usage) -> Reservation | None:
        """Reserve a call made before this stage (a context summary) at its worst case on the
        request's budgets; BudgetExceeded when it does not fit. Settle it with `release`."""
        if self._unlimited:
            return None
        limits = self._plan.limits_for(ctx.tags.tenant_id, ctx.tags.feature, ctx.route)
        if not limits:
            return None
        costs = [c for c in (self._catalog.cost(a, usage) for a in aliases) if c is not None]
        return self._book.reserve(
            limits, ctx.ts, max(costs, default=Decimal(0)), usage.input_tokens + usage.output_tokens
        )

    def release(self, ctx: RequestContext, hold: object | None, first_attempt: int) -> None:
        """Settle a hold to what the attempts made since `first_attempt` cost."""
        if not isinstance(hold, Reservation):
            return
        limits = self._plan.limits_for(ctx.tags.tenant_id, ctx.tags.feature, ctx.route)
        self._settle(ctx, hold, limits, first_attempt)

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
            raise BudgetExceeded(
                rejection(limit, outcome.left[outcome.refused], need, end), resets_in_s=end - ctx.ts
            )
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

    def _worst(
        self, ctx: RequestContext, route: RouteSettings | None, prompt: int, n: int
    ) -> tuple[Decimal | None, int]:
        """The dearest way the request may end, in dollars and in tokens: its target, a pinned
        model or a fallback; on a cascade, every call it may make (drafts, voters, the top tier)
        plus the dearest fallback. Every call may return n choices of its output ceiling."""
        assert ctx.target is not None

        tools = bool(ctx.body.get("tools"))

        def usage(alias: str, grown: bool = False) -> Usage:
            out = output_ceiling(ctx.body, self._models[alias])
            extra = out + _FEEDBACK_TOKENS if grown else 0  # the rejected draft, sent back in
            extra += image_extra(ctx.prompt_tokens, alias, self._models[alias])
            if tools and alias in self._anthropic:
                extra += ANTHROPIC_TOOL_PROMPT_TOKENS
            return Usage(input_tokens=prompt + extra, output_tokens=n * out)

        def tokens(u: Usage) -> int:
            return u.input_tokens + u.output_tokens

        def cost(calls: list[tuple[str, Usage]]) -> list[Decimal]:
            return [c for c in (self._call_cost(a, u) for a, u in calls) if c is not None]

        calls = self._route_calls.get(ctx.plan_key() or "")
        spare = [(a, usage(a)) for a in (route.fallbacks if route else ())]
        spare_tokens = max((tokens(u) for _, u in spare), default=0)
        if calls:
            grows = bool(route and route.include_rejected_draft)
            made = [(a, usage(a, grown=grows and i > 0)) for i, a in enumerate(calls)]
            priced = cost(made)
            worst_tokens = sum(tokens(u) for _, u in made) + spare_tokens
            if not priced:
                return None, worst_tokens
            return sum(priced, Decimal(0)) + max(cost(spare), default=Decimal(0)), worst_tokens
        picked = [*route.pin.values(), *self._route_models.get(ctx.route or "", ())] if route else []
        one = [(ctx.target.alias, usage(ctx.target.alias)), *spare, *((a, usage(a)) for a in picked)]
        costs = cost(one)
        return (max(costs) if costs else None), max(tokens(u) for _, u in one)

    def _call_cost(self, alias: str, usage: Usage) -> Decimal | None:
        cost = self._catalog.cost(alias, usage)
        if cost is None or alias not in self._anthropic:
            return cost
        written = self._catalog.cost(alias, dataclasses.replace(usage, cache_write_tokens=usage.input_tokens))
        return max(cost, written or cost)

    def _worst_case_of(self, ctx: RequestContext) -> str:
        assert ctx.target is not None
        calls = self._route_calls.get(ctx.plan_key() or "")
        if calls:
            return f"on every call cascade route {ctx.route!r} may make ({', '.join(calls)})"
        picks = self._route_models.get(ctx.route or "")
        if picks:
            return f"on the dearest model route {ctx.route!r} may pick ({', '.join(picks)})"
        return f"on {ctx.target.alias!r}"

    def _settle(
        self, ctx: RequestContext, reservation: Reservation, limits: list[Limit], first: int = 0
    ) -> None:
        usd = Decimal(0)
        tokens = 0
        for attempt in ctx.attempts[first:]:
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
        first: int = 0,
    ) -> AsyncIterator[StreamChunk]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await close_stream(chunks)  # the inner stage records its attempt when it closes
            self._settle(ctx, reservation, limits, first)
