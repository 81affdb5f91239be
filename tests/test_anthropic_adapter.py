"""The Anthropic adapter against a real local HTTP server that speaks Anthropic's wire format."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.fakes.anthropic_wire import AnthropicWireServer, Reply, ToolUse
from thrifty.errors import InvalidRequest, ProviderError, ProviderProtocolError, ProviderUnreachable
from thrifty.providers.anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicProvider,
    StreamTranslator,
    from_anthropic_message,
    to_anthropic_request,
    usage_from_anthropic,
)
from thrifty.providers.base import StreamChunk
from thrifty.settings import ProviderSettings
from thrifty.types import ModelTarget, Usage

KEY = "sk-ant-test-key"
MODEL = "claude-3-5-sonnet-20240620"
TARGET = ModelTarget(alias="claude", provider="anthropic", upstream_model=MODEL, context_window=200000)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def settings(base_url: str) -> ProviderSettings:
    return ProviderSettings(kind="anthropic", base_url=base_url, timeout_s=5)


@pytest.fixture
async def wire() -> AsyncIterator[AnthropicWireServer]:
    server = AnthropicWireServer(api_key=KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(wire: AnthropicWireServer) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider("anthropic", settings(wire.base_url + "/"), KEY)
    await p.start()
    yield p
    await p.close()


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "claude", "messages": list(messages), **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


async def collect(p: AnthropicProvider, body: dict[str, Any]) -> list[StreamChunk]:
    return [chunk async for chunk in p.stream(TARGET, body)]


def reassemble(chunks: list[StreamChunk]) -> tuple[dict[str, Any], str | None]:
    """Fold OpenAI stream deltas back into a message, as an SDK client would."""
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.data["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                content = (content or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                slot = calls.setdefault(
                    call["index"],
                    {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] = fn["name"]
                slot["function"]["arguments"] += fn.get("arguments") or ""
            finish = choice["finish_reason"] or finish
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish


# ---------------------------------------------------------------------------------------------
# Request translation, checked on what the server received


async def test_headers_url_model_and_defaults(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    await provider.complete(TARGET, chat(user("Hi")))
    got = wire.last
    assert got.path == "/v1/messages"
    assert got.headers["x-api-key"] == KEY
    assert got.headers["anthropic-version"] == "2023-06-01"
    assert got.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


async def test_system_multi_turn_merge_and_sampling(
    wire: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    body = chat(
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        user("Hello"),
        user([{"type": "text", "text": "Are you there?"}]),
        {"role": "assistant", "content": "Oui."},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]},
        user("Thanks"),
        max_tokens=100,
        max_completion_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop="END",
        user="u-42",
        n=1,
        seed=7,
        logprobs=False,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        stream_options={"include_usage": True},
        parallel_tool_calls=True,
        store=False,
        stream=True,
    )
    await provider.complete(TARGET, body)
    sent = wire.last.body
    assert sent == {
        "model": MODEL,
        "system": "You are terse.\n\nAnswer in French.",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "Are you there?"}],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Oui."}, {"type": "text", "text": "Bonjour."}],
            },
            {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
        ],
        # max_completion_tokens supersedes the deprecated max_tokens in OpenAI's API.
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
    }


async def test_cache_control_keeps_system_blocks(
    wire: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    body = chat(
        {"role": "system", "content": "Plain rules."},
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Long shared context", "cache_control": {"type": "ephemeral"}}
            ],
        },
        user([{"type": "text", "text": "Question", "cache_control": {"type": "ephemeral"}}]),
        stop=["a", "b"],
    )
    await provider.complete(TARGET, body)
    sent = wire.last.body
    assert sent["system"] == [
        {"type": "text", "text": "Plain rules."},
        {"type": "text", "text": "Long shared context", "cache_control": {"type": "ephemeral"}},
    ]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Question", "cache_control": {"type": "ephemeral"}}
    ]
    assert sent["stop_sequences"] == ["a", "b"]


async def test_images(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    body = chat(
        user(
            [
                {"type": "text", "text": "Compare these"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                },
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]
        )
    )
    await provider.complete(TARGET, body)
    assert wire.last.body["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_tool_round_trip_request(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    body = chat(
        user("Weather in Paris and Rome?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "22C"}]},
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    await provider.complete(TARGET, body)
    sent = wire.last.body
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "22C"}],
                },
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
        (None, None),
    ],
)
def test_tool_choice_mapping(choice: Any, expected: dict[str, Any] | None) -> None:
    body = chat(user("hi"), tools=[WEATHER_TOOL])
    if choice is not None:
        body["tool_choice"] = choice
    assert to_anthropic_request(body, MODEL).get("tool_choice") == expected


def test_json_response_format_becomes_a_system_instruction() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    body = chat(
        {"role": "system", "content": "Be helpful."},
        user("give x"),
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    system = to_anthropic_request(body, MODEL)["system"]
    assert system.startswith("Be helpful.\n\nRespond with a single JSON object")
    assert json.dumps(schema, separators=(",", ":")) in system


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (chat(user("hi"), n=2), "n=2"),
        (chat({"role": "system", "content": "only a system prompt"}), "at least one user or assistant"),
        (chat(user([{"type": "input_audio", "input_audio": {}}])), "input_audio"),
        (
            chat(
                user("hi"),
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{"}}],
                },
            ),
            "not valid JSON",
        ),
        (chat(user("hi"), tool_choice="sometimes", tools=[WEATHER_TOOL]), "tool_choice"),
        (chat(user("hi"), temperature=1.5), "temperature=1.5 is outside 0-1"),
        (chat(user("hi"), top_p="high"), "top_p='high' is outside 0-1"),
    ],
)
async def test_untranslatable_requests_fail_before_any_call(
    wire: AnthropicWireServer, provider: AnthropicProvider, body: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        await provider.complete(TARGET, body)
    with pytest.raises(InvalidRequest, match=fragment):
        await collect(provider, body)
    assert wire.requests == []


# ---------------------------------------------------------------------------------------------
# Non-stream responses


async def test_text_response_shape(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    wire.reply(Reply(text="Bonjour!", input_tokens=10, output_tokens=3))
    result = await provider.complete(TARGET, chat(user("Hi")))
    body = result.body
    ChatCompletion.model_validate(body)
    assert body["id"].startswith("msg_")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Bonjour!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert result.usage == Usage(input_tokens=10, output_tokens=3)


async def test_tool_call_response(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    use = ToolUse("get_weather", {"city": "Paris", "units": "C"}, id="toolu_abc")
    wire.reply(Reply(text=None, tool_uses=[use]))
    result = await provider.complete(TARGET, chat(user("Weather?"), tools=[WEATHER_TOOL]))
    ChatCompletion.model_validate(result.body)
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_abc"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "units": "C"}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_finish_reasons(
    wire: AnthropicWireServer, provider: AnthropicProvider, stop_reason: str, finish: str
) -> None:
    wire.reply(Reply(stop_reason=stop_reason), Reply(stop_reason=stop_reason))
    result = await provider.complete(TARGET, chat(user("Hi")))
    assert result.body["choices"][0]["finish_reason"] == finish
    _, streamed_finish = reassemble(await collect(provider, chat(user("Hi"))))
    assert streamed_finish == finish


async def test_usage_counts_cache_reads_and_writes_as_input(
    wire: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    wire.reply(
        Reply(
            input_tokens=100, cache_read_input_tokens=2000, cache_creation_input_tokens=300, output_tokens=50
        )
    )
    result = await provider.complete(TARGET, chat(user("Hi")))
    assert result.usage == Usage(
        input_tokens=2400, cached_input_tokens=2000, cache_write_tokens=300, output_tokens=50
    )
    assert result.body["usage"] == {
        "prompt_tokens": 2400,
        "completion_tokens": 50,
        "total_tokens": 2450,
        "prompt_tokens_details": {"cached_tokens": 2000},
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 2000,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 0},
    }


def test_usage_from_anthropic_splits_cache_writes_by_ttl() -> None:
    raw = {
        "input_tokens": 5,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 1,
    }
    assert usage_from_anthropic(raw) == Usage(
        input_tokens=3005, cache_write_tokens=3000, output_tokens=1, cache_write_1h_tokens=2000
    )
    # Only the split given (no total): the total is its sum.
    del raw["cache_creation_input_tokens"]
    assert usage_from_anthropic(raw).cache_write_tokens == 3000


def test_one_hour_writes_are_priced_at_genai_prices_1h_rate() -> None:
    from thrifty.pricing.catalog import PriceCatalog
    from thrifty.settings import ModelSettings, ProviderSettings

    catalog = PriceCatalog.from_settings(
        {"haiku": ModelSettings(provider="a", upstream="claude-haiku-4-5")},
        {"a": ProviderSettings(kind="anthropic", base_url="http://x")},
    )
    usage = Usage(input_tokens=3000, cache_write_tokens=3000, cache_write_1h_tokens=2000)
    # 1,000 at the 5-minute rate ($1.25) and 2,000 at the 1-hour rate ($2) per million.
    assert catalog.cost("haiku", usage) == Decimal("0.00525")
    from genai_prices import Usage as GenaiUsage
    from genai_prices import calc_price

    theirs = calc_price(
        GenaiUsage(input_tokens=3000, cache_write_tokens=3000, cache_write_1h_tokens=2000),
        model_ref="claude-haiku-4-5",
        provider_id="anthropic",
    ).total_price
    assert catalog.cost("haiku", usage) == theirs


def test_usage_from_anthropic_tolerates_missing_and_null_cache_fields() -> None:
    assert usage_from_anthropic({"input_tokens": 5, "output_tokens": 2}) == Usage(
        input_tokens=5, output_tokens=2
    )
    raw = {"input_tokens": 5, "cache_read_input_tokens": None, "cache_creation_input_tokens": None}
    assert usage_from_anthropic(raw) == Usage(input_tokens=5)


async def test_response_that_is_not_a_message(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    wire.reply(Reply(error_status=200, error_message="weird"))
    with pytest.raises(ProviderProtocolError):
        await provider.complete(TARGET, chat(user("Hi")))


# ---------------------------------------------------------------------------------------------
# Streaming


async def test_stream_text_matches_non_stream(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    reply = Reply(
        text="The quick brown fox jumps over the lazy dog.",
        input_tokens=40,
        cache_read_input_tokens=1024,
        cache_creation_input_tokens=64,
        output_tokens=11,
    )
    wire.reply(reply, reply)
    complete = await provider.complete(TARGET, chat(user("Hi")))
    chunks = await collect(provider, chat(user("Hi"), stream=True))
    assert wire.last.body["stream"] is True

    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.data)
    assert chunks[0].data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({(c.data["id"], c.data["created"], c.data["model"]) for c in chunks}) == 1
    assert chunks[0].data["model"] == MODEL

    message, finish = reassemble(chunks)
    assert message == complete.body["choices"][0]["message"]
    assert finish == "stop"

    final = chunks[-1]
    assert final.data["choices"] == []
    assert final.usage == complete.usage == Usage(1128, 1024, 64, 11)
    assert final.data["usage"] == complete.body["usage"]
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_tool_calls_match_non_stream(
    wire: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    uses = [
        ToolUse("get_weather", {"city": "Paris"}),
        ToolUse("get_weather", {"city": "Rome", "days": [1, 2]}),
    ]
    reply = Reply(text="Let me check both.", tool_uses=uses, output_tokens=60)
    wire.reply(reply, reply)
    body = chat(user("Weather?"), tools=[WEATHER_TOOL])
    complete = await provider.complete(TARGET, body)
    chunks = await collect(provider, {**body, "stream": True})

    message, finish = reassemble(chunks)
    expected = complete.body["choices"][0]["message"]
    # Streamed arguments are Anthropic's own JSON text, so only their meaning must match.
    assert without_arguments(message) == without_arguments(expected)
    assert [arguments(m) for m in (message, expected)] == [[u.input for u in uses]] * 2
    assert finish == "tool_calls"
    # OpenAI numbers tool calls from 0 even when a text block comes first.
    starts = [c.data["choices"][0]["delta"]["tool_calls"][0] for c in chunks if _starts_tool(c)]
    assert [(s["index"], s["id"]) for s in starts] == [(0, uses[0].id), (1, uses[1].id)]
    assert chunks[-1].usage == complete.usage


def arguments(message: dict[str, Any]) -> list[Any]:
    return [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]]


def without_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = [{**c, "function": {**c["function"], "arguments": None}} for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _starts_tool(chunk: StreamChunk) -> bool:
    choices = chunk.data["choices"]
    return bool(choices) and any("id" in call for call in choices[0]["delta"].get("tool_calls") or ())


async def test_stream_cut_cleanly_just_stops(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    wire.reply(Reply(text="abcdefghijklmno", end_after_events=4))
    chunks = await collect(provider, chat(user("Hi")))
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert reassemble(chunks)[0]["content"] == "abcde"


async def test_stream_connection_dropped(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    wire.reply(Reply(text="abcdefghijklmno", drop_after_events=5))
    seen: list[StreamChunk] = []
    with pytest.raises(ProviderUnreachable):
        async for chunk in provider.stream(TARGET, chat(user("Hi"))):
            seen.append(chunk)
    assert all(c.usage is None for c in seen)


async def test_stream_error_event(wire: AnthropicWireServer, provider: AnthropicProvider) -> None:
    wire.reply(Reply(stream_error=("overloaded_error", "Overloaded")))
    with pytest.raises(ProviderError, match="Overloaded") as info:
        await collect(provider, chat(user("Hi")))
    assert info.value.status == 502


def test_translator_ignores_pings_and_unknown_events() -> None:
    t = StreamTranslator("anthropic", created=1)
    t.feed({"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3}}})
    assert t.feed({"type": "ping"}) == []
    assert t.feed({"type": "some_future_event"}) == []
    assert t.feed({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta"}}) == []
    t.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}})
    t.feed({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 4}})
    [final] = t.feed({"type": "message_stop"})
    assert t.finished
    assert final.usage == Usage(input_tokens=3, output_tokens=4)


def test_from_anthropic_message_without_usage() -> None:
    out = from_anthropic_message(
        {
            "id": "msg_1",
            "model": "m",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        created=5,
    )
    assert out["choices"][0]["message"]["content"] == "ab"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in out


# ---------------------------------------------------------------------------------------------
# Errors


async def test_wrong_key_is_passed_on_as_401(wire: AnthropicWireServer) -> None:
    p = AnthropicProvider("anthropic", settings(wire.base_url), "sk-ant-wrong")
    await p.start()
    try:
        for call in (p.complete(TARGET, chat(user("Hi"))), collect(p, chat(user("Hi")))):
            with pytest.raises(ProviderError) as info:
                await call
            assert info.value.status == 401
            assert "invalid x-api-key" in info.value.message
            assert info.value.to_openai()["error"]["type"] == "authentication_error"
    finally:
        await p.close()


@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
        (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit"),
        (529, "overloaded_error", "Overloaded"),
    ],
)
async def test_http_errors_are_passed_on(
    wire: AnthropicWireServer, provider: AnthropicProvider, status: int, error_type: str, message: str
) -> None:
    wire.reply(*[Reply(error_status=status, error_type=error_type, error_message=message)] * 2)
    for call in (provider.complete(TARGET, chat(user("Hi"))), collect(provider, chat(user("Hi")))):
        with pytest.raises(ProviderError) as info:
            await call
        assert info.value.status == status
        assert message in info.value.message
        assert info.value.provider == "anthropic"


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = AnthropicProvider("anthropic", settings(f"http://127.0.0.1:{port}"), KEY)
    await p.start()
    try:
        with pytest.raises(ProviderUnreachable):
            await p.complete(TARGET, chat(user("Hi")))
        with pytest.raises(ProviderUnreachable):
            await collect(p, chat(user("Hi")))
    finally:
        await p.close()
