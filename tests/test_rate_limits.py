"""Per-tenant rate limits and per-session step limits, through the real gateway."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key

MSG = [{"role": "user", "content": "hi"}]  # 3 + (3 + 1 + 1) + ... = 8 o200k tokens with framing


@pytest.fixture
def server(tmp_path: Path, openai_upstream):
    openai_upstream.default = Reply(delay_s=0.05)
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        tenants={
            "acme": {"key_hashes": [hash_key(KEYS["acme"])], "rate_limit": {"requests_per_minute": 10}},
            "globex": {"key_hashes": [hash_key(KEYS["globex"])], "rate_limit": {"tokens_per_minute": 1000}},
        },
        routes={"agent": {"model": "gpt-4o-mini", "max_steps_per_session": 3}},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as srv:
        yield srv


def _client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)


def test_requests_per_minute_hold_under_concurrency(server, openai_upstream):
    client = _client(server, "acme")

    def call(_: int) -> int:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            return 200
        except openai.RateLimitError as err:
            assert "rate limit of 10 requests per minute" in err.message
            assert err.body["code"] == "rate_limit_exceeded"
            assert 1 <= int(err.response.headers["retry-after"]) <= 60
            return 429

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(call, range(32)))
    assert codes.count(200) == 10 and codes.count(429) == 22
    assert len(openai_upstream.requests) == 10


def test_tokens_per_minute_count_prompt_and_output_ceiling(server):
    client = _client(server, "globex")
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=600)  # ~608 tokens
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=600)
    assert "1000 tokens per minute" in info.value.message and "lower max_tokens" in info.value.message
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=300)  # still fits


def test_agent_session_step_limit(server):
    client = _client(server, "acme")
    headers = {"x-thrifty-session": "run-42"}
    for _ in range(3):
        client.chat.completions.create(model="route:agent", messages=MSG, extra_headers=headers)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="route:agent", messages=MSG, extra_headers=headers)
    assert info.value.body["code"] == "session_step_limit" and "run-42" in info.value.message
    # Another session is fresh.
    client.chat.completions.create(
        model="route:agent", messages=MSG, extra_headers={"x-thrifty-session": "run-43"}
    )
