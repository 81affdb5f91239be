"""The spend-control holes of issue 11, attacked through the real gateway with the openai SDK.

Upstreams are wire fakes that bill honestly (`honest=True`): the prompt tokens they received, and
per choice as many output tokens as the cap they were sent allows (all of them without a cap).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.anthropic_wire import AnthropicWireServer
from tests.fakes.anthropic_wire import Reply as AnthropicReply
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.report import build_report
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key
from thrifty.tokens import TokenCounter

SHORT = [{"role": "user", "content": "Write as much as you can about the sea."}]
MINI_IN, MINI_OUT = Decimal("0.15"), Decimal("0.6")  # gpt-4o-mini, USD per 1M tokens
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def _mini_cost(prompt: int, output: int) -> Decimal:
    return (prompt * MINI_IN + output * MINI_OUT) / 10**6


def _tenants(**acme: Any) -> dict[str, Any]:
    return {
        "acme": {"key_hashes": [hash_key(KEYS["acme"])], **acme},
        "globex": {"key_hashes": [hash_key(KEYS["globex"])]},
    }


def _server(tmp_path: Path, upstream: OpenAIWireServer, **extra: Any) -> BackgroundServer:
    providers = {"up": {"kind": "openai", "base_url": upstream.base_url}}
    providers.update(extra.pop("providers", {}))
    models = openai_models()
    models.update(extra.pop("models", {}))
    settings = base_settings(
        tmp_path, providers=providers, models=models, resilience={"max_retries": 0}, **extra
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY, "claude": "sk-ant-test"})


def _client(server: BackgroundServer, tenant: str = "acme", **options: Any) -> openai.OpenAI:
    options.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], timeout=30, **options)


def _acme_spend(tmp_path: Path) -> tuple[list[dict[str, Any]], Decimal]:
    rows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["tenant_id"] == "acme"]
    return rows, sum((Decimal(r["cost_usd"]) for r in rows if r["cost_usd"]), Decimal(0))


# -- 1. n choices ------------------------------------------------------------------------------


def test_64_concurrent_requests_with_n_8_never_overspend_the_budget(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000, delay_s=0.05)
    budget = Decimal("0.02")  # one request's worst case is $0.0019-0.0039: room for a handful
    with _server(tmp_path, openai_upstream, tenants=_tenants(budget={"usd_per_day": str(budget)})) as server:
        client = _client(server)

        def call(i: int) -> str:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=SHORT, n=8, max_tokens=400 + (i * 37) % 401
                )
                return "ok"
            except openai.RateLimitError as err:
                return err.message

        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(call, range(64)))
    rows, spent = _acme_spend(tmp_path)
    ok = [r for r in rows if r["status"] == "ok"]
    assert 0 < len(ok) == outcomes.count("ok") < 64
    assert spent <= budget
    # Every choice was billed and priced: 8 x the cap each request sent, to the exact Decimal.
    assert len(openai_upstream.requests) == len(ok)
    sent = sorted(8 * r["max_tokens"] for r in openai_upstream.requests)
    assert sorted(r["output_tokens"] for r in ok) == sent
    for row in ok:
        assert Decimal(row["cost_usd"]) == _mini_cost(row["input_tokens"], row["output_tokens"])
    refused = [o for o in outcomes if o != "ok"]
    assert all("daily usd budget is exhausted" in m for m in refused)


def test_the_cost_cap_and_the_token_rate_limit_count_every_choice(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    routes = {"capped": {"model": "gpt-4o-mini", "max_cost_per_request_usd": "0.0005"}}
    tenants = _tenants()
    tenants["globex"]["rate_limit"] = {"tokens_per_minute": 3000}
    with _server(tmp_path, openai_upstream, routes=routes, tenants=tenants) as server:
        client = _client(server)
        # One choice of 500 tokens is $0.0003 at most: under the cap. Eight are $0.0024.
        client.chat.completions.create(model="route:capped", messages=SHORT, max_tokens=500)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="route:capped", messages=SHORT, max_tokens=500, n=8)
        assert info.value.body["code"] == "request_cost_cap_exceeded"
        assert "8 choices x 500" in info.value.message and "or n" in info.value.message
        # 8 x 300 + the prompt fits 3000 tokens a minute once, not twice.
        limited = _client(server, "globex")
        limited.chat.completions.create(model="gpt-4o-mini", messages=SHORT, max_tokens=300, n=8)
        with pytest.raises(openai.RateLimitError) as rate:
            limited.chat.completions.create(model="gpt-4o-mini", messages=SHORT, max_tokens=300, n=8)
        assert "tokens per minute" in rate.value.message
    assert len(openai_upstream.requests) == 2


def test_n_above_1_is_refused_before_any_call_when_an_anthropic_model_may_answer(
    tmp_path, openai_upstream, loop_thread
):
    anthropic = AnthropicWireServer(api_key="sk-ant-test")
    loop_thread.run(anthropic.start())
    try:
        models = {"claude": {"provider": "claude", "upstream": "claude-3-5-haiku-20241022"}}
        routes = {"tiered": {"model": "claude", "strategy": "cascade", "tiers": ["gpt-4o-mini", "claude"]}}
        with _server(
            tmp_path,
            openai_upstream,
            providers={"claude": {"kind": "anthropic", "base_url": anthropic.base_url}},
            models=models,
            routes=routes,
        ) as server:
            client = _client(server)
            for model in ("route:tiered", "claude"):
                with pytest.raises(openai.BadRequestError) as info:
                    client.chat.completions.create(model=model, messages=SHORT, n=3)
                # Not even the cascade's first (OpenAI) tier was called and paid for.
                assert openai_upstream.requests == [] and anthropic.requests == []
                assert info.value.body["param"] == "n" and "n=3 is not supported" in info.value.message
                assert "'claude'" in info.value.message
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="gpt-4o-mini", messages=SHORT, n=0)
            assert "'n' must be a positive integer" in bad.value.message
        # Not even the cascade's first (OpenAI) tier was called and paid for.
        assert openai_upstream.requests == [] and anthropic.requests == []
    finally:
        loop_thread.run(anthropic.stop())


# -- 2. no max_tokens --------------------------------------------------------------------------


def test_a_request_without_max_tokens_is_sent_the_ceiling_it_was_reserved_for(
    tmp_path, openai_upstream, loop_thread
):
    # Without a cap the upstream writes 12,000 tokens: $0.0072, over the whole budget.
    openai_upstream.default = Reply(honest=True, completion_tokens=12_000)
    anthropic = AnthropicWireServer(api_key="sk-ant-test")
    anthropic.default_reply = AnthropicReply(honest=True, output_tokens=12_000)
    loop_thread.run(anthropic.start())
    budget = Decimal("0.004")
    try:
        models = {
            "gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini", "max_output_tokens": 1000},
            "claude": {
                "provider": "claude",
                "upstream": "claude-3-5-haiku-20241022",
                "max_output_tokens": 300,
            },
        }
        with _server(
            tmp_path,
            openai_upstream,
            providers={"claude": {"kind": "anthropic", "base_url": anthropic.base_url}},
            models=models,
            tenants=_tenants(budget={"usd_per_day": str(budget)}),
        ) as server:
            client = _client(server)
            client.chat.completions.create(model="gpt-4o-mini", messages=SHORT)
            assert openai_upstream.requests[-1]["max_tokens"] == 1000
            # Streaming, without include_usage: the gateway still asks for usage and prices it.
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model="gpt-4o-mini", messages=SHORT, stream=True)
                if c.choices
            )
            assert len(text.split()) == 1000 and openai_upstream.requests[-1]["max_tokens"] == 1000
            client.chat.completions.create(model="claude", messages=SHORT)
            assert anthropic.last.body["max_tokens"] == 300  # the model's ceiling, not 4096
    finally:
        loop_thread.run(anthropic.stop())
    rows, spent = _acme_spend(tmp_path)
    assert [r["output_tokens"] for r in rows] == [1000, 1000, 300]
    assert all(r["usage_estimated"] == 0 for r in rows)
    assert (
        Decimal(rows[0]["cost_usd"])
        == Decimal(rows[1]["cost_usd"])
        == _mini_cost(rows[0]["input_tokens"], 1000)
    )
    assert spent <= budget


def test_a_route_may_forward_no_cap_and_reserve_the_model_maximum_instead(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=900)
    models = {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini", "max_output_tokens": 1000}}
    routes = {"uncapped": {"model": "gpt-4o-mini", "send_output_ceiling": False}}
    with _server(
        tmp_path, openai_upstream, models=models, routes=routes, tenants=_tenants(budget={"usd_per_day": "1"})
    ) as server:
        raw = _client(server).chat.completions.with_raw_response.create(
            model="route:uncapped", messages=SHORT
        )
    assert "max_tokens" not in openai_upstream.requests[-1]
    prompt = ledger_rows(tmp_path / "ledger.db")[0]["input_tokens"]
    # What was left after reserving the model's max_output_tokens (1000), not the 900 it wrote.
    assert raw.headers["x-thrifty-budget-remaining"].startswith(f"{Decimal(1) - _mini_cost(prompt, 1000)};")


def test_an_implied_ceiling_is_fitted_to_the_context_window(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    with _server(tmp_path, openai_upstream) as server:
        # "tiny" has a 40-token window; the client asked for no cap, so none is refused for it.
        _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert openai_upstream.requests[-1]["max_tokens"] == 40 - 8  # 8 prompt tokens
        # The window holds the prompt and one completion: n choices are n completions, each fits.
        client = _client(server)
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=30
        )
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=33
            )
        assert info.value.body["code"] == "context_length_exceeded"


# -- 3. both output fields ---------------------------------------------------------------------


def test_both_output_fields_reserve_and_clamp_the_larger(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    routes = {"short": {"model": "gpt-4o-mini", "max_output_tokens": 50}}
    with _server(
        tmp_path, openai_upstream, routes=routes, tenants=_tenants(budget={"usd_per_day": "0.002"})
    ) as server:
        client = _client(server)
        # A provider may honour max_tokens: 5000 tokens is $0.003, over the budget; refused.
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=SHORT, max_completion_tokens=10, max_tokens=5000
            )
        assert "may cost up to $0.0030" in info.value.message
        assert openai_upstream.requests == []
        # On a route both are clamped to its ceiling; a lower one is kept; both are forwarded.
        client.chat.completions.create(
            model="route:short", messages=SHORT, max_completion_tokens=10, max_tokens=5000
        )
        assert (
            openai_upstream.requests[-1]["max_completion_tokens"],
            openai_upstream.requests[-1]["max_tokens"],
        ) == (
            10,
            50,
        )
        client.chat.completions.create(
            model="gpt-4o-mini", messages=SHORT, max_completion_tokens=900, max_tokens=20
        )
        assert openai_upstream.requests[-1]["max_completion_tokens"] == 900
    rows, spent = _acme_spend(tmp_path)
    assert [r["output_tokens"] for r in rows if r["status"] == "ok"] == [50, 900]
    assert spent <= Decimal("0.002")


# -- 5. eviction -------------------------------------------------------------------------------


def test_running_idempotency_keys_are_never_evicted(tmp_path, openai_upstream):
    openai_upstream.default = Reply(text="slow answer", delay_s=1.0)
    with _server(tmp_path, openai_upstream, idempotency={"max_entries": 2}) as server:
        client = _client(server)

        def call(key: str) -> str:
            resp = client.chat.completions.create(
                model="gpt-4o-mini", messages=SHORT, extra_headers={"Idempotency-Key": key}
            )
            return resp.choices[0].message.content or ""

        with ThreadPoolExecutor(4) as pool:
            first = [pool.submit(call, "a"), pool.submit(call, "b")]
            deadline = time.monotonic() + 5
            while len(openai_upstream.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            # The table is full of running keys: a third key is refused, not let in to push one out.
            with pytest.raises(openai.InternalServerError) as info:
                call("c")
            assert info.value.status_code == 503 and info.value.body["code"] == "idempotency_capacity"
            assert info.value.response.headers["retry-after"] == "1"
            repeat = pool.submit(call, "a")  # waits for the running "a"
            assert [f.result() for f in first] == ["slow answer", "slow answer"]
            assert repeat.result() == "slow answer"
        assert call("c") == "slow answer"  # room again once they finished
    assert len(openai_upstream.requests) == 3  # a, b and c: the repeat of a made no call


# -- 6. Retry-After on budget 429s -------------------------------------------------------------


def test_a_budget_429_says_when_the_budget_resets_and_sdks_do_not_retry_it(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100)
    with _server(tmp_path, openai_upstream, tenants=_tenants(budget={"usd_per_day": "0.0001"})) as server:
        client = _client(server, max_retries=2)  # the SDK's default: it would retry a 429 twice
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=SHORT, max_tokens=1000)
    headers = info.value.response.headers
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(int(headers["retry-after"]) - (midnight - now).total_seconds()) <= 5
    assert headers["x-should-retry"] == "false"
    assert info.value.body["code"] == "budget_exceeded"
    assert "daily usd budget is exhausted" in info.value.message and "resets at" in info.value.message
    # One attempt only: the SDK obeyed the gateway and did not hit the budget twice more.
    assert len(ledger_rows(tmp_path / "ledger.db")) == 1


def test_the_dedup_outcome_is_in_the_header_and_the_ledger(tmp_path, openai_upstream):
    openai_upstream.default = Reply(text="shared", delay_s=0.3)
    routes = {"faq": {"model": "gpt-4o-mini", "coalesce": True}}
    with _server(tmp_path, openai_upstream, routes=routes) as server:
        chat = _client(server).chat.completions.with_raw_response
        key = {"Idempotency-Key": "order-1"}
        first = chat.create(model="gpt-4o-mini", messages=SHORT, extra_headers=key)
        again = chat.create(model="gpt-4o-mini", messages=SHORT, extra_headers=key)
        # Coalesced duplicates on a coalescing route: one call, the others say dedup too.
        with ThreadPoolExecutor(3) as pool:
            merged = list(pool.map(lambda _: chat.create(model="route:faq", messages=SHORT), range(3)))
    assert first.headers["x-thrifty-cache"] == "miss" and again.headers["x-thrifty-cache"] == "dedup"
    assert again.headers["x-thrifty-cost-usd"] == "0"
    assert again.parse().model_dump() == first.parse().model_dump()
    assert sorted(r.headers["x-thrifty-cache"] for r in merged) == ["dedup", "dedup", "miss"]
    assert len(openai_upstream.requests) == 2
    assert sorted(r["cache"] for r in ledger_rows(tmp_path / "ledger.db")) == ["dedup"] * 3 + ["miss"] * 2


# -- 4. idempotency across a restart -----------------------------------------------------------


def test_an_idempotency_key_is_answered_once_across_a_sigkill_and_restart(tmp_path, openai_upstream):
    from tests.test_durability import _free_port, _start_gateway

    openai_upstream.default = Reply(honest=True, completion_tokens=40)
    config = {
        "storage": {"url": "sqlite:///ledger.db"},
        "providers": {
            "up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}
        },
        "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
        "tenants": {"acme": {"key_hashes": [hash_key(KEYS["acme"])]}},
        # The short lease a live owner renews (default 15 s): long enough here that the restart
        # below (slow on a loaded machine) ends within it.
        "idempotency": {"flight_lease_s": 30},
    }
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)

    def post(key: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=SHORT, extra_headers={"Idempotency-Key": key}
        )

    proc = _start_gateway(path, port)
    try:
        done = post("finished-before-the-crash")
        # A second key is in flight (the upstream is slow) when the gateway is killed.
        openai_upstream.queue(Reply(honest=True, completion_tokens=40, delay_s=3))
        with ThreadPoolExecutor(1) as pool:
            cut = pool.submit(post, "running-at-the-crash")
            deadline = time.monotonic() + 10
            while len(openai_upstream.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(openai.APIConnectionError):
                cut.result()
        proc.wait()
        proc = _start_gateway(path, port)
        again = post("finished-before-the-crash")
        assert again.parse().model_dump() == done.parse().model_dump()
        assert again.headers["x-thrifty-cache"] == "dedup" and again.headers["x-thrifty-cost-usd"] == "0"
        # The key that was running may still be generating (and billing) upstream: not a second time.
        with pytest.raises(openai.ConflictError) as info:
            post("running-at-the-crash")
        assert info.value.body["code"] == "idempotent_request_in_progress"
        # Until the short lease its dead owner last renewed ends, not idempotency.lease_s (600 s).
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 30
    finally:
        proc.kill()
        proc.wait()
    assert len(openai_upstream.requests) == 2  # one generation per key, across the restart
    rows = ledger_rows(tmp_path / "ledger.db")
    repeat = next(r for r in rows if r["cache"] == "dedup")
    first = next(
        r for r in rows if r["idempotency_key"] == "finished-before-the-crash" and r["cache"] == "miss"
    )
    assert Decimal(repeat["cost_usd"]) == 0 and Decimal(repeat["saved_usd"]) == Decimal(first["cost_usd"])
    conn = sqlite3.connect(tmp_path / "ledger.db")
    (total,) = [r for r in build_report(conn, "tenant") if r.group == "acme"]
    conn.close()
    assert (total.dedup_hits, total.cache_hits) == (1, 0)


def test_a_cascade_reserves_n_choices_on_every_call_and_the_draft_it_sends_back(tmp_path, openai_upstream):
    routes = {
        "math": {
            "model": "gpt-4o-mini",
            "strategy": "cascade",
            "tiers": ["gpt-4o-mini", "gpt-4o"],
            "gates": [{"kind": "agreement", "field": "answer", "voters": ["selfhosted"]}],
            "include_rejected_draft": True,
        }
    }
    with (
        _server(
            tmp_path, openai_upstream, routes=routes, tenants=_tenants(budget={"usd_per_day": "0.001"})
        ) as server,
        pytest.raises(openai.RateLimitError) as info,
    ):
        _client(server).chat.completions.create(model="route:math", messages=SHORT, n=4, max_tokens=100)
    assert openai_upstream.requests == []
    prompt = TokenCounter().count_messages(SHORT, "gpt-4o-mini").tokens
    grown = prompt + 100 + 256  # later calls carry the rejected draft and the reason back
    worst = (
        _mini_cost(prompt, 4 * 100)  # the draft tier: 4 choices of 100 tokens
        + (grown * Decimal("2.5") + 4 * 100 * Decimal("10")) / 10**6  # gpt-4o, escalated
        + (grown + 4 * 100) * Decimal("0.02") / 10**6  # the voter (selfhosted, flat price)
    )
    assert f"may cost up to ${worst}" in info.value.message


def test_an_anthropic_request_reserves_for_writing_its_whole_prompt_to_the_cache(tmp_path, openai_upstream):
    models = {"claude": {"provider": "claude", "upstream": "claude-3-5-haiku-20241022"}}
    with _server(
        tmp_path,
        openai_upstream,
        providers={"claude": {"kind": "anthropic", "base_url": "http://127.0.0.1:9"}},
        models=models,
        routes={"cached": {"model": "claude", "prompt_cache": True}},
        tenants=_tenants(budget={"usd_per_day": "0.0001"}),
    ) as server:
        client = _client(server)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="route:cached", messages=SHORT, max_tokens=100)
        with pytest.raises(openai.RateLimitError) as tooled:
            client.chat.completions.create(model="route:cached", messages=SHORT, max_tokens=100, tools=[TOOL])
    counter = TokenCounter()
    prompt = counter.count_messages(SHORT, "claude-3-5-haiku-20241022").tokens
    # claude-3-5-haiku: $0.80 input, $1.00 to write the cache, $4.00 output per 1M tokens.
    assert f"may cost up to ${(prompt * Decimal('1') + 100 * Decimal('4')) / 10**6}" in info.value.message
    # With tools, Anthropic's own tool-use system prompt (up to 530 tokens) is billed as input too.
    prompt = counter.count_messages(SHORT, "claude-3-5-haiku-20241022", tools=[TOOL]).tokens + 530
    assert f"may cost up to ${(prompt * Decimal('1') + 100 * Decimal('4')) / 10**6}" in tooled.value.message


def test_every_choice_is_priced_also_when_the_upstream_reports_no_usage(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=50, stream_usage=False)
    with _server(tmp_path, openai_upstream) as server:
        stream = _client(server).chat.completions.create(
            model="gpt-4o-mini", messages=SHORT, n=3, max_tokens=50, stream=True
        )
        indexes = {c.choices[0].index for c in stream if c.choices}
    assert indexes == {0, 1, 2}
    (row,) = ledger_rows(tmp_path / "ledger.db")
    # Counted locally from the text of all three choices: 3 x 50 tokens.
    assert (row["usage_estimated"], row["output_tokens"]) == (1, 150)
    assert Decimal(row["cost_usd"]) == _mini_cost(row["input_tokens"], 150)


def test_a_key_whose_stream_was_cut_stores_nothing_and_a_retry_generates_anew(tmp_path, openai_upstream):
    openai_upstream.queue(Reply(text="cut short " * 20, drop_after_chunks=3), Reply(text="whole answer"))
    headers = {"Idempotency-Key": "cut-1"}
    with _server(tmp_path, openai_upstream) as server:
        client = _client(server)
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(
                model="gpt-4o-mini", messages=SHORT, stream=True, extra_headers=headers
            ):
                pass
        retry = client.chat.completions.create(model="gpt-4o-mini", messages=SHORT, extra_headers=headers)
        assert retry.choices[0].message.content == "whole answer"
        again = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=SHORT, extra_headers=headers
        )
    assert (
        again.headers["x-thrifty-cache"] == "dedup"
        and again.parse().choices[0].message.content == "whole answer"
    )
    assert len(openai_upstream.requests) == 2
