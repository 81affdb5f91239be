"""What the exact and the semantic cache share: which requests qualify, which answers are kept,
and how a stored answer is served (as JSON, or replayed as SSE to a streaming client)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from thrifty.pipeline import Completion, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.shapes import as_chunks, stream_from
from thrifty.types import CacheOutcome, Usage

# Fields that change how an answer is delivered or accounted, not what it says.
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})


def answer_scope(ctx: RequestContext, per_user: bool) -> list[Any]:
    """Who may share an answer: the same tenant (never across tenants), user when answers are
    personal, route, prompt version, corpus version and requested model. Both caches key on it."""
    tags = ctx.tags
    scope = [
        tags.tenant_id,
        tags.user if per_user else None,
        ctx.route,
        tags.prompt_version,
        tags.corpus_version,
        ctx.requested_model,
    ]
    if ctx.variant is not None:
        scope.append(ctx.variant)  # an experiment's arms never answer from each other's entries
    return scope


class CachePolicy(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def any_temperature(self) -> bool: ...


def cacheable(body: Mapping[str, Any], policy: CachePolicy) -> bool:
    if not policy.enabled:
        return False
    if policy.any_temperature:
        return True
    # OpenAI's default temperature is 1: only an explicit 0 is deterministic enough to repeat.
    return body.get("temperature") == 0 and body.get("n", 1) == 1


def usage_worth_keeping(ctx: RequestContext, response: Mapping[str, Any]) -> Usage | None:
    """The usage of a complete, successful answer; None for one not worth repeating."""
    attempts = ctx.attempts
    if not attempts or attempts[-1].status != 200:
        return None
    finish = [c.get("finish_reason") for c in response.get("choices") or ()]
    if not finish or any(f not in ("stop", "tool_calls") for f in finish):
        return None  # a truncated or filtered answer is not worth repeating
    return attempts[-1].usage


def serve_stored(
    ctx: RequestContext,
    outcome: CacheOutcome,
    response: dict[str, Any],
    usage: Usage,
    catalog: PriceCatalog,
) -> Result:
    """Answer from the cache: no upstream call, and the ledger learns what it would have cost."""
    assert ctx.target is not None
    ctx.cache = outcome
    # What this answer would have cost upstream, at today's prices.
    ctx.saved_usd = catalog.cost(ctx.target.alias, usage)
    if ctx.stream:
        return Streamed(stream_from(as_chunks(response, with_usage=ctx.client_wants_usage)))
    return Completion(response, None)
