"""Traces: one span per request, one child per upstream attempt, GenAI semantic-convention names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import UPSTREAM_KEY, LoopThread, base_settings, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.gateway import Gateway


class OtlpCollector:
    """Accepts OTLP/HTTP trace exports and keeps what arrived."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def traces(request: web.Request) -> web.Response:
            self.posts.append((request.content_type, await request.read()))
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/traces"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_a_retried_request_is_one_span_with_a_child_per_attempt(
    tmp_path: Path, openai_upstream: OpenAIWireServer, loop_thread: LoopThread
):
    collector = OtlpCollector()
    loop_thread.run(collector.start())
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "K"}},
        models=openai_models(),
        resilience={"max_retries": 1, "retry_base_s": 0},
        tracing={"enabled": True, "otlp_endpoint": collector.url, "service_name": "thrifty-test"},
    )
    openai_upstream.queue(Reply(status=500), Reply(prompt_tokens=40, completion_tokens=7))
    memory = InMemorySpanExporter()
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    assert gateway.tracer is not None
    gateway.tracer.provider.add_span_processor(SimpleSpanProcessor(memory))
    async with gateway:
        ctx, _ = await gateway.chat_completion(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            tenant="acme",
            feature="search",
        )
    spans = memory.get_finished_spans()
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    attrs: dict[str, Any] = dict(request.attributes or {})
    assert request.name == "chat gpt-4o-mini"
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == 40 and attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["thrifty.request_id"] == ctx.request_id and attrs["thrifty.feature"] == "search"
    assert attrs["thrifty.tenant"] == "acme" and attrs["thrifty.cost_usd"] == ctx.trailer["cost_usd"]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [500, 200]  # type: ignore[index]
    assert (
        attempts[0].status.status_code == StatusCode.ERROR and attempts[0].attributes["error.type"] == "500"
    )  # type: ignore[index]
    for a in attempts:
        assert a.parent is not None and a.parent.span_id == request.context.span_id  # type: ignore[union-attr]
        assert a.context.trace_id == request.context.trace_id  # type: ignore[union-attr]
        assert a.attributes["gen_ai.provider.name"] == "up"  # type: ignore[index]
        assert request.start_time <= a.start_time and a.end_time <= request.end_time  # type: ignore[operator]
    # The same spans went out over OTLP/HTTP to the collector when the gateway closed.
    assert collector.posts and all(kind == "application/x-protobuf" for kind, _ in collector.posts)
    assert b"chat gpt-4o-mini" in b"".join(body for _, body in collector.posts)
    assert b"thrifty-test" in b"".join(body for _, body in collector.posts)
    loop_thread.run(collector.stop())


async def test_tracing_is_off_by_default_and_costs_nothing(tmp_path: Path, openai_upstream: OpenAIWireServer):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "K"}},
        models=openai_models(),
    )
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    assert gateway.tracer is None
    assert not gateway.ledger._observers  # nothing runs per batch either
    async with gateway:
        await gateway.chat_completion(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, tenant="acme"
        )
