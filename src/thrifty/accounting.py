"""Accounting: usage of every attempt, its price, and one ledger entry per logical request.

The Account stage is the outermost stage, so every request that passed authentication is
recorded, whatever happens inside: success, rejection, provider failure or a client that
hangs up mid-stream. A response is released to the client only after its entry is committed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.stores.ledger import LedgerWriter
from thrifty.tokens import TokenCounter, encoding_for_model
from thrifty.types import Attempt, LedgerEntry, ModelTarget, RequestStatus, Usage, decimal_text

_ZERO = Decimal(0)


class Accountant:
    def __init__(self, catalog: PriceCatalog, counter: TokenCounter, ledger: LedgerWriter) -> None:
        self.catalog = catalog
        self.counter = counter
        self.ledger = ledger

    def estimate(self, ctx: RequestContext, target: ModelTarget, output_text: str) -> Usage:
        """Usage counted locally, for providers (or cut-off streams) that did not report it."""
        prompt = ctx.prompt_tokens or self.counter.count_messages(
            ctx.body.get("messages") or [], target.upstream_model, tools=ctx.body.get("tools")
        )
        ctx.prompt_tokens = prompt
        encoding, _ = encoding_for_model(target.upstream_model)
        return Usage(
            input_tokens=prompt.tokens,
            output_tokens=self.counter.count_text(output_text, encoding),
            estimated=True,
        )

    def attempt(
        self,
        target: ModelTarget,
        *,
        status: int,
        usage: Usage,
        started: float,
        error: str | None = None,
    ) -> Attempt:
        cost = self.catalog.cost(target.alias, usage)
        return Attempt(
            model=target.alias,
            provider=target.provider,
            status=status,
            usage=usage,
            cost_usd=cost,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            error=error,
        )

    def failed_attempt(self, target: ModelTarget, err: ThriftyError, started: float) -> Attempt:
        # Providers bill nothing for a call that failed before generating.
        return Attempt(
            model=target.alias,
            provider=target.provider,
            status=err.status,
            usage=Usage(),
            cost_usd=_ZERO,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            error=err.message,
        )

    def entry(
        self, ctx: RequestContext, status: RequestStatus, http_status: int, error: str | None
    ) -> LedgerEntry:
        attempts = tuple(ctx.attempts)
        usage = Usage()
        cost: Decimal | None = _ZERO
        for a in attempts:
            usage = usage + a.usage
            cost = None if cost is None or a.cost_usd is None else cost + a.cost_usd
        # The model of the answer returned, not of a voter asked after it.
        last = next((a for a in reversed(attempts) if a.role == "answer"), attempts[-1] if attempts else None)
        model = last.model if last else (ctx.target.alias if ctx.target else None)
        provider = last.provider if last else (ctx.target.provider if ctx.target else None)
        if last is None and ctx.target is None:
            cost = _ZERO
        return LedgerEntry(
            request_id=ctx.request_id,
            ts=ctx.ts,
            tenant_id=ctx.tags.tenant_id,
            user=ctx.tags.user,
            feature=ctx.tags.feature,
            route=ctx.route,
            prompt_version=ctx.tags.prompt_version,
            model=model,
            provider=provider,
            attempts=attempts,
            usage=usage,
            cost_usd=cost,
            saved_usd=ctx.saved_usd,
            cache=ctx.cache,
            escalated=ctx.escalated,
            # Failed calls that another call followed; a cascade's drafts and voters are not retries.
            retries=sum(1 for a in attempts[:-1] if a.status != 200),
            status=status,
            error=error,
            http_status=http_status,
            latency_ms=(time.perf_counter() - ctx.started) * 1000.0,
            ttft_ms=ctx.ttft_ms,
            idempotency_key=ctx.tags.idempotency_key,
            stream=ctx.stream,
            context=ctx.context_report,
            variant=ctx.variant,
        )


def trailer_of(entry: LedgerEntry) -> dict[str, Any]:
    """What the client learns about the accounting of its request (last SSE event, headers)."""
    u = entry.usage
    return {
        "request_id": entry.request_id,
        "cost_usd": None if entry.cost_usd is None else decimal_text(entry.cost_usd),
        "model": entry.model,
        "provider": entry.provider,
        "route": entry.route,
        "variant": entry.variant,
        "cache": entry.cache,
        "usage": {
            "input_tokens": u.input_tokens,
            "cached_input_tokens": u.cached_input_tokens,
            "cache_write_tokens": u.cache_write_tokens,
            "cache_write_1h_tokens": u.cache_write_1h_tokens,
            "output_tokens": u.output_tokens,
            "reasoning_tokens": u.reasoning_tokens,
            "estimated": u.estimated,
        },
    }


class Account:
    """Outermost stage: records one ledger entry per request and waits for it to be durable."""

    def __init__(self, accountant: Accountant) -> None:
        self._accountant = accountant

    async def _record(
        self, ctx: RequestContext, status: RequestStatus, http_status: int, error: str | None
    ) -> None:
        entry = self._accountant.entry(ctx, status, http_status, error)
        ctx.trailer = trailer_of(entry)
        await self._accountant.ledger.submit(entry)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        try:
            result = await call_next(ctx)
        except ThriftyError as err:
            await self._record(ctx, "error", err.status, err.message)
            raise
        except Exception as err:
            # A bug still leaves a trace in the ledger (any spend it caused is in ctx.attempts);
            # the server turns it into a 500.
            await self._record(ctx, "error", 500, f"internal error: {type(err).__name__}: {err}")
            raise
        if isinstance(result, Completion):
            await self._record(ctx, "ok", 200, None)
            return result
        return Streamed(self._watch(ctx, result.chunks))

    async def _watch(
        self, ctx: RequestContext, chunks: AsyncIterator[StreamChunk]
    ) -> AsyncIterator[StreamChunk]:
        finished = False
        try:
            async for chunk in chunks:
                yield chunk
            finished = True
        except ThriftyError as err:
            await close_stream(chunks)
            await self._record(ctx, "error", err.status, err.message)
            raise
        finally:
            if not finished and ctx.trailer is None:
                # The consumer went away (client disconnect): close the upstream call first, so
                # its attempt with the tokens generated so far is in ctx.attempts, then record.
                await close_stream(chunks)
                entry = self._accountant.entry(ctx, "client_disconnected", 499, "client closed the stream")
                ctx.trailer = trailer_of(entry)
                # Not awaited: nobody is left to answer, and a cancelled task must not block.
                self._accountant.ledger.submit(entry)
        await self._record(ctx, "ok", 200, None)
