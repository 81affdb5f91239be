"""openai SDK -> thrifty -> a local server speaking Anthropic's Messages wire format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import KEYS, LoopThread, base_settings
from tests.fakes.anthropic_wire import AnthropicWireServer, Reply, ToolUse
from thrifty.server.run import BackgroundServer

ANTHROPIC_KEY = "sk-ant-fake"
MSG = [
    {"role": "system", "content": "You are a support agent for Acme."},
    {"role": "user", "content": "Where is my order?"},
]
# claude-3-5-sonnet: $3 input, $0.30 cache read, $3.75 cache write, $15 output per 1M tokens.
IN, READ, WRITE, OUT = Decimal(3), Decimal("0.3"), Decimal("3.75"), Decimal(15)


@pytest.fixture
def anthropic_upstream(loop_thread: LoopThread) -> Iterator[AnthropicWireServer]:
    server = AnthropicWireServer(api_key=ANTHROPIC_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


@pytest.fixture
def claude(tmp_path: Path, anthropic_upstream: AnthropicWireServer) -> Iterator[openai.OpenAI]:
    settings = base_settings(
        tmp_path,
        providers={
            "anthropic": {
                "kind": "anthropic",
                "base_url": anthropic_upstream.base_url,
                "api_key_env": "ANTHROPIC_API_KEY",
            }
        },
        models={
            "claude-sonnet": {
                "provider": "anthropic",
                "upstream": "claude-3-5-sonnet-20240620",
                "context_window": 200000,
            }
        },
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings, secrets={"anthropic": ANTHROPIC_KEY}) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)


def _cost(uncached: int, read: int, write: int, out: int) -> Decimal:
    return (uncached * IN + read * READ + write * WRITE + out * OUT) / 10**6


def test_claude_through_the_openai_sdk_with_prompt_cache_pricing(claude, anthropic_upstream, ledger):
    anthropic_upstream.reply(
        Reply(
            text="It ships tomorrow.",
            input_tokens=50,
            cache_read_input_tokens=3000,
            cache_creation_input_tokens=1200,
            output_tokens=7,
        )
    )
    raw = claude.chat.completions.with_raw_response.create(
        model="claude-sonnet", messages=MSG, max_tokens=300
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "It ships tomorrow."
    assert completion.choices[0].finish_reason == "stop"
    # OpenAI's convention in the response: prompt_tokens includes cached reads and writes.
    assert (
        completion.usage.prompt_tokens == 4250
        and completion.usage.prompt_tokens_details.cached_tokens == 3000
    )
    sent = anthropic_upstream.requests[-1]
    assert sent.body["system"] == "You are a support agent for Acme."
    assert sent.body["model"] == "claude-3-5-sonnet-20240620" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    expected = _cost(50, 3000, 1200, 7)
    assert Decimal(raw.headers["x-thrifty-cost-usd"]) == expected
    (row,) = ledger()
    assert (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["cache_write_tokens"],
        row["output_tokens"],
    ) == (4250, 3000, 1200, 7)
    assert Decimal(row["cost_usd"]) == expected and row["provider"] == "anthropic"


def test_claude_stream_costs_the_same_as_non_stream(claude, anthropic_upstream, ledger):
    reply = Reply(
        text="Your parcel left the depot this morning.",
        input_tokens=80,
        cache_read_input_tokens=2048,
        cache_creation_input_tokens=0,
        output_tokens=10,
    )
    anthropic_upstream.reply(reply, reply)
    plain = claude.chat.completions.with_raw_response.create(model="claude-sonnet", messages=MSG)
    text, last = "", None
    for chunk in claude.chat.completions.create(model="claude-sonnet", messages=MSG, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert text == reply.text
    expected = _cost(80, 2048, 0, 10)
    assert Decimal(plain.headers["x-thrifty-cost-usd"]) == expected
    assert Decimal(last.model_extra["thrifty"]["cost_usd"]) == expected
    assert [Decimal(r["cost_usd"]) for r in ledger()] == [expected, expected]
    assert [r["cached_input_tokens"] for r in ledger()] == [2048, 2048]


def test_claude_tool_calls_round_trip(claude, anthropic_upstream):
    anthropic_upstream.reply(Reply(text=None, tool_uses=[ToolUse("lookup_order", {"order_id": "A-17"})]))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Find an order",
                "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
            },
        }
    ]
    completion = claude.chat.completions.create(model="claude-sonnet", messages=MSG, tools=tools)
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {
        "order_id": "A-17"
    }
    assert anthropic_upstream.requests[-1].body["tools"][0]["input_schema"]["properties"] == {
        "order_id": {"type": "string"}
    }
    # The tool result goes back as a second turn, translated into Anthropic's tool_result block.
    anthropic_upstream.reply(Reply(text="Order A-17 is on its way."))
    follow_up = [
        *MSG,
        completion.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "shipped"},
    ]
    answer = claude.chat.completions.create(model="claude-sonnet", messages=follow_up, tools=tools)
    assert answer.choices[0].message.content == "Order A-17 is on its way."
    blocks = anthropic_upstream.requests[-1].body["messages"][-1]["content"]
    assert blocks[0]["type"] == "tool_result" and blocks[0]["tool_use_id"] == call.id


def test_anthropic_errors_pass_through(claude, anthropic_upstream):
    anthropic_upstream.reply(
        Reply(error_status=529, error_type="overloaded_error", error_message="Overloaded")
    )
    with pytest.raises(openai.APIStatusError) as info:
        claude.chat.completions.create(model="claude-sonnet", messages=MSG)
    assert info.value.status_code == 529 and "Overloaded" in info.value.message


def test_prompt_cache_breakpoints_on_the_static_prefix(
    tmp_path: Path, anthropic_upstream: AnthropicWireServer
):
    settings = base_settings(
        tmp_path,
        providers={
            "anthropic": {"kind": "anthropic", "base_url": anthropic_upstream.base_url},
            "openai": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
        },
        models={"claude-sonnet": {"provider": "anthropic", "upstream": "claude-3-5-sonnet-20240620"}},
        routes={
            "support": {"model": "claude-sonnet", "prompt_cache": True},
            "plain": {"model": "claude-sonnet"},
        },
        resilience={"max_retries": 0},
    )
    tools = [
        {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}},
    ]
    # A cache hit of 3000 prompt tokens and a write of 1200, priced at their own rates.
    reply = Reply(
        text="ok",
        input_tokens=40,
        cache_read_input_tokens=3000,
        cache_creation_input_tokens=1200,
        output_tokens=5,
    )
    anthropic_upstream.reply(reply, reply, reply)
    with BackgroundServer(settings, secrets={"anthropic": ANTHROPIC_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="route:support", messages=MSG, tools=tools
        )
        marked = anthropic_upstream.requests[-1].body
        assert marked["system"] == [
            {"type": "text", "text": MSG[0]["content"], "cache_control": {"type": "ephemeral"}}
        ]
        assert "cache_control" not in marked["tools"][0]
        assert marked["tools"][-1]["cache_control"] == {"type": "ephemeral"}
        assert Decimal(raw.headers["x-thrifty-cost-usd"]) == _cost(40, 3000, 1200, 5)
        # Routes without prompt_cache, and requests that mark breakpoints themselves, are left alone.
        client.chat.completions.create(model="route:plain", messages=MSG, tools=tools)
        assert anthropic_upstream.requests[-1].body["system"] == MSG[0]["content"]
        own = [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}],
            },
            MSG[1],
        ]
        client.chat.completions.create(model="route:support", messages=own, tools=tools)
        assert "cache_control" not in anthropic_upstream.requests[-1].body["tools"][-1]


def test_one_hour_cache_writes_are_priced_at_their_own_rate_streamed_or_not(
    tmp_path, anthropic_upstream, ledger
):
    settings = base_settings(
        tmp_path,
        providers={"anthropic": {"kind": "anthropic", "base_url": anthropic_upstream.base_url}},
        models={"haiku": {"provider": "anthropic", "upstream": "claude-haiku-4-5"}},
        resilience={"max_retries": 0},
    )
    reply = Reply(
        text="Cached for an hour.",
        input_tokens=50,
        cache_creation_input_tokens=1000,
        cache_creation_1h_input_tokens=2000,
        output_tokens=7,
    )
    anthropic_upstream.reply(reply, reply)
    with BackgroundServer(settings, secrets={"anthropic": ANTHROPIC_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        plain = client.chat.completions.with_raw_response.create(model="haiku", messages=MSG)
        last = None
        for chunk in client.chat.completions.create(
            model="haiku", messages=MSG, stream=True, stream_options={"include_usage": True}
        ):
            last = chunk
    # claude-haiku-4-5 list prices per million: $1 input, $1.25 5-minute write, $2 1-hour write, $5 output.
    expected = (50 * Decimal(1) + 1000 * Decimal("1.25") + 2000 * Decimal(2) + 7 * Decimal(5)) / 10**6
    assert expected == Decimal("0.005335")
    assert Decimal(plain.headers["x-thrifty-cost-usd"]) == expected
    assert last is not None and Decimal(last.model_extra["thrifty"]["cost_usd"]) == expected
    assert last.model_extra["thrifty"]["usage"]["cache_write_1h_tokens"] == 2000
    # The client sees Anthropic's split in the usage, in OpenAI's shape.
    assert plain.parse().usage.model_extra["cache_creation"] == {
        "ephemeral_5m_input_tokens": 1000,
        "ephemeral_1h_input_tokens": 2000,
    }
    rows = ledger()
    assert [Decimal(r["cost_usd"]) for r in rows] == [expected, expected]
    assert [r["cache_write_tokens"] for r in rows] == [3000, 3000]
    assert [json.loads(r["attempts"])[0]["cache_write_1h_tokens"] for r in rows] == [2000, 2000]
