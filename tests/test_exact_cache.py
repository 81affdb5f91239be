"""The exact cache through the real gateway: every key component, TTL, directives, SSE, restart."""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MSG = [
    {"role": "system", "content": "You are the Acme FAQ."},
    {"role": "user", "content": "What are your hours?"},
]
BASE: dict[str, Any] = {"model": "route:faq", "messages": MSG, "temperature": 0}
COST = (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6


def _settings(tmp_path: Path, upstream, ttl: float = 60):
    return base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        routes={
            "faq": {"model": "gpt-4o-mini", "cache": {"ttl_s": ttl}},
            "faq-big": {"model": "gpt-4o", "cache": {"ttl_s": ttl}},
            "personal": {"model": "gpt-4o-mini", "cache": {"per_user": True}},
            "nocache": {"model": "gpt-4o-mini"},
        },
    )


@pytest.fixture
def gateway(tmp_path: Path, openai_upstream):
    openai_upstream.default = Reply(text="We are open 9 to 5.")
    with BackgroundServer(_settings(tmp_path, openai_upstream), secrets={"up": UPSTREAM_KEY}) as server:
        yield server


def _ask(server, tenant: str = "acme", headers: dict[str, str] | None = None, **changes: Any):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
    return client.chat.completions.with_raw_response.create(
        **{**BASE, **changes}, extra_headers=headers or {}
    )


def test_a_repeat_is_answered_from_the_cache_and_recorded_as_saved(gateway, openai_upstream, tmp_path):
    first = _ask(gateway)
    second = _ask(gateway)
    assert first.headers["x-thrifty-cache"] == "miss" and second.headers["x-thrifty-cache"] == "exact"
    assert second.parse().choices[0].message.content == "We are open 9 to 5."
    assert second.headers["x-thrifty-cost-usd"] == "0" and len(openai_upstream.requests) == 1
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [r["cache"] for r in rows] == ["miss", "exact"]
    assert Decimal(rows[1]["cost_usd"]) == 0 and Decimal(rows[1]["saved_usd"]) == COST
    assert rows[1]["attempts"] == "[]"
    from thrifty.report import build_report
    from thrifty.stores.sqlite_db import open_database

    (route,) = build_report(open_database(tmp_path / "ledger.db"), "route")
    assert (route.group, route.cache_hits, route.saved_usd, route.cost_usd) == ("faq", 1, COST, COST)


@pytest.mark.parametrize(
    ("tenant", "headers", "changes"),
    [
        ("globex", None, {}),  # another tenant never sees acme's answers
        ("acme", {"x-thrifty-prompt-version": "v2"}, {}),
        ("acme", {"x-thrifty-corpus-version": "2026-11-22"}, {}),
        ("acme", None, {"model": "route:faq-big"}),
        ("acme", None, {"messages": [MSG[0], {"role": "user", "content": "What are your HOURS?"}]}),
        ("acme", None, {"messages": [{"role": "system", "content": "You are Globex's FAQ."}, MSG[1]]}),
        ("acme", None, {"tools": [{"type": "function", "function": {"name": "hours", "parameters": {}}}]}),
        ("acme", None, {"response_format": {"type": "json_object"}}),
        ("acme", None, {"max_tokens": 50}),
        ("acme", None, {"top_p": 0.5}),
    ],
)
def test_every_key_component_separates_entries(gateway, openai_upstream, tenant, headers, changes):
    _ask(gateway)
    other = _ask(gateway, tenant, headers, **changes)
    assert other.headers["x-thrifty-cache"] == "miss" and len(openai_upstream.requests) == 2
    again = _ask(gateway, tenant, headers, **changes)  # and that variant is cached on its own
    assert again.headers["x-thrifty-cache"] == "exact" and len(openai_upstream.requests) == 2


def test_only_deterministic_requests_on_caching_routes_are_cached(gateway, openai_upstream):
    for _ in range(2):
        _ask(gateway, temperature=0.7)
        _ask(gateway, model="route:nocache")
    assert len(openai_upstream.requests) == 4


def test_user_scope_on_personal_routes(gateway, openai_upstream):
    _ask(gateway, headers={"x-thrifty-user": "u1"}, model="route:personal")
    assert (
        _ask(gateway, headers={"x-thrifty-user": "u2"}, model="route:personal").headers["x-thrifty-cache"]
        == "miss"
    )
    assert (
        _ask(gateway, headers={"x-thrifty-user": "u1"}, model="route:personal").headers["x-thrifty-cache"]
        == "exact"
    )


def test_cache_control_no_cache_and_no_store(gateway, openai_upstream):
    _ask(gateway, headers={"Cache-Control": "no-store"})
    assert _ask(gateway).headers["x-thrifty-cache"] == "miss"  # the no-store answer was not kept
    assert _ask(gateway, headers={"Cache-Control": "no-cache"}).headers["x-thrifty-cache"] == "miss"
    assert len(openai_upstream.requests) == 3
    assert _ask(gateway).headers["x-thrifty-cache"] == "exact"


