"""ASGI app: OpenAI-compatible routes over the Gateway.

Written against bare ASGI rather than a framework: the hot path is three routes, and every
microsecond here is added to every call (see `thrifty bench overhead`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from thrifty.errors import AuthenticationFailed, InvalidRequest, NotFound, ThriftyError
from thrifty.gateway import Gateway, parse_chat_body
from thrifty.pipeline import Completion, RequestContext, Streamed
from thrifty.providers.base import StreamChunk, chunk_finishes, close_stream
from thrifty.server.dashboard import DashboardApp
from thrifty.server.metrics import GatewayMetrics
from thrifty.settings import Settings
from thrifty.stores.keys import hash_key
from thrifty.types import Tags

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# What a 413 on the proxy's routes tells the client to do.
_BODY_HINT = "; send less context"


class _PayloadTooLarge(ThriftyError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class _MethodNotAllowed(ThriftyError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class _InternalError(ThriftyError):
    status = 500
    error_type = "server_error"
    code = "internal_error"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _tags(tenant: str, headers: Mapping[str, str], body: Mapping[str, Any]) -> Tags:
    user = headers.get("x-thrifty-user")
    if user is None and isinstance(body.get("user"), str):
        user = body["user"]
    return Tags(
        tenant_id=tenant,
        feature=headers.get("x-thrifty-feature"),
        prompt_version=headers.get("x-thrifty-prompt-version"),
        user=user,
        # An empty key (an unset template variable) is no key: taken as one, every such request
        # of the tenant would share it (a new question refused, a repeat answered from the first).
        idempotency_key=headers.get("idempotency-key") or None,
        session=headers.get("x-thrifty-session"),
        corpus_version=headers.get("x-thrifty-corpus-version"),
        cache_control=(headers.get("cache-control") or "").lower() or None,
        evidence=_evidence(headers.get("x-thrifty-evidence")),
        task=headers.get("x-thrifty-task"),
    )


def _content_length(headers: Mapping[str, str]) -> int:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


def _evidence(header: str | None) -> tuple[str, ...]:
    if not header:
        return ()
    return tuple(sorted({part.strip() for part in header.split(",") if part.strip()}))


def _accounting_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    out = [(b"x-thrifty-request-id", ctx.request_id.encode())]
    trailer = ctx.trailer
    if trailer is not None:
        cost = trailer["cost_usd"]
        out.append((b"x-thrifty-cost-usd", b"unpriced" if cost is None else cost.encode()))
        if trailer["model"]:
            out.append((b"x-thrifty-model", trailer["model"].encode()))
        out.append((b"x-thrifty-cache", trailer["cache"].encode()))
    else:
        # A stream's headers leave before its cost is known (it is in the last event's `thrifty`
        # field); whether it is answered from a cache is known now.
        if ctx.target is not None:
            out.append((b"x-thrifty-model", ctx.target.alias.encode()))
        out.append((b"x-thrifty-cache", ctx.cache.encode()))
    if ctx.route:
        out.append((b"x-thrifty-route", ctx.route.encode()))
    if ctx.variant is not None:
        out.append((b"x-thrifty-variant", ctx.variant.encode()))
    if ctx.budget_remaining is not None:
        out.append((b"x-thrifty-budget-remaining", ctx.budget_remaining.encode()))
    return out


def _error_headers(
    err: ThriftyError, extra: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[bytes, bytes]]:
    out = list(extra or [])
    if err.retry_after_s is not None:
        out.append((b"retry-after", str(max(1, round(err.retry_after_s))).encode()))
    if err.should_retry is not None:
        out.append((b"x-should-retry", b"true" if err.should_retry else b"false"))
    return out


async def _send_json(
    send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps(payload)
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def queue_depths(gateway: Gateway) -> dict[str, Callable[[], int]]:
    """/metrics' `thrifty_queue_depth{queue}`, read at scrape time: ledger rows submitted and not
    yet written; batch items queued (not yet in a provider batch) and submitted (in one, not yet
    ended), of every process sharing the batch store; on PostgreSQL, ledger rows spooled while it
    was unreachable and not yet replayed."""
    ledger, batch = gateway.ledger, gateway.batch

    def batch_depth(state: str) -> Callable[[], int]:
        def read() -> int:
            return 0 if batch.store is None else batch.store.open_item_counts()[state]

        return read

    depths: dict[str, Callable[[], int]] = {
        "ledger": lambda: ledger.pending,
        "batch_queued": batch_depth("queued"),
        "batch_submitted": batch_depth("submitted"),
    }
    if gateway.stores.postgres:
        depths["ledger_spool"] = lambda: ledger.spool_depth
    return depths


class ThriftyApp:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._max_body = gateway.settings.server.max_body_bytes
        self._dashboard: DashboardApp | None = None
        if gateway.settings.dashboard.enabled:
            self._dashboard = DashboardApp(
                gateway.stores.reporting,
                gateway.settings,
                lambda key: gateway.authenticate("Bearer " + key),
                cache_stats=gateway.semantic_cache.stats if gateway.semantic_cache.active else None,
            )
        self._metrics: GatewayMetrics | None = None
        if gateway.settings.metrics.enabled:
            ledger = gateway.ledger
            self._metrics = GatewayMetrics(
                gateway.settings, breakers=gateway.resilience.breaker_states, depths=queue_depths(gateway)
            )
            ledger.observe(self._metrics.observe_batch)
        from thrifty.server.batch_routes import BatchRoutes, defer_chat

        self._batch = BatchRoutes(gateway, self._max_body)
        self._defer_chat = defer_chat
        # Only routes with `defer` settings, or the x-thrifty-defer header, cost the chat path a lookup.
        self._defer_routes = bool(gateway.batch.defer_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except ThriftyError as err:
                    await send({"type": "lifespan.startup.failed", "message": err.message})
                    return
                # Settings, price tables and modules now live as long as the process. Frozen, they
                # are no longer rescanned by every full collection (50-60 ms pauses under load).
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        try:
            if path in ("/v1/chat/completions", "/chat/completions"):
                if method != "POST":
                    raise _MethodNotAllowed(f"{path} accepts POST only")
                await self._chat(scope, receive, send)
            elif path in ("/v1/models", "/models"):
                self.gateway.authenticate(_headers(scope).get("authorization"))
                await _send_json(send, 200, {"object": "list", "data": self.gateway.model_list()})
            elif path == "/healthz":
                await _send_json(send, 200, {"status": "ok", **self.gateway.health()})
            elif path == "/metrics" and self._metrics is not None:
                await self._send_metrics(self._metrics, _headers(scope), send)
            elif self._dashboard is not None and (path == "/dashboard" or path.startswith("/dashboard/")):
                await self._dashboard(scope, receive, send)
            elif path == "/v1/thrifty/feedback":
                if method != "POST":
                    raise _MethodNotAllowed(f"{path} accepts POST only")
                await self._feedback(scope, receive, send)
            elif path.startswith(("/v1/files", "/v1/batches", "/v1/thrifty/")):
                await self._batch(scope, receive, send)
            else:
                raise NotFound(
                    f"no route {method} {path}; thrifty serves /v1/chat/completions, /v1/models, /v1/files "
                    "and /v1/batches",
                    code="unknown_url",
                )
        except _Responded:
            return
        except ThriftyError as err:
            await _send_json(send, err.status, err.to_openai(), _error_headers(err))

    async def _send_metrics(self, metrics: GatewayMetrics, headers: Mapping[str, str], send: Send) -> None:
        settings = self.gateway.settings
        if settings.metrics.require_admin_key:
            hashes = settings.dashboard.admin_key_hashes
            scheme, _, key = (headers.get("authorization") or "").strip().partition(" ")
            if not hashes:
                raise AuthenticationFailed(
                    "/metrics needs an admin key and none is set: add dashboard.admin_key_hashes, "
                    "or set metrics.require_admin_key: false"
                )
            if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(hash_key(key.strip()), h) for h in hashes
            ):
                raise AuthenticationFailed(
                    "/metrics needs an admin key: send Authorization: Bearer KEY "
                    "(in Prometheus: authorization.credentials)"
                )
        body, content_type = metrics.exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = self.gateway.authenticate(_headers(scope).get("authorization"))
        raw = await read_body(receive, self._max_body, _BODY_HINT)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise InvalidRequest(f"the feedback body is not valid JSON: {err}") from err
        feedback, stored = await self.gateway.feedback.record(tenant, body)
        await _send_json(send, 200, {"object": "thrifty.feedback", **feedback.to_json(), "stored": stored})

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        tenant = self.gateway.authenticate(headers.get("authorization"))
        raw = b""
        try:
            raw = await read_body(receive, self._max_body, _BODY_HINT)
            body = parse_chat_body(raw, headers.get("x-thrifty-route"))
        except (_PayloadTooLarge, InvalidRequest) as err:
            # Authenticated but unreadable: still one ledger row, committed before the answer.
            refused = await self.gateway.refuse(
                _tags(tenant, headers, {}), err, body_bytes=len(raw) or _content_length(headers)
            )
            await _send_json(
                send, err.status, err.to_openai(), _error_headers(err, _accounting_headers(refused))
            )
            raise _Responded from err
        wrong = headers.get("x-thrifty-cache-wrong")
        if wrong and wrong.strip():
            # Feedback on an earlier answer of this tenant's (see Gateway.cache_feedback).
            self.gateway.cache_feedback_soon(tenant, wrong.strip(), wrong=True)
        if (self._defer_routes or "x-thrifty-defer" in headers) and await self._defer_chat(
            self.gateway, send, tenant, headers, body, len(raw)
        ):
            raise _Responded
        ctx = self.gateway.new_context(body, len(raw), _tags(tenant, headers, body))
        try:
            result = await self.gateway.run(ctx)
        except ThriftyError as err:
            await _send_json(send, err.status, err.to_openai(), _error_headers(err, _accounting_headers(ctx)))
            raise _Responded from err
        except Exception as err:
            # The boundary: an unexpected bug becomes a 500 in OpenAI's shape, with its trace logged.
            log.exception("request %s failed", ctx.request_id)
            error = _InternalError(
                f"internal error in thrifty (request {ctx.request_id}); see the gateway log"
            )
            await _send_json(send, 500, error.to_openai(), _accounting_headers(ctx))
            raise _Responded from err
        if isinstance(result, Completion):
            await _send_json(send, 200, result.body, _accounting_headers(ctx))
            raise _Responded
        # Pull the first event before committing to a 200: a provider that refuses the call
        # (4xx, 5xx, unreachable) then gets its own status instead of an error inside a stream.
        try:
            first = await anext(result.chunks)
        except StopAsyncIteration:
            first = None
        except ThriftyError as err:
            await _send_json(send, err.status, err.to_openai(), _error_headers(err, _accounting_headers(ctx)))
            raise _Responded from err
        await self._stream(ctx, result, first, receive, send)
        raise _Responded

    async def _stream(
        self, ctx: RequestContext, result: Streamed, first: StreamChunk | None, receive: Receive, send: Send
    ) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + _accounting_headers(ctx)}
        )
        pump = asyncio.ensure_future(self._pump(ctx, result, first, send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _pump(
        self, ctx: RequestContext, result: Streamed, first: StreamChunk | None, send: Send
    ) -> None:
        chunks = result.chunks
        held: list[StreamChunk] = []
        try:
            async for chunk in _prepend(first, chunks):
                # From the finishing chunk on, hold back: the last event must carry the cost,
                # which is known only once usage has arrived and the ledger entry is committed.
                if held or chunk.usage is not None or chunk_finishes(chunk.data):
                    held.append(chunk)
                    continue
                await send(
                    {
                        "type": "http.response.body",
                        "body": _sse(chunk.raw or orjson.dumps(chunk.data)),
                        "more_body": True,
                    }
                )
        except ThriftyError as err:
            payload = err.to_openai()
            payload["thrifty"] = ctx.trailer
            body = b"".join(_sse(c.raw or orjson.dumps(c.data)) for c in held) + _sse(orjson.dumps(payload))
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        finally:
            await close_stream(chunks)
        await send(
            {"type": "http.response.body", "body": self._closing_events(ctx, held), "more_body": False}
        )

    @staticmethod
    def _closing_events(ctx: RequestContext, held: list[StreamChunk]) -> bytes:
        if not ctx.client_wants_usage:
            # The gateway asked upstream for usage on its own account; hide the extra chunk.
            held = [c for c in held if c.usage is None or c.data.get("choices")]
        parts = [_sse(c.raw or orjson.dumps(c.data)) for c in held[:-1]]
        if held:
            last = dict(held[-1].data)
        else:
            last = {"id": ctx.request_id, "object": "chat.completion.chunk", "choices": []}
        last["thrifty"] = ctx.trailer
        parts.append(_sse(orjson.dumps(last)))
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)


async def _prepend(first: StreamChunk | None, rest: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


async def read_body(receive: Receive, max_body: int, hint: str = "") -> bytes:
    """The whole request body, refused with a 413 once it passes ``max_body`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Responded
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise _PayloadTooLarge(f"the request body is over {max_body} bytes (server.max_body_bytes){hint}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Responded(Exception):
    """Control flow: the response (or the client's disconnect) already ended the exchange."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    settings: Settings,
    *,
    secrets: Mapping[str, str | None] | None = None,
    gateway: Gateway | None = None,
) -> ThriftyApp:
    return ThriftyApp(gateway or Gateway(settings, secrets=secrets))


__all__ = ["InvalidRequest", "ThriftyApp", "create_app"]
