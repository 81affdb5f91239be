"""Session 8 attacks on the newest spend and no-duplicate guarantees, through the real gateway.

Each test is one way a client could try to get past what README "Spend limits" and "Many
replicas" promise: fields of the wrong type or out of range, values past every ceiling, streams
cut by the client under concurrency, a key reused after a restart with an `n` or
`max_completion_tokens` variant or by another tenant, an empty or non-ASCII key, a coalesced
request whose task pins it elsewhere, a process sharing the SQLite file while a call outlives
several short leases, prompt parts the gateway cannot count. The official openai SDK (or httpx for
what the SDK will not send) against a real loopback server; fake providers at the wire only.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key

MSG = [{"role": "user", "content": "Summarise our refund policy."}]
MINI_IN, MINI_OUT = Decimal("0.15"), Decimal("0.6")  # gpt-4o-mini, USD per 1M tokens (genai-prices)


def _tenants(**acme: Any) -> dict[str, Any]:
    return {
        "acme": {"key_hashes": [hash_key(KEYS["acme"])], **acme},
        "globex": {"key_hashes": [hash_key(KEYS["globex"])]},
    }


def _server(tmp_path: Path, upstream: OpenAIWireServer, **extra: Any) -> BackgroundServer:
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        resilience={"max_retries": 0},
        **extra,
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _client(server: BackgroundServer, tenant: str = "acme", timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0, timeout=timeout)


def _post(server: BackgroundServer, body: Any, tenant: str = "acme", **headers: str) -> httpx.Response:
    return httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS[tenant]}", **headers},
        timeout=30,
    )


def _wait_rows(db: Path, count: int, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger_rows(db)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# -- wrong types, missing fields, huge values ---------------------------------------------------

# Each would let a provider that reads leniently (pydantic's lax ints: "8", 8.0, true) generate
# more than the guards assumed, if the gateway let it through unread.
BAD_FIELDS = [
    {"n": "8"},
    {"n": 8.0},
    {"n": True},
    {"n": 0},
    {"n": -3},
    {"n": [8]},
    {"max_tokens": "100000"},
    {"max_tokens": 1e5},
    {"max_tokens": True},
    {"max_tokens": 0},
    {"max_completion_tokens": 100000.5},
    {"max_completion_tokens": "100000"},
    {"max_completion_tokens": -1},
    {"max_completion_tokens": {"value": 100000}},
    {"max_tokens": 50, "max_completion_tokens": "100000"},
]


def test_output_caps_and_n_of_the_wrong_type_are_refused_before_any_call(tmp_path, openai_upstream):
    budget = {"budget": {"usd_per_day": "1"}}
    with _server(tmp_path, openai_upstream, tenants=_tenants(**budget)) as server:
        for extra in BAD_FIELDS:
            resp = _post(server, {"model": "gpt-4o-mini", "messages": MSG, **extra})
            assert resp.status_code == 400, (extra, resp.status_code, resp.text)
            assert resp.json()["error"]["param"] == next(iter(extra.keys() - {"max_tokens"}), "max_tokens")
        # Integers past 64 bits are not JSON the gateway reads: refused, not a 500.
        raw = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %d}'
        for value in (2**64, 10**30):
            resp = httpx.post(
                server.base_url + "/chat/completions",
                content=raw % value,
                headers={"authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"},
                timeout=30,
            )
            assert resp.status_code == 400, resp.text
    assert openai_upstream.requests == []
    rows = ledger_rows(tmp_path / "ledger.db")
    assert len(rows) == len(BAD_FIELDS) + 2 and {r["http_status"] for r in rows} == {400}


def test_huge_output_caps_and_n_are_refused_by_the_budget_and_the_cost_cap(tmp_path, openai_upstream):
    # `selfhosted` has no context window to refuse these first ($0.02 per million tokens).
    routes = {"capped": {"model": "selfhosted", "max_cost_per_request_usd": "1000"}}
    with _server(
        tmp_path, openai_upstream, routes=routes, tenants=_tenants(budget={"usd_per_day": "5"})
    ) as server:
        client = _client(server)
        for extra in (
            {"max_tokens": 2**62},
            {"max_completion_tokens": 2**63 - 1},
            {"max_tokens": 100, "n": 2**40},
            {"max_tokens": 2**40, "n": 2**40},
        ):
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="selfhosted", messages=MSG, **extra)
            assert info.value.body["code"] == "budget_exceeded", extra
            with pytest.raises(openai.BadRequestError) as capped:
                client.chat.completions.create(model="route:capped", messages=MSG, **extra)
            assert capped.value.body["code"] == "request_cost_cap_exceeded", extra
        # Nothing was reserved by the refusals: the whole budget is still there.
        ok = client.chat.completions.with_raw_response.create(model="selfhosted", messages=MSG, max_tokens=10)
    assert ok.headers["x-thrifty-budget-remaining"].startswith("4.99")
    assert len(openai_upstream.requests) == 1


# -- streams cut by their clients, many at once -------------------------------------------------


def test_streams_cut_by_their_clients_settle_the_budget_to_what_the_ledger_says(tmp_path, openai_upstream):
    """16 streams at once, each closed by its client after two pieces: every reservation is settled
    to its ledger cost (none leaks, none is released as if nothing was generated)."""
    limit = Decimal("1")
    text = "".join(f"w{i} " for i in range(300))
    openai_upstream.default = Reply(text=text, chunk_chars=6, chunk_delay_s=0.02, completion_tokens=600)
    routes = {"short": {"model": "gpt-4o-mini", "max_input_tokens": 5}}
    with _server(
        tmp_path, openai_upstream, routes=routes, tenants=_tenants(budget={"usd_per_day": str(limit)})
    ) as server:
        client = _client(server)

        def cut(i: int) -> int:
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"Count to a thousand, run {i}."}],
                stream=True,
                max_tokens=2000,
            )
            seen = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    seen += 1
                if seen == 2:
                    break
            stream.close()
            return seen

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(cut, range(16))) == [2] * 16
        rows = _wait_rows(tmp_path / "ledger.db", 16)
        time.sleep(0.3)  # a settle, were one late, would land now
        # A request refused before the spend guard (prompt over the route's 5 tokens) says what is
        # left, reserved nothing and spent nothing.
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="route:short", messages=MSG)
    left = info.value.response.headers["x-thrifty-budget-remaining"].split(";")[0]
    assert len(rows) == 16 and {r["status"] for r in rows} == {"client_disconnected"}
    costs = [Decimal(r["cost_usd"]) for r in rows]
    assert all(c > 0 for c in costs)
    assert all(0 < r["output_tokens"] < 600 for r in rows)
    assert Decimal(left) == limit - sum(costs, Decimal(0))


# -- prompt parts the gateway cannot count --------------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/receipt.png", "detail": "high"}}
# What gpt-4o-mini bills for one 1024x1024 high-detail image: 2,833 base + 4 tiles x 5,667 tokens
# (OpenAI's vision pricing). The token count takes any image as 85 tokens (a low-detail gpt-4o one).
IMAGE_TOKENS = 2833 + 4 * 5667


def test_image_heavy_requests_cannot_overrun_the_budget(tmp_path, openai_upstream):
    images = 4
    billed = images * IMAGE_TOKENS + 20
    openai_upstream.default = Reply(prompt_tokens=billed, completion_tokens=50, delay_s=0.2)
    per_request = (billed * MINI_IN + 50 * MINI_OUT) / 10**6  # ~$0.0153
    budget = Decimal("0.05")  # three such requests fit, not four
    body = [
        {"role": "user", "content": [{"type": "text", "text": "What is on these receipts?"}] + [IMAGE] * 4}
    ]
    with _server(tmp_path, openai_upstream, tenants=_tenants(budget={"usd_per_day": str(budget)})) as server:
        client = _client(server)

        def call(_: int) -> bool:
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=body, max_tokens=50)
                return True
            except openai.RateLimitError:
                return False

        with ThreadPoolExecutor(12) as pool:
            admitted = sum(pool.map(call, range(12)))
    spent = sum((Decimal(r["cost_usd"]) for r in ledger_rows(tmp_path / "ledger.db")), Decimal(0))
    # Each is reserved at its images' largest (guard/media.py), so no more are admitted than fit.
    assert 1 <= admitted <= budget // per_request
    assert spent <= budget


# -- Idempotency-Key: restarts, variants, other tenants, odd keys -----------------------------------


def test_a_finished_key_after_a_restart_refuses_n_and_cap_variants_and_is_not_another_tenants(
    tmp_path, openai_upstream
):
    openai_upstream.queue(Reply(text="acme's refund answer"), Reply(text="globex's own answer"))
    key = {"Idempotency-Key": "refund-42"}
    with _server(tmp_path, openai_upstream) as server:
        first = _client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=100, extra_headers=key
        )
    assert first.choices[0].message.content == "acme's refund answer"
    with _server(tmp_path, openai_upstream) as server:
        client = _client(server)
        for variant in (
            {"max_tokens": 100, "n": 2},
            {"max_tokens": 100, "n": 1},  # the default spelled out is another body too
            {"max_tokens": 100, "max_completion_tokens": 4000},
            {"max_completion_tokens": 100},
            {},
        ):
            with pytest.raises(openai.UnprocessableEntityError) as info:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=MSG, extra_headers=key, **variant
                )
            assert info.value.body["code"] == "idempotency_key_reused", variant
        # Another tenant with the same key and body is another request: its own generation.
        theirs = _client(server, "globex").chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=100, extra_headers=key
        )
        assert theirs.choices[0].message.content == "globex's own answer"
        # The body's key order and the delivery (a stream) do not make it another request.
        shuffled = _post(server, {"max_tokens": 100, "messages": MSG, "model": "gpt-4o-mini"}, **key)
        assert shuffled.status_code == 200 and shuffled.headers["x-thrifty-cache"] == "dedup"
        assert shuffled.json()["choices"][0]["message"]["content"] == "acme's refund answer"
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="gpt-4o-mini", messages=MSG, max_tokens=100, stream=True, extra_headers=key
            )
            if c.choices
        )
        assert streamed == "acme's refund answer"
    assert len(openai_upstream.requests) == 2
    rows = ledger_rows(tmp_path / "ledger.db")
    charged = [r for r in rows if r["cost_usd"] and Decimal(r["cost_usd"]) > 0]
    assert sorted(r["tenant_id"] for r in charged) == ["acme", "globex"]


def test_an_empty_idempotency_key_is_no_key(tmp_path, openai_upstream):
    """An unset template variable sends `Idempotency-Key:` with nothing in it. Taken as a key, every
    such request of the tenant would share it: the second question refused (422), a repeated one
    answered for a day from the first generation."""
    openai_upstream.queue(Reply(text="one"), Reply(text="two"), Reply(text="three"))
    with _server(tmp_path, openai_upstream) as server:
        a = _post(server, {"model": "gpt-4o-mini", "messages": MSG}, **{"Idempotency-Key": ""})
        b = _post(
            server,
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Another question."}]},
            **{"Idempotency-Key": ""},
        )
        c = _post(server, {"model": "gpt-4o-mini", "messages": MSG}, **{"Idempotency-Key": ""})
    assert [r.status_code for r in (a, b, c)] == [200, 200, 200], [r.text for r in (a, b, c)]
    assert [r.json()["choices"][0]["message"]["content"] for r in (a, b, c)] == ["one", "two", "three"]
    assert {r["idempotency_key"] for r in ledger_rows(tmp_path / "ledger.db")} == {None}


def test_non_ascii_long_and_case_variant_keys_are_distinct_keys(tmp_path, openai_upstream):
    keys = ["ключ-💳".encode(), "ключ-💴".encode(), b"Order-1", b"order-1", b"k" * 4000]
    openai_upstream.queue(*(Reply(text=f"answer {i}") for i in range(len(keys))))
    with _server(tmp_path, openai_upstream) as server:

        def ask(key: bytes) -> httpx.Response:
            return httpx.post(
                server.base_url + "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MSG},
                headers=[(b"authorization", f"Bearer {KEYS['acme']}".encode()), (b"idempotency-key", key)],
                timeout=30,
            )

        first = [ask(k) for k in keys]
        again = [ask(k) for k in keys]
    assert [r.status_code for r in first + again] == [200] * (2 * len(keys))
    texts = [r.json()["choices"][0]["message"]["content"] for r in first]
    assert texts == [f"answer {i}" for i in range(len(keys))]
    assert [r.json()["choices"][0]["message"]["content"] for r in again] == texts
    assert [r.headers["x-thrifty-cache"] for r in again] == ["dedup"] * len(keys)
    assert len(openai_upstream.requests) == len(keys)


@pytest.mark.xfail(
    strict=True,
    reason="a repeat waiting on a keyed stream whose own client disconnects gets 409 "
    "idempotent_request_unfinished, not the response: the leader's upstream stream is closed with "
    "its client, and a retry generates (and bills) anew (dedup/stage.py _relay, server/app.py _stream)",
)
def test_a_repeat_waiting_on_a_keyed_stream_gets_its_answer_when_the_first_client_leaves(
    tmp_path, openai_upstream
):
    text = "".join(f"part{i} " for i in range(60))
    openai_upstream.queue(
        Reply(text=text, chunk_chars=7, chunk_delay_s=0.02), Reply(text="a second generation")
    )
    key = {"Idempotency-Key": "stream-cut-1"}
    with _server(tmp_path, openai_upstream) as server:
        client = _client(server)
        started = threading.Event()
        waiter: dict[str, Any] = {}

        def repeat() -> None:
            started.wait(10)
            try:
                waiter["text"] = (
                    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=key)
                    .choices[0]
                    .message.content
                )
            except openai.APIStatusError as err:
                waiter["error"] = err.status_code

        thread = threading.Thread(target=repeat)
        thread.start()
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, stream=True, extra_headers=key
        )
        pieces = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                if pieces == 2:
                    started.set()
                    time.sleep(0.3)  # the repeat joins the running key
                if pieces == 4:
                    break
        stream.close()
        thread.join(20)
    assert waiter.get("text") == text, waiter
    assert len(openai_upstream.requests) == 1


# -- flight leases -------------------------------------------------------------------------------


def test_a_keyed_call_outliving_several_short_leases_is_not_generated_again_by_a_process_sharing_the_file(
    tmp_path, openai_upstream
):
    """Two gateways on one SQLite file (two processes' worth: separate event loops, owners and
    in-process flights). A's call lasts six short leases; its renewals keep B from generating."""
    openai_upstream.queue(Reply(text="made once", delay_s=2.0), Reply(text="made twice"))
    idem = {"idempotency": {"flight_lease_s": 0.3, "lease_s": 60}}
    key = {"Idempotency-Key": "long-call"}
    with _server(tmp_path, openai_upstream, **idem) as a, _server(tmp_path, openai_upstream, **idem) as b:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                lambda: _client(a).chat.completions.create(
                    model="gpt-4o-mini", messages=MSG, extra_headers=key
                )
            )
            time.sleep(1.0)  # over three short leases into A's call
            with pytest.raises(openai.ConflictError) as info:
                _client(b).chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=key)
            assert info.value.body["code"] == "idempotent_request_in_progress"
            assert first.result(10).choices[0].message.content == "made once"
        later = _client(b).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, extra_headers=key
        )
    assert later.headers["x-thrifty-cache"] == "dedup"
    assert later.parse().choices[0].message.content == "made once"
    assert len(openai_upstream.requests) == 1


