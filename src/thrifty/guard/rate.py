"""Rate limits per tenant (requests and tokens per minute) and step limits per agent session.

Sliding 60-second windows kept in-process: the admission check and the record happen without
an await, so concurrent requests of one event loop cannot slip past together. Tokens are counted
at admission as prompt + n x the output ceiling, as OpenAI's own TPM limits do. Memory is bounded:
a tenant's window holds at most its request limit, and sessions are kept in an LRU.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from thrifty.errors import RateLimited, SessionStepLimit, SharedStateUnavailable
from thrifty.guard.media import image_extra
from thrifty.guard.output import choices, output_ceiling
from thrifty.pipeline import Handler, RequestContext, Result
from thrifty.settings import ModelSettings, RateLimitSettings, RouteSettings
from thrifty.stores.faults import LocalFallback
from thrifty.stores.ports import Admission, AdmitRequest, PendingAdmission, SharedRateStore
from thrifty.tokens import TokenCounter

_WINDOW_S = 60.0
_MAX_SESSIONS = 100_000


@dataclass(slots=True)
class Window:
    events: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    tokens: int = 0

    def trim(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - _WINDOW_S:
            self.tokens -= self.events.popleft()[1]

    def wait_for(self, now: float) -> float:
        return max(0.0, self.events[0][0] + _WINDOW_S - now) if self.events else 0.0


class RateLimits:
    def __init__(
        self,
        limits: Mapping[str, RateLimitSettings],
        routes: Mapping[str, RouteSettings],
        models: Mapping[str, ModelSettings],
        counter: TokenCounter,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedRateStore | None = None,
        fallback: LocalFallback | None = None,
        with_budget: bool = False,
    ) -> None:
        self._limits = dict(limits)
        self._step_limits = {n: r.max_steps_per_session for n, r in routes.items() if r.max_steps_per_session}
        self._models = dict(models)
        self._counter = counter
        self._clock = clock
        self._windows: dict[str, Window] = {}
        self._sessions: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        # Several replicas: windows and step counts live in a shared store (one script per request).
        self._shared = shared
        self._fallback = fallback
        # The next stage is a spend guard on the same shared store: hand it the admission.
        self._with_budget = with_budget

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if self._shared is not None:
            await self._admit_shared(ctx)
            return await call_next(ctx)
        limit = self._limits.get(ctx.tags.tenant_id)
        if limit is not None:
            self._admit(ctx, limit)
        if ctx.route is not None and ctx.tags.session is not None and ctx.route in self._step_limits:
            self._step(ctx, self._step_limits[ctx.route])
        return await call_next(ctx)

    async def _admit_shared(self, ctx: RequestContext) -> None:
        assert self._shared is not None
        shared = self._shared
        limit = self._limits.get(ctx.tags.tenant_id)
        max_steps = self._step_limits.get(ctx.route) if ctx.route is not None else None
        session = None
        if max_steps is not None and ctx.tags.session is not None:
            session = (f"{ctx.route}:{ctx.tags.session}", max_steps)
        if limit is None and session is None:
            return
        tokens = self._tokens(ctx) if limit is not None and limit.tokens_per_minute is not None else 0
        request = AdmitRequest(
            ctx.tags.tenant_id,
            limit.requests_per_minute if limit else None,
            limit.tokens_per_minute if limit else None,
            tokens,
            session,
        )

        def check(admission: Admission) -> None:
            if admission.refused == "requests":
                assert limit is not None and limit.requests_per_minute is not None
                raise _over_requests(ctx, limit.requests_per_minute, admission.wait_s)
            if admission.refused == "tokens":
                assert limit is not None and limit.tokens_per_minute is not None
                raise _over_tokens(ctx, limit.tokens_per_minute, admission.used, tokens, admission.wait_s)
            if admission.refused == "steps":
                raise _over_steps(ctx, admission.used)

        def unavailable(err: SharedStateUnavailable) -> None:
            if self._fallback is None:
                raise err
            self._fallback.note(err)
            if limit is not None:
                self._admit(ctx, limit)
            if session is not None:
                self._step(ctx, session[1])

        async def alone() -> None:
            try:
                admission = await shared.admit(request)
            except SharedStateUnavailable as err:
                unavailable(err)
                return
            check(admission)

        if self._with_budget:
            # The spend guard, next in the chain, sends this with its reservation: one round trip.
            ctx.pending_admission = PendingAdmission(request, check, alone, unavailable)
            return
        await alone()

    def _tokens(self, ctx: RequestContext) -> int:
        assert ctx.target is not None
        prompt = ctx.prompt_tokens or self._counter.count_messages(
            ctx.body.get("messages") or [], ctx.target.upstream_model, tools=ctx.body.get("tools")
        )
        ctx.prompt_tokens = prompt
        model = self._models[ctx.target.alias]
        out = output_ceiling(ctx.body, model)
        return prompt.tokens + image_extra(prompt, ctx.target.alias, model) + choices(ctx.body) * out

    def _admit(self, ctx: RequestContext, limit: RateLimitSettings) -> None:
        now = self._clock()
        window = self._windows.setdefault(ctx.tags.tenant_id, Window())
        window.trim(now)
        tokens = self._tokens(ctx) if limit.tokens_per_minute is not None else 0
        rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
        if rpm is not None and len(window.events) >= rpm:
            raise _over_requests(ctx, rpm, window.wait_for(now))
        if tpm is not None and window.tokens + tokens > tpm:
            wait = window.wait_for(now) if tokens <= tpm else _WINDOW_S
            raise _over_tokens(ctx, tpm, window.tokens, tokens, wait)
        window.events.append((now, tokens))
        window.tokens += tokens

    def _step(self, ctx: RequestContext, max_steps: int) -> None:
        assert ctx.route is not None and ctx.tags.session is not None
        key = (ctx.tags.tenant_id, ctx.route, ctx.tags.session)
        steps = self._sessions.pop(key, 0)
        if steps >= max_steps:
            self._sessions[key] = steps
            raise _over_steps(ctx, steps)
        self._sessions[key] = steps + 1
        if len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)


def _over_requests(ctx: RequestContext, rpm: int, wait: float) -> RateLimited:
    return RateLimited(
        f"tenant {ctx.tags.tenant_id!r} is over its rate limit of {rpm} requests per minute; "
        f"retry in {wait:.1f}s",
        retry_after_s=wait,
    )


def _over_tokens(ctx: RequestContext, tpm: int, used: int, tokens: int, wait: float) -> RateLimited:
    return RateLimited(
        f"tenant {ctx.tags.tenant_id!r} is over its rate limit of {tpm} tokens per minute "
        f"({used} used, this request may use {tokens}); retry in {wait:.1f}s or lower max_tokens (or n)",
        retry_after_s=wait,
    )


def _over_steps(ctx: RequestContext, steps: int) -> SessionStepLimit:
    return SessionStepLimit(
        f"session {ctx.tags.session!r} has made {steps} calls on route {ctx.route!r}, its limit "
        "per session; the agent should stop or start a new session"
    )
