"""The recording stage: on routes with `record`, a sample of requests and how they ended,
redacted before anything is written, stored with their attribution for `thrifty simulate`.

Outermost in the chain, so it keeps the body as the client sent it (later stages rewrite it:
output caps, context budgets) and sees the answer as the client got it (cache hits and
idempotent repeats included: a replay has to see the repeats the caches would answer).
A request that failed in the pipeline (an upstream error, a budget refusal) is recorded with
outcome `error` and its error; one the route deferred to a batch (which leaves before the
pipeline) is recorded by the batch service with outcome `deferred`, and its answer is added when
the batch ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

import orjson

from thrifty.errors import ThriftyError
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, relay_and_keep
from thrifty.recording.redact import Redactor
from thrifty.routing.resolve import ROUTE_PREFIX
from thrifty.settings import RecordSettings, RouteSettings
from thrifty.shapes import as_completion
from thrifty.stores.recordings import Recording, RecordingWriter
from thrifty.types import Tags


class RecordingStage:
    def __init__(self, routes: Mapping[str, RouteSettings], rng: random.Random | None = None) -> None:
        self._settings: dict[str, RecordSettings] = {
            name: r.record for name, r in routes.items() if r.record is not None and r.record.sample > 0
        }
        self._redactors = {name: Redactor(s.redact) for name, s in self._settings.items()}
        self._rng = rng or random.Random()
        self.writer: RecordingWriter | None = None  # set at start

    @property
    def active(self) -> bool:
        return bool(self._settings)

    def _route(self, ctx: RequestContext) -> str | None:
        model = ctx.requested_model
        return model.removeprefix(ROUTE_PREFIX) if model.startswith(ROUTE_PREFIX) else None

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        route = self._route(ctx)
        settings = self._settings.get(route) if route is not None else None
        if settings is None or self.writer is None or self._rng.random() >= settings.sample:
            return await call_next(ctx)
        assert route is not None
        sent = orjson.dumps(ctx.body)  # before any stage rewrites it
        try:
            result = await call_next(ctx)
        except ThriftyError as err:
            self._record(ctx, route, sent, None, outcome="error", error=error_json(err))
            raise
        if isinstance(result, Completion):
            self._record(ctx, route, sent, result.body)
            return result

        def on_end(kept: list[StreamChunk] | None) -> None:
            if kept is not None:
                self._record(ctx, route, sent, as_completion(kept))

        return Streamed(relay_and_keep(result.chunks, on_end))

    def _record(
        self,
        ctx: RequestContext,
        route: str,
        sent: bytes,
        response: dict[str, Any] | None,
        *,
        outcome: str = "ok",
        error: dict[str, Any] | None = None,
    ) -> None:
        assert self.writer is not None
        redactor = self._redactors[route]
        tags = ctx.tags
        user = None if redactor.drops_user else redactor.text(tags.user)
        self.writer.submit(
            Recording(
                request_id=ctx.request_id,
                ts=ctx.ts or time.time(),
                tenant_id=tags.tenant_id,
                route=route,
                feature=redactor.text(tags.feature),
                prompt_version=tags.prompt_version,
                user=user,
                idempotency_key=tags.idempotency_key,
                task=tags.task,
                model=ctx.target.upstream_model if ctx.target is not None else None,
                cache="dedup" if ctx.deduplicated else ctx.cache,
                request=redactor.request(orjson.loads(sent)),
                response=None if response is None else redactor.response(response),
                outcome=outcome,
                error=None if error is None else redactor.response(error),
            )
        )

    # -- deferred requests (called by the batch service, which they go through instead) ---------

    def record_deferred(
        self, request_id: str, route: str | None, tags: Tags, body: dict[str, Any], model: str | None
    ) -> None:
        """A request the route deferred to a batch, as the client sent it (sampled like the rest)."""
        settings = self._settings.get(route) if route is not None else None
        if settings is None or self.writer is None or self._rng.random() >= settings.sample:
            return
        assert route is not None
        redactor = self._redactors[route]
        self.writer.submit(
            Recording(
                request_id=request_id,
                ts=time.time(),
                tenant_id=tags.tenant_id,
                route=route,
                feature=redactor.text(tags.feature),
                prompt_version=tags.prompt_version,
                user=None if redactor.drops_user else redactor.text(tags.user),
                idempotency_key=tags.idempotency_key,
                task=tags.task,
                model=model,
                cache="miss",
                request=redactor.request(body),
                response=None,
                outcome="deferred",
            )
        )

    def deferred_result(
        self,
        request_id: str,
        route: str | None,
        response: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> None:
        """A deferred request's batch answer (or, when the item failed or expired, its error)."""
        if route not in self._settings or self.writer is None:
            return
        redactor = self._redactors[route]
        self.writer.submit_result(
            request_id,
            None if response is None else redactor.response(response),
            None if error is None else redactor.response(error),
        )


def error_json(err: ThriftyError) -> dict[str, Any]:
    """What the traffic format keeps of a failure: enough to tell it and to reproduce it."""
    return {"type": err.error_type, "code": err.code, "status": err.status, "message": err.message}


__all__ = ["RecordingStage", "error_json"]
