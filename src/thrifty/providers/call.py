"""The innermost stage: one upstream call, recorded as an Attempt on the context."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from thrifty.accounting import Accountant
from thrifty.errors import ThriftyError
from thrifty.pipeline import Completion, RequestContext, Result, Streamed
from thrifty.providers.base import Provider, StreamChunk, chunk_text, close_stream


def completion_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            parts.append(message["content"])
        for call in message.get("tool_calls") or ():
            fn = call.get("function") or {}
            parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


class CallProvider:
    def __init__(self, providers: Mapping[str, Provider], accountant: Accountant) -> None:
        self._providers = dict(providers)
        self._accountant = accountant

    async def __call__(self, ctx: RequestContext) -> Result:
        target = ctx.target
        assert target is not None, "CallProvider runs after ResolveModel"
        provider = self._providers[target.provider]
        started = time.perf_counter()
        if ctx.stream:
            return Streamed(self._stream(ctx, provider, started))
        try:
            result = await provider.complete(target, ctx.body)
        except ThriftyError as err:
            ctx.attempts.append(self._accountant.failed_attempt(target, err, started))
            raise
        usage = result.usage or self._accountant.estimate(ctx, target, completion_text(result.body))
        ctx.attempts.append(self._accountant.attempt(target, status=200, usage=usage, started=started))
        return Completion(result.body, usage)

    async def _stream(
        self, ctx: RequestContext, provider: Provider, started: float
    ) -> AsyncIterator[StreamChunk]:
        target = ctx.target
        assert target is not None
        texts: list[str] = []
        usage = None
        failure: ThriftyError | None = None
        upstream = provider.stream(target, ctx.body)
        try:
            async for chunk in upstream:
                if chunk.usage is not None:
                    usage = chunk.usage
                else:
                    text = chunk_text(chunk.data)
                    if text:
                        if ctx.ttft_ms is None:
                            ctx.ttft_ms = (time.perf_counter() - ctx.started) * 1000.0
                        texts.append(text)
                yield chunk
        except ThriftyError as err:
            failure = err
            raise
        finally:
            await close_stream(upstream)
            if failure is not None and not texts and usage is None:
                ctx.attempts.append(self._accountant.failed_attempt(target, failure, started))
            else:
                # A stream cut short (provider drop, client gone) is billed for what was generated.
                final = usage or self._accountant.estimate(ctx, target, "".join(texts))
                status = 200 if failure is None else failure.status
                error = None if failure is None else failure.message
                ctx.attempts.append(
                    self._accountant.attempt(target, status=status, usage=final, started=started, error=error)
                )
