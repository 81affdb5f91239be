"""The request pipeline: an onion of stages built once from settings.

Each stage is `async (ctx, call_next) -> Result`. A stage may answer without calling on (a
rejection, later a cache hit), call on once, or several times (later: retries, escalation);
every upstream call appends an Attempt to `ctx.attempts`, so accounting needs no special cases.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from thrifty.providers.base import StreamChunk
from thrifty.tokens import TokenCount
from thrifty.types import Attempt, CacheOutcome, ModelTarget, Tags, Usage

if TYPE_CHECKING:
    from thrifty.stores.ports import PendingAdmission


@dataclass(slots=True)
class RequestContext:
    request_id: str
    ts: float
    started: float  # perf_counter() at arrival
    tags: Tags
    body: dict[str, Any]
    body_bytes: int
    requested_model: str
    stream: bool
    client_wants_usage: bool
    route: str | None = None
    target: ModelTarget | None = None
    attempts: list[Attempt] = field(default_factory=list)
    prompt_tokens: TokenCount | None = None
    # The client sent no output cap; thrifty set the one it assumes (it may lower it to fit).
    output_ceiling_implied: bool = False
    ttft_ms: float | None = None
    budget_remaining: str | None = None  # for the x-thrifty-budget-remaining header
    saved_usd: Decimal | None = None  # what an answer without an upstream call would have cost
    deduplicated: bool = False  # answered from another request's generation (idempotency/flight)
    cache: CacheOutcome = "miss"
    escalated: bool = False  # a cascade went past its first tier
    # False while a cascade calls a draft or a voter: a tier that is down is a failed draft and
    # the cascade escalates itself, rather than the route's fallbacks answering in its place.
    use_fallbacks: bool = True
    # Shared state: a rate admission the rate stage left for the spend guard to send along with
    # its reservation (one round trip to the shared store for both).
    pending_admission: PendingAdmission | None = None
    # The body as the client sent it, when a stage rewrote ctx.body (context budgets): what makes two
    # requests the same request for idempotency and coalescing.
    client_body: dict[str, Any] | None = None
    # The context stage's record (tokens per section before/after, actions, notes) for the ledger.
    context_report: dict[str, Any] | None = None
    # Filled by accounting once the ledger entry is committed; a stream's last event carries it.
    trailer: dict[str, Any] | None = None
    # Route experiments: the arm this request was assigned, and the routing plan that arm uses
    # (None: the route's own; "": a fixed model; "ROUTE/ARM": the arm's cascade).
    variant: str | None = None
    route_plan: str | None = None

    def plan_key(self) -> str | None:
        """Which routing plan (cascade, worst-case calls) applies: the route's or its arm's."""
        return self.route if self.route_plan is None else (self.route_plan or None)


@dataclass(slots=True)
class Completion:
    body: dict[str, Any]
    usage: Usage | None


@dataclass(slots=True)
class Streamed:
    chunks: AsyncIterator[StreamChunk]


Result = Completion | Streamed
Handler = Callable[[RequestContext], Awaitable[Result]]


class Stage(Protocol):
    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result: ...


class Terminal(Protocol):
    async def __call__(self, ctx: RequestContext) -> Result: ...


def build_chain(stages: Sequence[Stage], terminal: Terminal) -> Handler:
    """Compose stages outermost-first into one handler, once, at start."""
    handler: Handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Handler) -> Handler:
    async def handler(ctx: RequestContext) -> Result:
        return await stage(ctx, call_next)

    return handler
