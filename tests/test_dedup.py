"""No duplicate generation: Idempotency-Key and single-flight, through the real gateway."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MSG = [{"role": "user", "content": "Book me a table for two."}]
COST = (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6  # the fake's default usage on gpt-4o-mini


@pytest.fixture
def server(tmp_path: Path, openai_upstream):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={"faq": {"model": "gpt-4o-mini", "coalesce": True}},
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as srv:
        yield srv


def _client(server: BackgroundServer, tenant: str = "acme", timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0, timeout=timeout)


def test_50_concurrent_requests_with_one_key_make_one_call_and_one_charge(server, openai_upstream, tmp_path):
    openai_upstream.default = Reply(text="Table booked.", delay_s=0.3)
    client = _client(server)

    def call(i: int) -> str:
        stream = i % 5 == 0  # some of the repeats stream: they get the same answer as SSE
        headers = {"Idempotency-Key": "order-7731"}
        if stream:
            text = ""
            for chunk in client.chat.completions.create(
                model="gpt-4o-mini", messages=MSG, stream=True, extra_headers=headers
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return text
        return (
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(call, range(50)))
    assert answers == ["Table booked."] * 50
    assert len(openai_upstream.requests) == 1
    rows = ledger_rows(tmp_path / "ledger.db")
    assert len(rows) == 50 and {r["idempotency_key"] for r in rows} == {"order-7731"}
    charged = [Decimal(r["cost_usd"]) for r in rows if Decimal(r["cost_usd"]) > 0]
    assert charged == [COST]  # one charge; the 49 others cost nothing and record what they saved
    assert sum(Decimal(r["saved_usd"]) for r in rows if r["saved_usd"]) == 49 * COST
    # After it finished, a repeat gets the stored result without a call.
    again = client.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, extra_headers={"Idempotency-Key": "order-7731"}
    )
    assert again.choices[0].message.content == "Table booked." and len(openai_upstream.requests) == 1


def test_a_client_that_times_out_and_retries_gets_the_first_result(server, openai_upstream):
    openai_upstream.queue(Reply(text="first and only", delay_s=1.0), Reply(text="a second generation"))
    headers = {"Idempotency-Key": "pay-1"}
    with pytest.raises(openai.APITimeoutError):
        _client(server, timeout=0.3).chat.completions.create(
            model="gpt-4o-mini", messages=MSG, extra_headers=headers
        )
    retry = _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
    assert retry.choices[0].message.content == "first and only"
    assert len(openai_upstream.requests) == 1


def test_key_reuse_with_another_body_is_refused_and_keys_are_per_tenant(server, openai_upstream):
    headers = {"Idempotency-Key": "k-1"}
    _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _client(server).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "something else"}],
            extra_headers=headers,
        )
    assert info.value.body["code"] == "idempotency_key_reused"
    # The same key from another tenant is another request.
    _client(server, "globex").chat.completions.create(
        model="gpt-4o-mini", messages=MSG, extra_headers=headers
    )
    assert len(openai_upstream.requests) == 2


def test_a_failed_first_attempt_is_not_stored(server, openai_upstream):
    openai_upstream.queue(Reply(status=503, error_message="overloaded"), Reply(text="worked"))
    headers = {"Idempotency-Key": "retry-me"}
    with pytest.raises(openai.InternalServerError):
        _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
    ok = _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
    assert ok.choices[0].message.content == "worked" and len(openai_upstream.requests) == 2


def test_single_flight_coalesces_identical_in_flight_requests_on_a_coalescing_route(server, openai_upstream):
    openai_upstream.default = Reply(
        text="shared", delay_s=1.0
    )  # long enough for 10 threads to arrive on a loaded machine
    body = {"model": "route:faq", "messages": MSG, "temperature": 0}

    def call(_: int) -> str:
        resp = httpx.post(
            server.base_url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEYS['acme']}"},
            timeout=10,
        )
        return resp.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(call, range(10))) == ["shared"] * 10
    assert len(openai_upstream.requests) == 1
    # Once finished, the flight is over: the next identical request is a new call (no caching here).
    call(0)
    assert len(openai_upstream.requests) == 2
    # Routes without coalesce do not merge.
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda _: _client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG), range(4)
            )
        )
    assert len(openai_upstream.requests) == 6
