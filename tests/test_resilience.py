"""A provider that fails on purpose: retries within budget, breaker, fallback, every attempt recorded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MSG = [{"role": "user", "content": "hello"}]


def _server(tmp_path: Path, upstream, **resilience: Any) -> BackgroundServer:
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url, "timeout_s": 0.5}},
        models=openai_models(),
        routes={"robust": {"model": "gpt-4o-mini", "fallbacks": ["gpt-4o"], "max_retries": 1}},
        resilience={
            "retry_base_s": 0.01,
            "retry_max_s": 1.0,
            "breaker_failures": 3,
            "breaker_cooldown_s": 0.5,
            **resilience,
        },
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0, timeout=20)


def _attempts(row: dict[str, Any]) -> list[dict[str, Any]]:
    return orjson.loads(row["attempts"])


def test_500_then_success_is_retried_and_both_attempts_are_recorded(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(status=500), Reply(text="second time lucky"))
    with _server(tmp_path, openai_upstream) as server:
        answer = _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert answer.choices[0].message.content == "second time lucky"
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["retries"] == 1 and row["status"] == "ok"
    first = _attempts(row)[0]
    assert (first["status"], first["cost_usd"]) == (500, "0")
    assert _attempts(row)[1]["status"] == 200


def test_429_retry_after_is_honoured_and_a_hang_past_the_timeout_is_retried(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(status=429, headers={"Retry-After": "0.4"}), Reply(text="after the wait"))
    with _server(tmp_path, openai_upstream) as server:
        started = time.monotonic()
        assert _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert time.monotonic() - started >= 0.4
        openai_upstream.queue(Reply(delay_s=1.5), Reply(text="fast now"))  # the provider timeout is 0.5 s
        answer = _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert answer.choices[0].message.content == "fast now"
    statuses = [[a["status"] for a in _attempts(r)] for r in ledger_rows(tmp_path / "ledger.db")]
    assert statuses == [[429, 200], [504, 200]]


def test_client_errors_are_not_retried(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(status=400, error_message="bad schema"))
    with _server(tmp_path, openai_upstream) as server, pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert len(openai_upstream.requests) == 1


def test_breaker_opens_skips_to_the_fallback_then_closes_after_a_probe(tmp_path, openai_upstream):
    with _server(tmp_path, openai_upstream) as server:
        client = _client(server)
        # Three requests whose gpt-4o-mini calls fail twice each: the fallback gpt-4o answers them.
        for _ in range(2):
            openai_upstream.queue(Reply(status=503), Reply(status=503), Reply(text="from gpt-4o"))
            answer = client.chat.completions.with_raw_response.create(model="route:robust", messages=MSG)
            assert answer.parse().choices[0].message.content == "from gpt-4o"
            assert answer.headers["x-thrifty-model"] == "gpt-4o"
        # gpt-4o-mini has failed 4 times in a row (>= 3): open. The next request skips it entirely.
        sent = len(openai_upstream.requests)
        openai_upstream.queue(Reply(text="still gpt-4o"))
        client.chat.completions.create(model="route:robust", messages=MSG)
        assert [r["model"] for r in openai_upstream.requests[sent:]] == ["gpt-4o-2024-08-06"]
        # After the cool-down one probe goes to gpt-4o-mini; it succeeds and the circuit closes.
        time.sleep(0.6)
        openai_upstream.queue(Reply(text="mini is back"), Reply(text="mini again"))
        assert client.chat.completions.create(model="route:robust", messages=MSG).choices[
            0
        ].message.content == ("mini is back")
        assert client.chat.completions.create(model="route:robust", messages=MSG).choices[
            0
        ].message.content == ("mini again")
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [a["model"] for a in _attempts(rows[0])] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
    assert rows[0]["model"] == "gpt-4o" and rows[0]["retries"] == 2


def test_all_targets_failing_gives_one_clear_error(tmp_path, openai_upstream):
    openai_upstream.default = Reply(status=502, error_message="bad gateway upstream")
    with _server(tmp_path, openai_upstream) as server, pytest.raises(openai.APIStatusError) as info:
        _client(server).chat.completions.create(model="route:robust", messages=MSG)
    assert info.value.status_code == 502 and info.value.body["code"] == "all_attempts_failed"
    # One sentence per distinct failure, with how often it happened, not the sentence once per call.
    assert "all 4 calls failed" in info.value.message and "gpt-4o (2 attempts):" in info.value.message
    assert info.value.message.count("bad gateway upstream") == 2
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert len(_attempts(row)) == 4 and row["status"] == "error"


def test_retry_budget_caps_extra_calls_during_an_outage(tmp_path, openai_upstream):
    openai_upstream.default = Reply(status=500)
    with _server(
        tmp_path, openai_upstream, retry_budget_per_minute=2, breaker_failures=100, max_retries=3
    ) as server:
        client = _client(server)
        for _ in range(4):
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    # 4 requests, but only 2 extra calls in the minute: 6 upstream calls, not 16.
    assert len(openai_upstream.requests) == 6


def test_a_stream_refused_at_connection_is_retried(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(status=503), Reply(text="streamed fine"))
    with _server(tmp_path, openai_upstream) as server:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
            if c.choices
        )
    assert text == "streamed fine"
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert [a["status"] for a in _attempts(row)] == [503, 200] and row["stream"] == 1


def test_a_stream_dropped_mid_way_is_not_retried_and_is_billed_for_what_was_sent(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(text="a long answer that is cut short", drop_after_chunks=3))
    with _server(tmp_path, openai_upstream) as server, pytest.raises(openai.APIError):
        for _ in _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):
            pass
    # Part of an answer reached the client: it cannot be swapped for another generation.
    assert len(openai_upstream.requests) == 1
    (row,) = ledger_rows(tmp_path / "ledger.db")
    (attempt,) = _attempts(row)
    assert attempt["output_tokens"] > 0 and attempt["usage_estimated"] is True and row["status"] == "error"


def test_a_connection_dropped_before_the_first_event_is_retried(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(drop_after_chunks=0), Reply(text="second connection"))
    with _server(tmp_path, openai_upstream) as server:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
            if c.choices
        )
    assert text == "second connection" and len(openai_upstream.requests) == 2


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_provider_is_one_clear_sentence_and_a_502_streamed_or_not(tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": dead, "timeout_s": 0.5}},
        models=openai_models(),
        resilience={"retry_base_s": 0.0, "max_retries": 2, "breaker_failures": 4, "breaker_cooldown_s": 30},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = _client(server)
        seen = []
        for stream in (False, True, False):
            with pytest.raises(openai.APIStatusError) as info:
                if stream:
                    list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True))
                else:
                    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            seen.append((info.value.status_code, info.value.body["code"], info.value.message))
    # Calls 1-3 fail; the 4th opens the breaker during the second request, whose last call was
    # made and refused: still a 502. The third request finds every target skipped: 503.
    assert [s[:2] for s in seen] == [
        (502, "provider_unreachable"),
        (502, "all_attempts_failed"),
        (503, "circuit_open"),
    ]
    first = seen[0][2]
    assert "ssl:default" not in first and "connection refused" in first.lower()
    assert first.count("cannot reach") == 1 and len(first) < 300
    assert "skipped" in seen[1][2] and seen[1][2].count("cannot reach") == 1


def test_a_provider_without_its_key_is_refused_naming_the_variable_without_a_call(tmp_path, openai_upstream):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY_X"}},
        models=openai_models(),
    )
    with BackgroundServer(settings, secrets={}) as server, pytest.raises(openai.APIStatusError) as info:
        _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 502 and info.value.body["code"] == "provider_key_missing"
    assert "UP_KEY_X" in info.value.message and "providers.up.api_key_env" in info.value.message
    assert openai_upstream.requests == []  # not retried, and the provider's own 401 never reached the client
