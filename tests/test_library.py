"""The same pipeline in-process, as a library, and settings that refuse unpriced models."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.errors import NotFound
from thrifty.gateway import Gateway
from thrifty.pipeline import Completion, Streamed
from thrifty.server.run import BackgroundServer


async def test_gateway_as_a_library(tmp_path: Path):
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    await upstream.start()
    upstream.queue(
        Reply(text="library answer", prompt_tokens=100, completion_tokens=10), Reply(text="streamed")
    )
    settings = base_settings(
        tmp_path, providers={"up": {"kind": "openai", "base_url": upstream.base_url}}, models=openai_models()
    )
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    await gateway.start()
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ctx, result = await gateway.chat_completion(body, tenant="acme", feature="lib")
        assert isinstance(result, Completion)
        assert result.body["choices"][0]["message"]["content"] == "library answer"
        assert ctx.trailer is not None
        assert Decimal(ctx.trailer["cost_usd"]) == (100 * Decimal("0.15") + 10 * Decimal("0.6")) / 10**6
        ctx, result = await gateway.chat_completion({**body, "stream": True}, tenant="globex")
        assert isinstance(result, Streamed)
        texts = [
            c.data["choices"][0]["delta"].get("content", "") async for c in result.chunks if c.data["choices"]
        ]
        assert "".join(texts) == "streamed"
        with pytest.raises(NotFound):
            await gateway.chat_completion({**body, "model": "nope"}, tenant="acme")
    finally:
        await gateway.close()
        await upstream.stop()
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [(r["tenant_id"], r["status"]) for r in rows] == [
        ("acme", "ok"),
        ("globex", "ok"),
        ("acme", "error"),
    ]


def test_reject_unpriced_refuses_only_the_unpriced_model(tmp_path: Path, openai_upstream):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        pricing={"reject_unpriced": True},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="mystery", messages=[{"role": "user", "content": "x"}])
        assert info.value.body["code"] == "model_not_priced" and "models.mystery.price" in info.value.message
        # One unpriced model does not block the others.
        assert client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert len(openai_upstream.requests) == 1


class _BuggyProvider:
    name = "up"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def complete(self, target, body):
        raise RuntimeError("adapter bug")

    def stream(self, target, body):
        raise RuntimeError("adapter bug")


async def test_an_unexpected_bug_is_still_recorded_then_raised(tmp_path: Path):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        models=openai_models(),
    )
    gateway = Gateway(settings, providers={"up": _BuggyProvider()})
    await gateway.start()
    try:
        with pytest.raises(RuntimeError, match="adapter bug"):
            await gateway.chat_completion(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}, tenant="acme"
            )
    finally:
        await gateway.close()
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["status"] == "error" and row["http_status"] == 500 and "adapter bug" in row["error"]


async def test_library_calls_carry_the_tags_headers_carry(tmp_path: Path):
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    await upstream.start()
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        routes={"desk": {"model": "gpt-4o-mini", "pin": {"legal": "gpt-4o"}}},
    )
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    await gateway.start()
    try:
        body = {"model": "route:desk", "messages": [{"role": "user", "content": "hi"}]}
        ctx, _ = await gateway.chat_completion(
            body,
            tenant="acme",
            task="legal",
            corpus_version="kb-2",
            evidence=("b", "a", "b"),
            cache_control="No-Store",
        )
        assert ctx.trailer is not None and ctx.trailer["model"] == "gpt-4o"  # the pinned task's model
        assert (ctx.tags.corpus_version, ctx.tags.evidence, ctx.tags.cache_control) == (
            "kb-2",
            ("a", "b"),
            "no-store",
        )
    finally:
        await gateway.close()
        await upstream.stop()
