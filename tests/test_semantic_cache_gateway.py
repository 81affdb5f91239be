"""The semantic cache through the real gateway: the real local embedding model, a real SQLite file,
the official openai SDK as the client and a wire-level fake upstream."""

from __future__ import annotations

import sqlite3
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

pytest.importorskip("onnxruntime")

SYSTEM = {"role": "system", "content": "You are the Acme support desk."}
# One answer per question: the upstream answers each with its own text.
FAQ = {
    "What are your opening hours?": "We are open 9 to 5, Monday to Friday.",
    "How do I return an item I bought?": "Send it back within 30 days with the receipt.",
    "Do you ship to other countries?": "Yes, we ship to 40 countries.",
    "How do I reset my password?": "Use the 'forgot password' link on the sign-in page.",
    "How do I enable two-factor authentication?": "Open Settings > Security > Enable 2FA.",
    "Can I transfer 100 dollars to my savings account?": "Yes, transfers up to 1,000 dollars are instant.",
}
# gpt-4o-mini list price: 0.15 / 0.60 USD per million tokens; the fake reports 42 in, 9 out.
COST = (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6


def _settings(tmp_path: Path, upstream: Any, **semantic: Any):
    return base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        routes={
            # A six-entry FAQ is far sparser than the data the built-in rule was tuned on (and below
            # the default min_entries floor); these tests are about the gateway's mechanics and the
            # guards, so the route sets its own floor and probability cut.
            "support": {
                "model": "gpt-4o-mini",
                "semantic_cache": {"ttl_s": 600, "threshold": 0.5, "min_entries": 0, **semantic},
            },
            "other": {"model": "gpt-4o-mini", "semantic_cache": {}},
        },
        semantic={"embed_threads": 2},
    )


def _ask(server: BackgroundServer, question: str, tenant: str = "acme", **kw: Any):
    headers = kw.pop("headers", None) or {}
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
    body = {
        "model": "route:support",
        "messages": [SYSTEM, {"role": "user", "content": question}],
        "temperature": 0,
    }
    body.update(kw)
    return client.chat.completions.with_raw_response.create(**body, extra_headers=headers)