def test_a_coalesced_request_is_never_answered_by_a_model_its_task_does_not_pin(tmp_path, openai_upstream):
    """`pin: {legal: gpt-4o}` promises a high-stakes task always on the top tier. On a coalescing
    route an identical body without the task, in flight on gpt-4o-mini, must not answer it."""
    openai_upstream.by_model["gpt-4o-mini"] = [Reply(text="mini's answer", delay_s=0.8)]
    openai_upstream.by_model["gpt-4o-2024-08-06"] = [Reply(text="4o's answer", delay_s=0.1)]
    routes = {"faq": {"model": "gpt-4o-mini", "coalesce": True, "pin": {"legal": "gpt-4o"}}}
    body = {"model": "route:faq", "messages": MSG, "temperature": 0}
    with _server(tmp_path, openai_upstream, routes=routes) as server, ThreadPoolExecutor(2) as pool:
        plain = pool.submit(_post, server, body)
        time.sleep(0.3)
        legal = pool.submit(_post, server, body, **{"x-thrifty-task": "legal"})
        plain_resp, legal_resp = plain.result(10), legal.result(10)
    assert plain_resp.json()["choices"][0]["message"]["content"] == "mini's answer"
    assert legal_resp.headers["x-thrifty-model"] == "gpt-4o"
    assert legal_resp.json()["choices"][0]["message"]["content"] == "4o's answer"
    assert sorted(r["model"] for r in openai_upstream.requests) == ["gpt-4o-2024-08-06", "gpt-4o-mini"]


