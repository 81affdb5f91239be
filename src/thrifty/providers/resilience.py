"""Retries, circuit breakers and fallbacks around the upstream call.

Only what can succeed on a second try is retried: 429, 5xx, timeouts and dropped connections;
other 4xx mean the request itself is wrong and go straight back. Backoff is exponential with
full jitter and honours Retry-After (capped). A per-target retry budget caps the extra calls per
minute, so an outage cannot multiply spend. A circuit breaker per provider model opens after
consecutive failures, skips that target while open and lets one probe through after a cool-down.
Then the route's fallback models are tried in order. A stream is retried only until its first
event: once the client has received part of an answer, it cannot be swapped for another.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from thrifty.errors import AllAttemptsFailed, CircuitOpen, ProviderError, ProviderKeyMissing, ThriftyError
from thrifty.pipeline import Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.settings import ResilienceSettings, RouteSettings
from thrifty.stores.ports import BreakerBoard
from thrifty.types import ModelTarget

RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# 429 says "slow down", not "broken": it is retried but does not open the circuit.
BREAKING = RETRYABLE - {429, 409, 408}


@dataclass(slots=True)
class Breaker:
    failures_to_open: int
    cooldown_s: float
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    def allow(self, now: float) -> bool:
        if self.failures < self.failures_to_open:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: exactly one probe
        return True

    def success(self) -> None:
        self.failures = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.failures_to_open:
            self.open_until = now + self.cooldown_s

    @property
    def state(self) -> str:
        if self.failures < self.failures_to_open:
            return "closed"
        return "half-open" if self.probing else "open"


@dataclass(slots=True)
class RetryBudget:
    per_minute: int
    spent: deque[float] = field(default_factory=deque)

    def take(self, now: float) -> bool:
        while self.spent and self.spent[0] <= now - 60.0:
            self.spent.popleft()
        if len(self.spent) >= self.per_minute:
            return False
        self.spent.append(now)
        return True


class Resilience:
    def __init__(
        self,
        settings: ResilienceSettings,
        routes: Mapping[str, RouteSettings],
        targets: Mapping[str, ModelTarget],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        board: BreakerBoard | None = None,
    ) -> None:
        self._settings = settings
        self._routes = dict(routes)
        self._targets = dict(targets)
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._budgets: dict[tuple[str, str], RetryBudget] = {}
        self._sleep = sleep
        self._clock = clock
        # Several replicas: a breaker that opens here is published, and breakers others opened are
        # applied here, off the request path (each call still asks only its local breaker).
        self._board = board  # started by the gateway, with apply_shared

    def apply_shared(self, open_elsewhere: dict[str, float]) -> None:
        """Open the local breakers of targets another replica found failing, for what is left of
        their cool-down."""
        now = self._clock()
        for target in self._targets.values():
            left = open_elsewhere.get(f"{target.provider}/{target.upstream_model}")
            if left is None:
                continue
            breaker = self.breaker(target)
            if breaker.open_until < now + left:
                breaker.failures = max(breaker.failures, breaker.failures_to_open)
                breaker.open_until = now + left
                breaker.probing = False

    def breaker(self, target: ModelTarget) -> Breaker:
        key = (target.provider, target.upstream_model)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = Breaker(
                self._settings.breaker_failures, self._settings.breaker_cooldown_s
            )
        return breaker

    def breaker_states(self) -> dict[tuple[str, str], str]:
        """(provider, upstream model) -> closed | open | half-open, for every target called so far."""
        return {key: breaker.state for key, breaker in self._breakers.items()}

    def _budget(self, target: ModelTarget) -> RetryBudget:
        key = (target.provider, target.upstream_model)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RetryBudget(self._settings.retry_budget_per_minute)
        return budget

    def _backoff(self, attempt: int, err: ThriftyError) -> float:
        cap = self._settings.retry_max_s
        if isinstance(err, ProviderError) and err.retry_after_s is not None:
            return min(err.retry_after_s, cap)
        return random.uniform(0, min(cap, self._settings.retry_base_s * 2**attempt))

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        assert ctx.target is not None, "Resilience runs after ResolveModel"
        route = self._routes.get(ctx.route) if ctx.route else None
        max_retries = (
            route.max_retries if route and route.max_retries is not None else self._settings.max_retries
        )
        fallbacks = route.fallbacks if route and ctx.use_fallbacks else ()
        chain = [ctx.target] + [self._targets[m] for m in fallbacks]
        failures: list[tuple[str, ThriftyError]] = []  # (alias, error) of calls that were made
        skipped: list[CircuitOpen] = []  # targets an open breaker kept us from calling
        for target in chain:
            breaker = self.breaker(target)
            for attempt in range(max_retries + 1):
                if not breaker.allow(self._clock()):
                    skipped.append(
                        CircuitOpen(
                            f"{target.alias} is skipped: its circuit breaker opened after repeated "
                            "failures; retry after the cool-down",
                            retry_after_s=breaker.open_until - self._clock(),
                        )
                    )
                    break
                ctx.target = target
                try:
                    result = await _primed(await call_next(ctx))
                except ProviderKeyMissing as err:
                    # Not the provider's fault, and no retry can fix it: the next fallback may.
                    failures.append((target.alias, err))
                    break
                except ThriftyError as err:
                    failures.append((target.alias, err))
                    if err.status not in RETRYABLE:
                        breaker.success()  # the target answered; the request was at fault
                        raise
                    if err.status in BREAKING:
                        breaker.failure(self._clock())
                        if self._board is not None and breaker.state != "closed":
                            self._board.opened(
                                f"{target.provider}/{target.upstream_model}", breaker.cooldown_s
                            )
                    if attempt < max_retries and self._budget(target).take(self._clock()):
                        await self._sleep(self._backoff(attempt, err))
                        continue
                    break
                if self._board is not None and breaker.failures >= breaker.failures_to_open:
                    self._board.closed(f"{target.provider}/{target.upstream_model}")  # the probe passed
                breaker.success()
                return result
        raise _summary(failures, skipped)


def _summary(failures: list[tuple[str, ThriftyError]], skipped: list[CircuitOpen]) -> ThriftyError:
    """One error for a request whose every target failed or was skipped.

    A skipped target is not a failed call: the status is that of the last call that was made (a
    502 stays a 502), and 503 only when every target was skipped. Each distinct failure is one
    sentence, with how often it happened, not the same sentence once per retry."""
    if not failures:
        return min(skipped, key=lambda e: e.retry_after_s or 0.0)
    distinct: dict[tuple[str, str], int] = {}
    for alias, err in failures:
        distinct[(alias, err.message)] = distinct.get((alias, err.message), 0) + 1
    last = failures[-1][1]
    if len(distinct) == 1 and not skipped:
        return last
    parts = [
        f"{alias} ({count} attempts): {message}" if count > 1 else f"{alias}: {message}"
        for (alias, message), count in distinct.items()
    ]
    parts += [err.message for err in skipped]
    return AllAttemptsFailed(
        f"all {len(failures)} calls failed{f' and {len(skipped)} targets were skipped' if skipped else ''}: "
        + "; ".join(parts),
        status=last.status,
    )


async def _primed(result: Result) -> Result:
    """For a stream, pull its first event here, so a refused connection can still be retried."""
    if not isinstance(result, Streamed):
        return result
    chunks = result.chunks
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return Streamed(_empty())
    return Streamed(_prepend(first, chunks))


async def _empty() -> AsyncIterator[StreamChunk]:
    return
    yield  # an async generator that yields nothing


async def _prepend(first: StreamChunk, rest: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await close_stream(rest)