def _stored(db: Path, count: int, timeout: float = 10.0) -> list[sqlite3.Row]:
    """The semantic_cache rows once there are `count` of them: the cache writer thread commits a
    new entry after the response (it is served from memory meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM semantic_cache ORDER BY entry_id").fetchall()
        finally:
            conn.close()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def _seed(server: BackgroundServer, upstream: Any, **kw: Any) -> None:
    for question, answer in FAQ.items():
        upstream.queue(Reply(text=answer))
        assert _ask(server, question, **kw).headers["x-thrifty-cache"] == "miss"


@pytest.fixture
def server(tmp_path: Path, openai_upstream):
    with BackgroundServer(_settings(tmp_path, openai_upstream), secrets={"up": UPSTREAM_KEY}) as s:
        yield s


def test_paraphrases_are_answered_from_the_cache_and_recorded_as_saved(server, openai_upstream, tmp_path):
    _seed(server, openai_upstream)
    calls = len(openai_upstream.requests)
    for paraphrase, original in [
        ("When are you open?", "What are your opening hours?"),
        ("How can I return something I purchased?", "How do I return an item I bought?"),
        ("Do you deliver internationally?", "Do you ship to other countries?"),
        ("I forgot my password, how do I reset it?", "How do I reset my password?"),
    ]:
        resp = _ask(server, paraphrase)
        assert resp.headers["x-thrifty-cache"] == "semantic", paraphrase
        assert resp.parse().choices[0].message.content == FAQ[original]
        assert resp.headers["x-thrifty-cost-usd"] == "0"
    assert len(openai_upstream.requests) == calls  # no upstream call for any of them
    rows = ledger_rows(tmp_path / "ledger.db")
    hits = [r for r in rows if r["cache"] == "semantic"]
    assert len(hits) == 4 and all(r["attempts"] == "[]" for r in hits)
    assert all(Decimal(r["cost_usd"]) == 0 and Decimal(r["saved_usd"]) == COST for r in hits)
    from thrifty.report import build_report
    from thrifty.stores.sqlite_db import open_database

    (route,) = build_report(open_database(tmp_path / "ledger.db"), "route")
    assert (route.group, route.cache_hits, route.saved_usd) == ("support", 4, 4 * COST)


@pytest.mark.parametrize(
    ("question", "why"),
    [
        ("How do I disable two-factor authentication?", "opposite verb"),
        ("Can I transfer 500 dollars to my savings account?", "another number"),
        ("How do I return an item I did not buy?", "a negation"),
        ("What is the capital of France?", "nothing near"),
    ],
)
def test_near_misses_go_upstream(server, openai_upstream, question, why):
    _seed(server, openai_upstream)
    openai_upstream.queue(Reply(text="fresh answer"))
    resp = _ask(server, question)
    assert resp.headers["x-thrifty-cache"] == "miss", why
    assert resp.parse().choices[0].message.content == "fresh answer"


@pytest.mark.parametrize(
    ("tenant", "changes"),
    [
        ("globex", {}),  # never across tenants
        ("acme", {"headers": {"x-thrifty-prompt-version": "v2"}}),
        ("acme", {"headers": {"x-thrifty-corpus-version": "kb-2026-11-24"}}),
        ("acme", {"model": "route:other"}),
        ("acme", {"max_tokens": 50}),  # another sampling setup is another context
        ("acme", {"temperature": 0.7}),  # not deterministic: neither looked up nor stored
    ],
)
def test_each_partition_component_separates_entries(server, openai_upstream, tenant, changes):
    openai_upstream.queue(Reply(text="We are open 9 to 5."))
    _ask(server, "What are your opening hours?")
    openai_upstream.queue(Reply(text="other answer"))
    assert (
        _ask(server, "What are your opening hours?", tenant=tenant, **changes).headers["x-thrifty-cache"]
        == "miss"
    )


def test_another_system_prompt_or_history_is_another_partition(server, openai_upstream):
    openai_upstream.queue(Reply(text="We are open 9 to 5."))
    _ask(server, "What are your opening hours?")
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    question = {"role": "user", "content": "What are your opening hours?"}
    for messages in (
        [{"role": "system", "content": "You are Globex's support desk."}, question],
        [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, question],
    ):
        openai_upstream.queue(Reply(text="other answer"))
        resp = client.chat.completions.with_raw_response.create(
            model="route:support", messages=messages, temperature=0
        )
        assert resp.headers["x-thrifty-cache"] == "miss"
    # ...while the same question in the original context, worded with other case and punctuation, hits.
    assert _ask(server, "what are your opening hours").headers["x-thrifty-cache"] == "semantic"


def test_a_hit_is_replayed_as_sse(server, openai_upstream):
    _seed(server, openai_upstream)
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    text, last = "", None
    for chunk in client.chat.completions.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": "What time do you open?"}],
        temperature=0,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert text == FAQ["What are your opening hours?"]
    assert last is not None and last.model_extra["thrifty"]["cache"] == "semantic"
    # A client that asks for usage gets it on a replay too, as it would as JSON.
    chunks = list(
        client.chat.completions.create(
            model="route:support",
            messages=[SYSTEM, {"role": "user", "content": "What time do you open?"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 42
    # A streamed answer is stored too, for the next client.
    openai_upstream.queue(Reply(text="Our office is in Lyon."))
    for _ in client.chat.completions.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": "Where is your office located?"}],
        temperature=0,
        stream=True,
    ):
        pass
    resp = _ask(server, "Where is your office?")
    assert resp.headers["x-thrifty-cache"] == "semantic"
    assert resp.parse().choices[0].message.content == "Our office is in Lyon."


def test_cache_control_directives(server, openai_upstream):
    openai_upstream.queue(Reply(text="We are open 9 to 5."))
    _ask(server, "What are your opening hours?", headers={"Cache-Control": "no-store"})
    assert _ask(server, "What are your opening hours?").headers["x-thrifty-cache"] == "miss"  # not stored
    assert _ask(server, "What are your opening hours?").headers["x-thrifty-cache"] == "semantic"
    resp = _ask(server, "What are your opening hours?", headers={"Cache-Control": "no-cache"})
    assert resp.headers["x-thrifty-cache"] == "miss"  # lookup skipped


def test_entries_store_what_the_issue_names(server, openai_upstream, tmp_path):
    openai_upstream.queue(Reply(text="Send it back within 30 days."))
    _ask(
        server,
        "  How do I RETURN an item?? ",
        headers={"x-thrifty-evidence": "kb-12, kb-7", "x-thrifty-corpus-version": "kb-3"},
    )
    (row,) = _stored(tmp_path / "ledger.db", 1)
    assert (
        row["query"] == "  How do I RETURN an item?? "
        and row["normalised_query"] == "how do i return an item"
    )
    assert row["embedding_model"] == "all-MiniLM-L6-v2/int8-onnx" and len(row["embedding"]) == 384 * 4
    assert row["evidence"] == '["kb-12","kb-7"]' and row["answer_id"].startswith("evidence:")
    assert row["corpus_version"] == "kb-3" and row["safety_policy_version"] == "1"
    assert row["tenant_id"] == "acme" and row["route"] == "support"
    assert 599 < row["expires_at"] - row["created_at"] <= 600
    assert '"Send it back within 30 days."' in row["response"]


def test_ttl_restart_bound_and_safety_policy(tmp_path, openai_upstream):
    short = _settings(tmp_path, openai_upstream, ttl_s=0.5)
    with BackgroundServer(short, secrets={"up": UPSTREAM_KEY}) as server:
        _ask(server, "What are your opening hours?")
        assert _ask(server, "what are your opening hours").headers["x-thrifty-cache"] == "semantic"
        time.sleep(0.6)
        # Expired. (no-store: the fresh answer must not become a new short-lived entry that the
        # next server, started within its half second, would rightly serve.)
        expired = _ask(server, "what are your opening hours", headers={"Cache-Control": "no-store"})
        assert expired.headers["x-thrifty-cache"] == "miss"
    long_lived = _settings(tmp_path, openai_upstream)
    with BackgroundServer(long_lived, secrets={"up": UPSTREAM_KEY}) as server:
        _seed(server, openai_upstream)
    with BackgroundServer(long_lived, secrets={"up": UPSTREAM_KEY}) as server:
        resp = _ask(server, "When are you open?")  # a restart rebuilds the index from SQLite
        assert resp.headers["x-thrifty-cache"] == "semantic"
        assert resp.parse().choices[0].message.content == FAQ["What are your opening hours?"]
    new_policy = _settings(tmp_path, openai_upstream, safety_policy_version="2")
    with BackgroundServer(new_policy, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, "When are you open?").headers["x-thrifty-cache"] == "miss"
    bounded = _settings(tmp_path, openai_upstream, max_entries=3)
    with BackgroundServer(bounded, secrets={"up": UPSTREAM_KEY}) as server:
        pass
    conn = sqlite3.connect(tmp_path / "ledger.db")
    kept = [
        r[0]
        for r in conn.execute("SELECT query FROM semantic_cache WHERE route = 'support' ORDER BY entry_id")
    ]
    assert len(kept) == 3  # the oldest entries were evicted at start


def test_purge_takes_effect_in_a_running_gateway(server, openai_upstream, tmp_path):
    _seed(server, openai_upstream)
    assert len(_stored(tmp_path / "ledger.db", len(FAQ))) == len(FAQ)
    assert _ask(server, "When are you open?").headers["x-thrifty-cache"] == "semantic"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "cache",
            "purge",
            "--route",
            "support",
            "--db",
            str(tmp_path / "ledger.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 0
        and f"purged {len(FAQ)} cache entries (0 exact, {len(FAQ)} semantic)" in out.stdout
    )
    openai_upstream.queue(Reply(text="fresh"))
    resp = _ask(server, "When are you open?")
    assert resp.headers["x-thrifty-cache"] == "miss" and resp.parse().choices[0].message.content == "fresh"


def test_a_truncated_answer_is_not_stored(server, openai_upstream, tmp_path):
    openai_upstream.queue(Reply(text="We are open", finish_reason="length"))
    _ask(server, "What are your opening hours?")
    openai_upstream.queue(Reply(text="Send it back within 30 days."))
    _ask(server, "How do I return an item?")
    # Entries are committed in order: once the whole answer after it is stored, the cut one was not.
    assert [r["query"] for r in _stored(tmp_path / "ledger.db", 1)] == ["How do I return an item?"]


def test_a_sparse_partition_answers_only_repeats(tmp_path, openai_upstream):
    settings = _settings(tmp_path, openai_upstream, min_entries=7)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        _seed(server, openai_upstream)  # six entries, one short of the floor
        openai_upstream.queue(Reply(text="fresh"))
        assert _ask(server, "How can I return something I purchased?").headers["x-thrifty-cache"] == "miss"
        assert _ask(server, "how do I return an item I bought").headers["x-thrifty-cache"] == "semantic"
        # The miss above was stored: seven entries, and paraphrases are judged by the rule again.
        assert _ask(server, "When are you open?").headers["x-thrifty-cache"] == "semantic"


def test_the_built_in_rule_judges_by_the_partition_size(tmp_path, openai_upstream):
    from thrifty.cache.semantic.decision import decide, default_params

    params = default_params()
    assert params.threshold_for(6) == float("inf") and params.threshold_for(20_000) < 1
    # No route cut, no floor: only the built-in rule, told how many entries the partition holds.
    settings = _settings(tmp_path, openai_upstream, threshold=None, min_entries=0)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        _seed(server, openai_upstream)
        openai_upstream.queue(Reply(text="fresh"))
        assert _ask(server, "How can I return something I purchased?").headers["x-thrifty-cache"] == "miss"
        assert _ask(server, "how do i return an item i bought").headers["x-thrifty-cache"] == "semantic"
    # The same neighbours in a large cache would be served: size is what refused them above.
    from thrifty.cache.semantic.decision import Neighbour

    near = [Neighbour(0.95, "returns", "How do I return an item I bought?"), Neighbour(0.3, "hours", "When?")]
    sparse = decide("How can I return something I purchased?", near, params, cache_size=6)
    assert not sparse.hit and "too sparse" in sparse.reason
    assert decide("How can I return something I purchased?", near, params, cache_size=20_000).hit


def test_a_route_uses_the_parameters_file_it_names(tmp_path, openai_upstream):
    import json

    from thrifty.cache.semantic.decision import default_params
    from thrifty.errors import ConfigError
    from thrifty.gateway import Gateway

    never = tmp_path / "never.json"
    params = default_params().to_dict()
    params["threshold"] = "inf"  # what `cache tune` writes when no threshold reaches the target
    never.write_text(json.dumps(params))
    settings = _settings(tmp_path, openai_upstream, params=str(never), threshold=None)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        _seed(server, openai_upstream)
        openai_upstream.queue(Reply(text="fresh"))
        assert _ask(server, "How can I return something I purchased?").headers["x-thrifty-cache"] == "miss"
        # The same question up to case and punctuation needs no learned rule.
        assert _ask(server, "how do i return an item i bought").headers["x-thrifty-cache"] == "semantic"
    broken = tmp_path / "broken.json"
    broken.write_text('{"weights": "nope"}')
    with pytest.raises(ConfigError, match="not a parameters file"):
        Gateway(_settings(tmp_path, openai_upstream, params=str(broken)))
