"""Session 8 attacks on semantic-cache feedback (README "Live verification and adaptive thresholds"):
each hit counts once and only from its own tenant. A flood of concurrent feedback on one hit, through
the header and the endpoint at once, while the hit is being written to `semantic_hits`; ids that are
not hits (a miss, a shadow call's, another tenant's); wrong types, unicode and huge values. Real
local embedding model, real SQLite file, a real loopback server and a wire-level fake upstream."""

from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.cache.semantic.adaptive import PartitionState
from thrifty.server.run import BackgroundServer

pytest.importorskip("onnxruntime")

SYSTEM = {"role": "system", "content": "You are the Acme support desk."}
FAQ = {
    "What are your opening hours?": "We are open 9 to 5, Monday to Friday.",
    "How do I return an item I bought?": "Send it back within 30 days with the receipt.",
    "Do you ship to other countries?": "Yes, we ship to 40 countries.",
}
REPEAT = "What are your opening hours?"  # served from the cache: no upstream call
PARAPHRASE = "When are you open?"


def _server(tmp_path: Path, upstream: OpenAIWireServer) -> BackgroundServer:
    routes = {
        "support": {
            "model": "gpt-4o-mini",
            "semantic_cache": {
                "ttl_s": 600,
                "threshold": 0.5,
                "min_entries": 0,
                "verify": {"min_rate": 0.0, "max_rate": 0.0000001},  # no shadow calls
            },
        }
    }
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        routes=routes,
        # Hits are written every 50 ms: the flood below meets hits in memory, in a write under way
        # and in the table.
        semantic={"embed_threads": 2, "state_flush_s": 0},
        resilience={"max_retries": 0},
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _ask(server: BackgroundServer, question: str, tenant: str = "acme", **headers: Any) -> httpx.Response:
    resp = httpx.post(
        server.base_url + "/chat/completions",
        json={
            "model": "route:support",
            "messages": [SYSTEM, {"role": "user", "content": question}],
            "temperature": 0,
        },
        headers=[("authorization", f"Bearer {KEYS[tenant]}"), *headers.items()],
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp


def _feedback(server: BackgroundServer, body: Any, tenant: str = "acme") -> httpx.Response:
    return httpx.post(
        server.base_url + "/thrifty/feedback",
        json=body,
        headers={"authorization": f"Bearer {KEYS[tenant]}"},
        timeout=30,
    )


def _seed(server: BackgroundServer, upstream: OpenAIWireServer, tenant: str = "acme") -> list[str]:
    ids = []
    for question, answer in FAQ.items():
        upstream.queue(Reply(text=answer))
        resp = _ask(server, question, tenant)
        assert resp.headers["x-thrifty-cache"] == "miss"
        ids.append(resp.headers["x-thrifty-request-id"])
    return ids


def _rows(tmp_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _states(tmp_path: Path) -> dict[str, PartitionState]:
    rows = _rows(tmp_path, "SELECT state FROM semantic_partition_state")
    return {s.tenant_id: s for s in (PartitionState.from_dict(json.loads(r[0])) for r in rows)}


def test_a_feedback_flood_on_one_hit_counts_once_whatever_path_it_takes(tmp_path, openai_upstream):
    with _server(tmp_path, openai_upstream) as server:
        misses = _seed(server, openai_upstream)
        _seed(server, openai_upstream, tenant="globex")
        hits = [_ask(server, PARAPHRASE) for _ in range(2)]
        assert [h.headers["x-thrifty-cache"] for h in hits] == ["semantic"] * 2
        rid, other = (h.headers["x-thrifty-request-id"] for h in hits)
        theirs = _ask(server, PARAPHRASE, tenant="globex").headers["x-thrifty-request-id"]
        upstream_before = len(openai_upstream.requests)

        def header(i: int) -> str:
            # Mostly the one hit; also what must count nothing: a miss's id, a shadow call's id,
            # another tenant's hit, the id spelled in capitals.
            named = [rid, rid, rid, misses[0], f"{rid}.verify", theirs, rid.upper(), rid][i % 8]
            return _ask(server, REPEAT, **{"x-thrifty-cache-wrong": named}).headers["x-thrifty-cache"]

        def endpoint(i: int) -> int:
            # The label flips: each change is a new notification to the cache.
            label = "cache_wrong" if i % 2 == 0 else "fine"
            return _feedback(server, {"request_id": rid, "label": label}).status_code

        with ThreadPoolExecutor(24) as pool:
            heads = pool.map(header, range(48))
            posts = pool.map(endpoint, range(16))
            assert set(heads) == {"semantic"} and set(posts) == {200}
        assert len(openai_upstream.requests) == upstream_before  # the flood itself cost nothing
        assert _feedback(server, {"request_id": theirs, "label": "cache_wrong"}).status_code == 404
        # The other hit still takes its own feedback, once.
        _ask(server, REPEAT, **{"x-thrifty-cache-wrong": other})
        _ask(server, REPEAT, **{"x-thrifty-cache-wrong": other})
    acme, globex = _states(tmp_path)["acme"], _states(tmp_path)["globex"]
    assert (acme.feedback, acme.feedback_wrong, sum(acme.wrong)) == (2, 2, 2)
    assert (globex.feedback, globex.feedback_wrong, sum(globex.wrong)) == (0, 0, 0)
    judged = dict(_rows(tmp_path, "SELECT request_id, feedback FROM semantic_hits"))
    assert judged[rid] == 1 and judged[other] == 1 and judged[theirs] == 0
    assert not _rows(tmp_path, "SELECT 1 FROM ledger WHERE request_id LIKE '%.verify'")


def test_feedback_of_the_wrong_shape_is_refused_and_another_tenants_id_looks_unknown(
    tmp_path, openai_upstream
):
    with _server(tmp_path, openai_upstream) as server:
        _seed(server, openai_upstream)
        rid = _ask(server, PARAPHRASE).headers["x-thrifty-request-id"]
        for body in (
            {"request_id": 123, "label": "cache_wrong"},
            {"request_id": [rid], "label": "cache_wrong"},
            {"request_id": {"id": rid}, "label": "cache_wrong"},
            {"request_id": "   ", "label": "cache_wrong"},
            {"request_id": rid},
            {"request_id": rid, "label": "x" * 65},
            {"request_id": rid, "label": ["cache_wrong"]},
            {"request_id": rid, "correct": "false"},
            {"request_id": rid, "score": True},
            {"request_id": rid, "score": "0.1"},
            {"request_id": rid, "label": "cache_wrong", "tenant": "globex"},
            [{"request_id": rid, "label": "cache_wrong"}],
            "cache_wrong",
        ):
            resp = _feedback(server, body)
            assert resp.status_code == 400, (body, resp.status_code, resp.text)
        raw = httpx.post(
            server.base_url + "/thrifty/feedback",
            content=b'{"request_id": "' + rid.encode() + b'", "score": NaN}',
            headers={"authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"},
            timeout=30,
        )
        assert raw.status_code == 400
        # Another tenant's real id is answered exactly like an id that does not exist.
        real = _feedback(server, {"request_id": rid, "label": "cache_wrong"}, tenant="globex")
        fake = _feedback(server, {"request_id": rid[:-1] + "x", "label": "cache_wrong"}, tenant="globex")
        assert real.status_code == fake.status_code == 404
        assert real.json()["error"]["code"] == fake.json()["error"]["code"] == "request_not_found"
        assert real.json()["error"]["message"].replace(rid, "ID") == fake.json()["error"]["message"].replace(
            rid[:-1] + "x", "ID"
        )
        # Unicode and a header of 8 KB in x-thrifty-cache-wrong: the request is answered, nothing counts.
        for named in ("ответ-неверный-✗".encode(), b"r" * 8000):
            resp = httpx.post(
                server.base_url + "/chat/completions",
                json={
                    "model": "route:support",
                    "messages": [SYSTEM, {"role": "user", "content": REPEAT}],
                    "temperature": 0,
                },
                headers=[
                    (b"authorization", f"Bearer {KEYS['acme']}".encode()),
                    (b"x-thrifty-cache-wrong", named),
                ],
                timeout=30,
            )
            assert resp.status_code == 200 and resp.headers["x-thrifty-cache"] == "semantic"
        time.sleep(0.3)  # the header's lookup runs in the background: give it time to go wrong
    assert all(s.feedback == 0 for s in _states(tmp_path).values())
    assert _rows(tmp_path, "SELECT feedback FROM semantic_hits WHERE request_id = ?", rid) == [(0,)]


def test_shadow_verifications_cannot_spend_past_the_tenants_budget(tmp_path, openai_upstream):
    """Every paraphrase hit sampled for verification, acme's budget spent by its seeding: its hits are
    served (they cost nothing) and their shadow calls never reach the upstream; globex, with no
    budget, shows the same hits are verified when there is money."""
    from decimal import Decimal

    from tests.conftest import ledger_rows
    from thrifty.stores.keys import hash_key

    per_miss = (42 * Decimal("0.15") + 3000 * Decimal("0.6")) / 10**6  # $0.0018063
    budget = Decimal("0.0062")  # the three seeds fit (each reserves ~$0.00246, settles lower)
    # Shadow calls find the cached answer right: thresholds stay where they are.
    openai_upstream.default = Reply(text=FAQ[REPEAT], completion_tokens=3000)
    routes = {
        "support": {
            "model": "gpt-4o-mini",
            "semantic_cache": {
                "ttl_s": 600,
                "threshold": 0.5,
                "min_entries": 0,
                "verify": {"min_rate": 1.0, "max_rate": 1.0},  # every paraphrase hit verified
            },
        }
    }
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes=routes,
        tenants={
            "acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": str(budget)}},
            "globex": {"key_hashes": [hash_key(KEYS["globex"])]},
        },
        semantic={"embed_threads": 2, "state_flush_s": 0},
        resilience={"max_retries": 0},
    )
    paraphrases = (PARAPHRASE, "When do you open?")
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        for tenant in ("acme", "globex"):
            for question, answer in FAQ.items():
                openai_upstream.queue(Reply(text=answer, completion_tokens=3000))
                assert _ask(server, question, tenant).headers["x-thrifty-cache"] == "miss"
        served = [_ask(server, q).headers["x-thrifty-cache"] for q in paraphrases * 3]
        served += [_ask(server, q, "globex").headers["x-thrifty-cache"] for q in paraphrases]
        assert set(served) == {"semantic"}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shadows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["request_id"].endswith(".verify")]
            if len(shadows) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # acme's shadows, had they been let through, land now
    shadows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["request_id"].endswith(".verify")]
    assert sorted(r["tenant_id"] for r in shadows) == ["globex", "globex"]
    assert len(openai_upstream.requests) == 6 + 2
    acme = [r for r in ledger_rows(tmp_path / "ledger.db") if r["tenant_id"] == "acme"]
    spent = sum((Decimal(r["cost_usd"]) for r in acme if r["cost_usd"]), Decimal(0))
    assert spent == 3 * per_miss <= budget
