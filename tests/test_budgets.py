"""Budgets and per-route spend limits, attacked through the real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.server.run import BackgroundServer

# "word " * 999 is 1000 o200k tokens; with OpenAI's chat framing (3 + 1 role + 3 priming) 1007.
PROMPT = [{"role": "user", "content": "word " * 999}]
PROMPT_TOKENS = 1007
# gpt-4o-mini: $0.15 input, $0.60 output per 1M tokens.
COST = (PROMPT_TOKENS * Decimal("0.15") + 500 * Decimal("0.6")) / 10**6  # 0.00045105 at max_tokens=500


def _gateway(tmp_path: Path, upstream: OpenAIWireServer, **extra: Any) -> BackgroundServer:
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        **extra,
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _client(server: BackgroundServer, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0, timeout=30)


@pytest.fixture
def honest_upstream(openai_upstream: OpenAIWireServer) -> Iterator[OpenAIWireServer]:
    # Usage as a real provider would report it for PROMPT at max_tokens=500, slow enough to overlap.
    openai_upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=0.05)
    yield openai_upstream


def test_64_concurrent_requests_never_overspend_a_tenant_budget(tmp_path: Path, honest_upstream):
    budget = Decimal("0.01")  # room for exactly 22 requests at their worst case (22 x 0.00045105)
    tenants = {"acme": {"key_hashes": [], "budget": {"usd_per_day": str(budget)}}, "globex": {}}
    from thrifty.stores.keys import hash_key

    tenants["acme"]["key_hashes"] = [hash_key(KEYS["acme"])]
    tenants["globex"] = {"key_hashes": [hash_key(KEYS["globex"])]}
    with _gateway(tmp_path, honest_upstream, tenants=tenants) as server:
        client = _client(server)

        def call(_: int) -> str:
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=500)
                return "ok"
            except openai.RateLimitError as err:
                return err.message

        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(call, range(64)))
        # Another tenant is not affected by acme's budget.
        assert _client(server, "globex").chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500
        )
    ok = [o for o in outcomes if o == "ok"]
    rejected = [o for o in outcomes if o != "ok"]
    assert len(ok) == 22 and len(rejected) == 42
    assert all("tenant 'acme' daily usd budget is exhausted" in m and "limit $0.01" in m for m in rejected)
    assert all("resets at" in m and "T00:00:00Z" in m for m in rejected)
    spent = sum(
        Decimal(r["cost_usd"]) for r in ledger_rows(tmp_path / "ledger.db") if r["tenant_id"] == "acme"
    )
    assert spent == 22 * COST and spent <= budget
    assert len(honest_upstream.requests) == 23  # 22 for acme + 1 for globex: rejected calls never went out


def test_budget_survives_a_restart_and_reports_what_is_left(tmp_path: Path, honest_upstream):
    from thrifty.stores.keys import hash_key

    tenants = {"acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_month": "0.001"}}}
    with _gateway(tmp_path, honest_upstream, tenants=tenants) as server:
        raw = _client(server).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500
        )
        # Remaining after reserving this request's worst case (= its actual cost here).
        assert raw.headers["x-thrifty-budget-remaining"].startswith(
            f"{Decimal('0.001') - COST}; scope=tenant:acme"
        )
    with _gateway(tmp_path, honest_upstream, tenants=tenants) as server:
        client = _client(server)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500
        )  # 2 x 0.000451 fits
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=500)
    assert "monthly usd budget" in info.value.message and info.value.body["code"] == "budget_exceeded"


def test_feature_and_token_budgets_and_an_unpriced_model(tmp_path: Path, honest_upstream):
    from thrifty.stores.keys import hash_key

    tenants = {
        "acme": {
            "key_hashes": [hash_key(KEYS["acme"])],
            "features": {"chat": {"budget": {"usd_per_day": "0.0005", "tokens_per_day": 100000}}},
        }
    }
    with _gateway(tmp_path, honest_upstream, tenants=tenants) as server:
        client = _client(server)
        chat = {"x-thrifty-feature": "chat"}
        client.chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500, extra_headers=chat
        )
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=PROMPT, max_tokens=500, extra_headers=chat
            )
        assert "feature 'acme/chat' daily usd budget" in info.value.message
        # Other features of the tenant are not limited by chat's budget.
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=500)
        # A model without a price is not blocked by a dollar budget it cannot be measured against...
        client.chat.completions.create(model="mystery", messages=PROMPT, max_tokens=500, extra_headers=chat)
        # ...but token budgets still hold for it: 100000 tokens is room for 66 requests of 1507.
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="mystery", messages=PROMPT, max_tokens=100000, extra_headers=chat
            )
        assert "daily tokens budget" in info.value.message


def test_route_clamps_max_tokens_and_caps_cost_per_request(tmp_path: Path, honest_upstream):
    routes = {
        "cheap": {"model": "gpt-4o-mini", "max_output_tokens": 50, "max_cost_per_request_usd": "0.0002"}
    }
    with _gateway(tmp_path, honest_upstream, routes=routes) as server:
        client = _client(server)
        short = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="route:cheap", messages=short, max_tokens=4000)
        assert honest_upstream.requests[-1]["max_tokens"] == 50  # the client's 4000 was not trusted
        client.chat.completions.create(model="route:cheap", messages=short)
        assert honest_upstream.requests[-1]["max_tokens"] == 50  # and a missing one is set
        client.chat.completions.create(model="route:cheap", messages=short, max_completion_tokens=20)
        assert honest_upstream.requests[-1]["max_completion_tokens"] == 20  # a lower one is kept
        calls = len(honest_upstream.requests)
        with pytest.raises(openai.BadRequestError) as info:
            # 1007 x 0.15 + 50 x 0.6 per 1M = $0.00018105 < cap; 2000 words more is over it.
            client.chat.completions.create(
                model="route:cheap", messages=[{"role": "user", "content": "word " * 2000}]
            )
        assert (
            info.value.body["code"] == "request_cost_cap_exceeded"
            and "$0.0002 per request" in info.value.message
        )
        assert len(honest_upstream.requests) == calls  # rejected before any spend


def test_budget_remaining_header_on_every_response_and_fallbacks_are_reserved(
    tmp_path: Path, honest_upstream
):
    from thrifty.stores.keys import hash_key

    tenants = {
        "acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": "0.006"}},
        "globex": {"key_hashes": [hash_key(KEYS["globex"])]},
    }
    routes = {"safe": {"model": "gpt-4o-mini", "fallbacks": ["gpt-4o"]}}
    with _gateway(tmp_path, honest_upstream, tenants=tenants, routes=routes) as server:
        free = _client(server, "globex").chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500
        )
        assert free.headers["x-thrifty-budget-remaining"] == "unlimited"
        # On gpt-4o the worst case is (1007 x 2.5 + 500 x 10) / 1e6 = $0.0075175 > $0.006: the route
        # may fall back to gpt-4o, so its worst case is what is reserved, and the request is refused
        # although gpt-4o-mini alone would fit.
        with pytest.raises(openai.RateLimitError) as info:
            _client(server).chat.completions.create(model="route:safe", messages=PROMPT, max_tokens=500)
        assert "may cost up to $0.0075175" in info.value.message
        assert info.value.response.headers["x-thrifty-budget-remaining"].startswith(
            "0.006; scope=tenant:acme"
        )
        ok = _client(server).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=500
        )
        assert ok.headers["x-thrifty-budget-remaining"].startswith(
            f"{Decimal('0.006') - COST}; scope=tenant:acme"
        )
