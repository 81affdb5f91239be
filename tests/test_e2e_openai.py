"""openai SDK -> thrifty -> a local server speaking OpenAI's wire format."""

from __future__ import annotations

from decimal import Decimal

import openai
import orjson
import pytest

from tests.fakes.openai_wire import Reply

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
HEADERS = {"x-thrifty-feature": "greeting", "x-thrifty-prompt-version": "v7", "x-thrifty-user": "u-42"}


def test_non_streaming_is_priced_attributed_and_recorded(client, openai_upstream, ledger):
    openai_upstream.queue(Reply(text="Hello!", prompt_tokens=1200, cached_tokens=1024, completion_tokens=300))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, extra_headers=HEADERS
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello!"
    # gpt-4o-mini: 0.15 / 0.075 cached / 0.60 per 1M -> (176*0.15 + 1024*0.075 + 300*0.6) / 1e6
    expected = (
        Decimal(176) * Decimal("0.15") + Decimal(1024) * Decimal("0.075") + Decimal(300) * Decimal("0.6")
    ) / 10**6
    assert Decimal(raw.headers["x-thrifty-cost-usd"]) == expected
    assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    request_id = raw.headers["x-thrifty-request-id"]
    # The upstream got the provider's own model id and the client's fields untouched.
    assert openai_upstream.requests[-1]["model"] == "gpt-4o-mini"
    assert openai_upstream.requests[-1]["messages"] == MSG
    (row,) = ledger()
    assert row["request_id"] == request_id
    assert (row["tenant_id"], row["feature"], row["prompt_version"], row["user"]) == (
        "acme",
        "greeting",
        "v7",
        "u-42",
    )
    assert (row["model"], row["provider"], row["status"], row["http_status"]) == (
        "gpt-4o-mini",
        "up",
        "ok",
        200,
    )
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (1200, 1024, 300)
    assert Decimal(row["cost_usd"]) == expected
    assert row["usage_estimated"] == 0 and row["stream"] == 0 and row["cache"] == "miss"
    attempts = orjson.loads(row["attempts"])
    assert [a["model"] for a in attempts] == ["gpt-4o-mini"] and Decimal(attempts[0]["cost_usd"]) == expected


def _collect_stream(stream):
    text, last, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    return text, last, chunks


def test_streaming_and_non_streaming_cost_the_same(client, openai_upstream, ledger):
    reply = Reply(
        text="The quick brown fox jumps over the lazy dog.",
        prompt_tokens=2048,
        cached_tokens=1536,
        completion_tokens=11,
    )
    openai_upstream.queue(reply, reply)
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    text, last, _ = _collect_stream(stream)
    assert text == reply.text
    # gpt-4o-2024-08-06: 2.50 input, 1.25 cached, 10.00 output per 1M tokens.
    expected = (Decimal(512) * Decimal("2.5") + Decimal(1536) * Decimal("1.25") + Decimal(11) * 10) / 10**6
    assert Decimal(plain.headers["x-thrifty-cost-usd"]) == expected
    trailer = last.model_extra["thrifty"]
    assert Decimal(trailer["cost_usd"]) == expected
    assert trailer["usage"]["cached_input_tokens"] == 1536
    rows = ledger()
    assert [Decimal(r["cost_usd"]) for r in rows] == [expected, expected]
    assert [r["stream"] for r in rows] == [0, 1]
    assert rows[1]["ttft_ms"] is not None and rows[1]["usage_estimated"] == 0