def test_a_hit_is_replayed_as_sse_to_a_streaming_client(gateway, openai_upstream, tmp_path):
    _ask(gateway)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["acme"], max_retries=0)
    text, last = "", None
    for chunk in client.chat.completions.create(**BASE, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert text == "We are open 9 to 5." and last.model_extra["thrifty"]["cache"] == "exact"
    assert len(openai_upstream.requests) == 1
    # ...and an answer that was first streamed is cached for the next (non-streaming) client too.
    streamed_first = {"messages": [MSG[0], {"role": "user", "content": "Do you ship abroad?"}]}
    for _ in client.chat.completions.create(**{**BASE, **streamed_first}, stream=True):
        pass
    assert _ask(gateway, **streamed_first).parse().choices[0].message.content == "We are open 9 to 5."
    assert len(openai_upstream.requests) == 2


def test_ttl_restart_and_purge(tmp_path, openai_upstream):
    settings = _settings(tmp_path, openai_upstream, ttl=0.5)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        _ask(server)
        assert _ask(server).headers["x-thrifty-cache"] == "exact"
        time.sleep(0.6)
        assert _ask(server).headers["x-thrifty-cache"] == "miss"  # expired
    long_lived = _settings(tmp_path, openai_upstream, ttl=600)
    other = {"messages": [MSG[0], {"role": "user", "content": "Where are you?"}]}  # not in the cache yet
    with BackgroundServer(long_lived, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, **other).headers["x-thrifty-cache"] == "miss"
    with BackgroundServer(long_lived, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, **other).headers["x-thrifty-cache"] == "exact"  # a restart keeps the cache
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "cache",
            "purge",
            "--tenant",
            "acme",
            "--db",
            str(tmp_path / "ledger.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "purged 2 cache entries (2 exact, 0 semantic)" in out.stdout
    with BackgroundServer(long_lived, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, **other).headers["x-thrifty-cache"] == "miss"
    refused = subprocess.run(
        [sys.executable, "-m", "thrifty", "cache", "purge", "--db", str(tmp_path / "ledger.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "give a scope" in refused.stderr


def test_a_cache_hit_still_reports_the_budget_left(tmp_path, openai_upstream):
    from thrifty.stores.keys import hash_key

    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={"faq": {"model": "gpt-4o-mini", "cache": {"ttl_s": 60}}},
        tenants={"acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": "1"}}},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        first = _ask(server)
        hit = _ask(server)
        missing = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            missing.chat.completions.create(model="nope", messages=MSG)
    assert hit.headers["x-thrifty-cache"] == "exact"

    def left(header: str) -> tuple[Decimal, str]:
        amount, scope = header.split(";", 1)
        return Decimal(amount), scope.strip()

    # After the first call settled, $1 minus its actual cost is left; the hit and the 404 say so.
    expected = (Decimal(1) - COST, "scope=tenant:acme; window=day")
    assert left(hit.headers["x-thrifty-budget-remaining"]) == expected
    assert left(info.value.response.headers["x-thrifty-budget-remaining"]) == expected
    # The first one reported what was left while its worst case was still reserved.
    assert left(first.headers["x-thrifty-budget-remaining"])[0] < expected[0]


def test_an_entry_put_while_another_writer_holds_the_lock_is_served_and_then_stored(tmp_path):
    """The loop never waits for SQLite's lock, and a busy lock no longer loses the entry."""
    from types import SimpleNamespace

    from thrifty.cache.exact import SqliteExactCache
    from thrifty.stores.sqlite_db import open_database
    from thrifty.stores.write_behind import SqliteWriteBehind
    from thrifty.types import Usage

    path = tmp_path / "ledger.db"
    loop_conn = open_database(path)
    loop_conn.execute("PRAGMA busy_timeout=0")
    writer = SqliteWriteBehind(path)
    writer.start()
    cache = SqliteExactCache(loop_conn, writer)
    ctx = SimpleNamespace(
        tags=SimpleNamespace(tenant_id="acme", prompt_version=None, corpus_version=None),
        route="faq",
        requested_model="gpt-4o-mini",
    )
    blocker = open_database(path)
    blocker.execute("BEGIN IMMEDIATE")  # another writer (the ledger, a fold) holds the lock
    try:
        started = time.monotonic()
        cache.put("k1", ctx, {"answer": 1}, Usage(input_tokens=5, output_tokens=2), ttl_s=60)
        assert time.monotonic() - started < 5  # did not wait for the lock (that would be 30 s)
        assert cache.get("k1", time.time()) == ({"answer": 1}, Usage(input_tokens=5, output_tokens=2))
        assert loop_conn.execute("SELECT COUNT(*) FROM exact_cache").fetchone()[0] == 0
    finally:
        blocker.execute("COMMIT")
    writer.close()
    assert cache._pending == {}
    fresh = SqliteExactCache(open_database(path))
    assert fresh.get("k1", time.time()) == ({"answer": 1}, Usage(input_tokens=5, output_tokens=2))
    assert fresh.get("k1", time.time() + 61) is None