def test_a_coalesced_request_whose_leader_s_client_left_is_answered_on_its_own(tmp_path, openai_upstream):
    """A request without a key that joined a coalesced stream has nothing to retry with a key: when
    the leader's client disconnects, it is answered by a generation of its own, not a 409."""
    text = "".join(f"part{i} " for i in range(60))
    openai_upstream.queue(Reply(text=text, chunk_chars=7, chunk_delay_s=0.02), Reply(text="its own answer"))
    routes = {"faq": {"model": "gpt-4o-mini", "coalesce": True}}
    body = {"model": "route:faq", "messages": MSG, "temperature": 0}
    with _server(tmp_path, openai_upstream, routes=routes) as server:
        client = _client(server)
        joined = threading.Event()
        waiter: dict[str, Any] = {}

        def repeat() -> None:
            joined.wait(10)
            resp = _post(server, body)
            waiter["status"], waiter["json"] = resp.status_code, resp.json()

        thread = threading.Thread(target=repeat)
        thread.start()
        stream = client.chat.completions.create(**body, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                joined.set()
                time.sleep(0.3)  # the identical request joins the flight
            if i == 4:
                break
        stream.close()
        thread.join(20)
    assert waiter["status"] == 200, waiter
    assert waiter["json"]["choices"][0]["message"]["content"] == "its own answer"
    assert len(openai_upstream.requests) == 2
    rows = _wait_rows(tmp_path / "ledger.db", 2)
    assert sorted(r["status"] for r in rows) == ["client_disconnected", "ok"]
    assert all(r["cost_usd"] and Decimal(r["cost_usd"]) > 0 for r in rows)


def test_a_key_refused_by_the_budget_or_the_cost_cap_is_not_burnt(tmp_path, openai_upstream):
    """A refusal before any spend stores nothing under the key: the client may lower its cap and
    retry with the same key (a new body, but nothing was generated for the old one)."""
    openai_upstream.queue(Reply(text="fits now"))
    routes = {"capped": {"model": "gpt-4o-mini", "max_cost_per_request_usd": "0.001"}}
    key = {"Idempotency-Key": "lower-and-retry"}
    capped_key = {"Idempotency-Key": "capped-and-retry"}
    with _server(
        tmp_path, openai_upstream, routes=routes, tenants=_tenants(budget={"usd_per_day": "0.002"})
    ) as server:
        client = _client(server)
        with pytest.raises(openai.RateLimitError):  # 4,000 tokens on gpt-4o-mini: up to $0.0024
            client.chat.completions.create(
                model="gpt-4o-mini", messages=MSG, max_tokens=4000, extra_headers=key
            )
        ok = client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=100, extra_headers=key
        )
        assert ok.choices[0].message.content == "fits now"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="route:capped", messages=MSG, max_tokens=3000, extra_headers=capped_key
            )
        again = client.chat.completions.with_raw_response.create(
            model="route:capped", messages=MSG, max_tokens=100, extra_headers=capped_key
        )
        assert again.headers["x-thrifty-cache"] == "miss"
    assert len(openai_upstream.requests) == 2