def test_stream_usage_chunk_hidden_unless_asked(client, openai_upstream):
    openai_upstream.queue(Reply(text="abcdefghij"), Reply(text="abcdefghij"))
    # The gateway always asks upstream for usage ...
    _, last, _ = _collect_stream(
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    )
    assert openai_upstream.requests[-1]["stream_options"] == {"include_usage": True}
    # ... but a client that did not ask sees the stream it expects: the last chunk is the finish.
    assert last.choices and last.choices[0].finish_reason == "stop" and last.usage is None
    assert "thrifty" in last.model_extra
    _, last, _ = _collect_stream(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    assert last.choices == [] and last.usage.prompt_tokens == 42 and "thrifty" in last.model_extra


def test_stream_without_upstream_usage_is_counted_locally_and_flagged(client, openai_upstream, ledger):
    openai_upstream.queue(Reply(text="Counting tokens locally works offline.", stream_usage=False))
    text, last, _ = _collect_stream(
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    )
    assert text == "Counting tokens locally works offline."
    (row,) = ledger()
    assert row["usage_estimated"] == 1
    # o200k: the reply is 6 tokens; the prompt is 2 messages framed as OpenAI documents it.
    assert row["output_tokens"] == 6
    assert row["input_tokens"] > 0 and Decimal(row["cost_usd"]) > 0
    assert last.model_extra["thrifty"]["usage"]["estimated"] is True


def test_self_hosted_flat_price_and_unpriced_model(client, openai_upstream, ledger):
    openai_upstream.queue(Reply(prompt_tokens=1000, completion_tokens=500), Reply())
    flat = client.chat.completions.with_raw_response.create(model="selfhosted", messages=MSG)
    assert Decimal(flat.headers["x-thrifty-cost-usd"]) == Decimal(1500) * Decimal("0.02") / 10**6
    # A model with no known price still answers; its cost is recorded as NULL.
    unknown = client.chat.completions.with_raw_response.create(model="mystery", messages=MSG)
    assert unknown.parse().choices[0].message.content
    assert unknown.headers["x-thrifty-cost-usd"] == "unpriced"
    rows = ledger()
    assert rows[1]["model"] == "mystery" and rows[1]["cost_usd"] is None and rows[1]["status"] == "ok"


def test_route_alias_and_model_list(client, openai_upstream, ledger):
    openai_upstream.queue(Reply())
    raw = client.chat.completions.with_raw_response.create(
        model="route:support", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-thrifty-route"] == "support" and raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert ledger()[0]["route"] == "support"
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "route:support"} <= ids


def test_route_header_puts_a_request_on_a_route(client, openai_upstream, ledger):
    openai_upstream.queue(Reply())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, extra_headers={"x-thrifty-route": "support"}
    )
    # The route's model answered, not the one the code named.
    assert raw.headers["x-thrifty-route"] == "support" and raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert openai_upstream.requests[-1]["model"] == "gpt-4o-mini"
    assert ledger()[0]["route"] == "support"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="gpt-4o", messages=MSG, extra_headers={"x-thrifty-route": "nope"}
        )
    assert err.value.body["code"] == "route_not_found" and "support" in err.value.body["message"]


def test_every_request_field_passes_through(client, openai_upstream):
    openai_upstream.queue(Reply())
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MSG,
        temperature=0.2,
        top_p=0.9,
        max_tokens=77,
        seed=5,
        stop=["\n\n"],
        response_format={"type": "json_object"},
        logit_bias={"50256": -100},
        user="end-user-1",
        extra_body={"vendor_specific": {"x": 1}},
    )
    sent = openai_upstream.requests[-1]
    for key, value in {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 77,
        "seed": 5,
        "stop": ["\n\n"],
        "response_format": {"type": "json_object"},
        "logit_bias": {"50256": -100},
        "user": "end-user-1",
        "vendor_specific": {"x": 1},
    }.items():
        assert sent[key] == value, key


def test_one_pooled_connection_is_reused_across_requests(client, openai_upstream):
    for _ in range(20):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    # Sequential calls ride one kept-alive upstream connection: no client or socket per request.
    assert len(openai_upstream.peers) == 20 and len(set(openai_upstream.peers)) == 1


def test_concurrent_requests_each_get_one_ledger_row(client_for, openai_upstream, ledger):
    from concurrent.futures import ThreadPoolExecutor

    openai_upstream.default = Reply(delay_s=0.005)

    def call(i: int) -> str:
        client = client_for("acme" if i % 2 else "globex")
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, stream=False, extra_headers={"x-thrifty-feature": f"f{i % 3}"}
        )
        return raw.headers["x-thrifty-request-id"]

    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(call, range(128)))
    rows = ledger()
    assert len(rows) == 128 and {r["request_id"] for r in rows} == set(ids)
    assert sum(r["tenant_id"] == "acme" for r in rows) == 64
