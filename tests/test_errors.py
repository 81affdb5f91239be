"""Every error case of the HTTP API: OpenAI error JSON, the right status, a helpful message."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import KEYS, base_settings, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MSG = [{"role": "user", "content": "hello there"}]


def _post(gateway, body: bytes | str, key: str | None = KEYS["acme"]) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(gateway.base_url + "/chat/completions", content=body, headers=headers, timeout=10)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_malformed_json_is_400(gateway):
    resp = _post(gateway, b'{"model": "gpt-4o-mini", "messages": [')
    assert resp.status_code == 400
    assert "not valid JSON" in _error(resp)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ('{"model": "gpt-4o-mini", "messages": []}', "messages"),
        ('{"model": "gpt-4o-mini", "messages": ["just a string"]}', "messages[0]"),
        (
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
        ),
        (
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
        ),
        ("[1, 2]", None),
    ],
)
def test_schema_errors_are_400_naming_the_field(gateway, ledger, body, param):
    resp = _post(gateway, body)
    assert resp.status_code == 400
    err = _error(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    # The key was good: the refusal is attributed like any request, with its own id.
    (row,) = ledger()
    assert (row["tenant_id"], row["status"], row["http_status"]) == ("acme", "error", 400)
    assert row["request_id"] == resp.headers["x-thrifty-request-id"] and Decimal(row["cost_usd"]) == 0


def test_bad_or_missing_key_is_401(gateway, ledger):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(
            base_url=gateway.base_url, api_key="thr-not-a-key", max_retries=0
        ).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 401 and "invalid API key" in info.value.message
    resp = _post(gateway, b"{}", key=None)
    assert resp.status_code == 401 and "keys create" in _error(resp)["message"]
    assert ledger() == []  # nothing is attributed to an unknown caller


def test_unknown_model_and_route_are_404(client, ledger):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9-ultra", messages=MSG)
    assert "unknown model 'gpt-9-ultra'" in info.value.message and "gpt-4o-mini" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="route:nope", messages=MSG)
    assert info.value.body["code"] == "route_not_found" and "support" in info.value.message
    rows = ledger()
    assert [(r["status"], r["http_status"]) for r in rows] == [("error", 404), ("error", 404)]
    assert all(Decimal(r["cost_usd"]) == 0 for r in rows)


def test_prompt_over_context_window_is_400_with_counts(client, openai_upstream):
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=10)
    err = info.value.body
    assert err["code"] == "context_length_exceeded"
    # "word " * 200 is 201 o200k tokens (the last space is one) + 3 message framing + 1 role
    # + 3 reply priming = 208, as OpenAI counts a chat prompt.
    assert "208 in the messages and 10 requested" in info.value.message and "40 tokens" in info.value.message
    assert openai_upstream.requests == []  # rejected before any spend


def test_prompt_over_route_limit_is_400_with_counts(client, openai_upstream):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="route:support", messages=[{"role": "user", "content": "word " * 40}]
        )
    assert info.value.body["code"] == "route_input_limit_exceeded"
    assert "has 48 tokens" in info.value.message and "limit of 30" in info.value.message
    assert openai_upstream.requests == []


@pytest.mark.parametrize("status", [400, 422, 429, 500, 503])
def test_provider_errors_pass_through_with_status_and_message(client, openai_upstream, ledger, status):
    openai_upstream.queue(Reply(status=status, error_message=f"upstream says {status}", error_type="quota"))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == status
    assert f"upstream says {status}" in info.value.message and info.value.body["type"] == "quota"
    (row,) = ledger()
    assert row["status"] == "error" and row["http_status"] == status and Decimal(row["cost_usd"]) == 0


def test_provider_error_on_a_stream_keeps_its_status(client, openai_upstream):
    openai_upstream.queue(Reply(status=429, error_message="slow down"))
    with pytest.raises(openai.RateLimitError) as info:
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):
            pass
    assert "slow down" in info.value.message


def test_provider_timeout_is_504(client, openai_upstream, ledger):
    openai_upstream.queue(Reply(delay_s=4))  # the gateway's timeout for this provider is 2 s
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 504 and "did not answer within 2s" in info.value.message
    assert ledger()[0]["http_status"] == 504


def test_provider_unreachable_is_502(tmp_path: Path):
    settings = base_settings(
        tmp_path,
        providers={"down": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "connect_timeout_s": 1}},
        models=openai_models("down"),
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "provider_unreachable" and "base_url" in info.value.message


def test_provider_drops_connection_mid_stream(client, openai_upstream, ledger):
    openai_upstream.queue(Reply(text="a long answer that never finishes", drop_after_chunks=3))
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):
            pass
    (row,) = ledger()
    # What was generated before the drop is still paid for, and counted locally.
    assert row["status"] == "error" and row["output_tokens"] > 0 and row["usage_estimated"] == 1


def test_unknown_path_and_wrong_method(gateway):
    resp = httpx.get(gateway.base_url + "/embeddings-nope")
    assert resp.status_code == 404 and _error(resp)["code"] == "unknown_url"
    resp = httpx.get(gateway.base_url + "/chat/completions")
    assert resp.status_code == 405


def test_oversized_body_is_413(gateway, ledger):
    resp = _post(
        gateway,
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        + b"x" * (17 * 1024 * 1024)
        + b'"}]}',
    )
    assert resp.status_code == 413 and "max_body_bytes" in _error(resp)["message"]
    (row,) = ledger()
    assert (row["tenant_id"], row["http_status"]) == ("acme", 413) and "max_body_bytes" in row["error"]


def test_malformed_json_with_a_good_key_is_in_the_ledger(gateway, ledger):
    resp = _post(gateway, b'{"model": "gpt-4o-mini", "messages": [')
    assert resp.status_code == 400
    (row,) = ledger()
    assert row["http_status"] == 400 and "not valid JSON" in row["error"]


@pytest.mark.parametrize("header", [KEYS["acme"], f"Basic {KEYS['acme']}", "Bearer", f"Token {KEYS['acme']}"])
def test_only_the_bearer_form_of_the_key_is_accepted(gateway, ledger, header):
    resp = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MSG},
        headers={"authorization": header},
        timeout=10,
    )
    assert resp.status_code == 401 and "Bearer KEY" in _error(resp)["message"]
    assert ledger() == []


def test_a_stream_says_its_cache_outcome_in_the_headers(client):
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MSG, stream=True
    ) as resp:
        assert resp.headers["x-thrifty-cache"] == "miss" and resp.headers["x-thrifty-model"] == "gpt-4o-mini"
        # The cost is not known yet: it is in the last event's `thrifty` field, never a guessed header.
        assert "x-thrifty-cost-usd" not in resp.headers
        events = [line for line in resp.iter_lines() if line.startswith("data: {")]
        assert '"cost_usd"' in events[-1]
