"""What verification learns, shared by replicas on one real PostgreSQL: a wrong hit found by one
replica's shadow call turns the partition off on the other, their counts add up in the shared row
(never overwrite each other), near misses are judged off the response path, and a restarted
replica resumes the thresholds. Real gateways on loopback ports, the openai SDK as the client, a
wire-level fake upstream."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.cache.semantic.adaptive import PartitionState
from thrifty.server.run import BackgroundServer

pytest.importorskip("onnxruntime")

SYSTEM = {"role": "system", "content": "You are the Acme support desk."}
FAQ = {
    "What are your opening hours?": "We are open 9 to 5, Monday to Friday.",
    "How do I return an item I bought?": "Send it back within 30 days with the receipt.",
    "Do you ship to other countries?": "Yes, we ship to 40 countries.",
    "How do I reset my password?": "Use the 'forgot password' link on the sign-in page.",
}


def _replica(tmp_path: Path, name: str, upstream: Any, pg_url: str) -> BackgroundServer:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    return BackgroundServer(
        base_settings(root, **_data(root, upstream, pg_url)), secrets={"up": UPSTREAM_KEY}
    )


def _data(root: Path, upstream: Any, pg_url: str) -> dict[str, Any]:
    return {
        "storage": {"url": pg_url, "spool_path": str(root / "spool.jsonl"), "local_path": str(root / "l.db")},
        "providers": {"up": {"kind": "openai", "base_url": upstream.base_url}},
        "models": openai_models(),
        "routes": {
            "support": {
                "model": "gpt-4o-mini",
                "semantic_cache": {
                    "ttl_s": 600,
                    "threshold": 0.5,
                    "min_entries": 0,
                    "verify": {"error_bound": 0.05, "min_rate": 1.0, "max_rate": 1.0},
                },
            }
        },
        "semantic": {"embed_threads": 1, "state_flush_s": 0},
        "resilience": {"max_retries": 0},
    }


def _ask(server: BackgroundServer, question: str) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": question}],  # type: ignore[list-item]
        temperature=0,
    )


def _until(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def _shared_row(pg_url: str) -> PartitionState | None:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT state FROM semantic_partition_state").fetchall()
    assert len(rows) <= 1
    if not rows:
        return None
    state = rows[0][0]
    return PartitionState.from_dict(state if isinstance(state, dict) else json.loads(state))


def _memory(server: BackgroundServer) -> PartitionState | None:
    states = server.gateway.semantic_cache.verifier.states()
    return states[0][1] if states else None


def test_replicas_share_what_verification_learned_and_a_restart_resumes_it(
    tmp_path: Path, openai_upstream: Any, pg_url: str
):
    with (
        _replica(tmp_path, "a", openai_upstream, pg_url) as a,
        _replica(tmp_path, "b", openai_upstream, pg_url) as b,
    ):
        for question, answer in FAQ.items():
            openai_upstream.queue(Reply(text=answer))
            assert _ask(a, question).headers["x-thrifty-cache"] == "miss"
        _until(lambda: b.gateway.semantic_cache.entries == len(FAQ), "b never followed a's entries")
        # On a: a paraphrase hit whose shadow call finds the cached answer wrong.
        openai_upstream.queue(Reply(text="We open at 8 on Saturdays too."))
        assert _ask(a, "When are you open?").headers["x-thrifty-cache"] == "semantic"
        _until(
            lambda: (r := _shared_row(pg_url)) is not None and r.verified_wrong == 1, "a's verdict not shared"
        )
        # b takes it in: its partition is off too (it never verified anything itself).
        _until(
            lambda: (m := _memory(b)) is not None and m.verified_wrong == 1, "b never read the shared state"
        )
        openai_upstream.queue(Reply(text="Something else entirely."))
        calls = len(openai_upstream.requests)
        miss = _ask(b, "How can I return something I purchased?")
        assert miss.headers["x-thrifty-cache"] == "miss"
        assert len(openai_upstream.requests) == calls + 1  # the miss's own call, no shadow call
        # That miss is a near miss, judged off the response path (its candidate's answer is a
        # round trip away): b's count joins a's in the one shared row.
        row = _until(
            lambda: (r := _shared_row(pg_url)) is not None and r.near_miss_checks == 1 and r,
            "b's near miss never reached the shared row",
        )
        assert (row.verifications, row.verified_wrong, row.paraphrase_hits, row.tenant_id) == (
            1,
            1,
            1,
            "acme",
        )
        assert sum(row.wrong) == 2
        _until(lambda: (m := _memory(a)) is not None and m.near_miss_checks == 1, "a never read b's count")
    # Shut down: the last sync wrote everything; a replica started afresh resumes it.
    with _replica(tmp_path, "c", openai_upstream, pg_url) as c:
        resumed = _memory(c)
        assert resumed is not None and (resumed.verified_wrong, resumed.near_miss_checks) == (1, 1)
        openai_upstream.queue(Reply(text="Yes, to 40 countries."))
        assert _ask(c, "Do you deliver internationally?").headers["x-thrifty-cache"] == "miss"
        assert _ask(c, "what are your opening hours").headers["x-thrifty-cache"] == "semantic"  # a repeat
    # `thrifty cache stats` reads what every replica merged into PostgreSQL, not a local file.
    import yaml
    from typer.testing import CliRunner

    from tests.conftest import KEYS as _KEYS
    from thrifty.cli import app
    from thrifty.stores.keys import hash_key

    config = tmp_path / "thrifty.yaml"
    data = {
        **_data(tmp_path / "c", openai_upstream, pg_url),
        "providers": {"up": {"kind": "openai", "base_url": "x"}},
    }
    data["tenants"] = {t: {"key_hashes": [hash_key(k)]} for t, k in _KEYS.items()}
    config.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["cache", "stats", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.output
    (part,) = [r for r in json.loads(out.output) if r["partition"] != "all"]
    assert (part["tenant_id"], part["verified_wrong"], part["verifications"]) == ("acme", 1, 1)
    other = CliRunner().invoke(
        app, ["cache", "stats", "--config", str(config), "--tenant", "globex", "--json"]
    )
    assert other.exit_code == 0 and json.loads(other.output) == []
    unknown = CliRunner().invoke(app, ["cache", "stats", "--config", str(config), "--route", "nope"])
    # (The CLI's entry point turns this error into one line and exit 2; CliRunner shows it raised.)
    assert "no route 'nope'" in str(unknown.exception)
    # `thrifty dashboard` over PostgreSQL shows the same rows; another tenant's key sees none.
    from tests.dashboard_helpers import get, serve_asgi
    from thrifty.server.dashboard.standalone import DashboardServer
    from thrifty.settings import load_settings

    with serve_asgi(DashboardServer(load_settings(config))) as url:
        assert get(url + "/dashboard/api/cache", _KEYS["acme"]).json()["partitions"] == json.loads(out.output)
        assert get(url + "/dashboard/api/cache", _KEYS["globex"]).json()["partitions"] == []


def _ask_as(server: BackgroundServer, question: str, tenant: str, wrong: str | None = None) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": question}],  # type: ignore[list-item]
        temperature=0,
        extra_headers={"x-thrifty-cache-wrong": wrong} if wrong else {},
    )


def _quiet_replica(tmp_path: Path, name: str, upstream: Any, pg_url: str) -> BackgroundServer:
    """A replica whose hits are never verified by shadow calls (feedback is the only verdict)."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    data = _data(root, upstream, pg_url)
    data["routes"]["support"]["semantic_cache"]["verify"] = {"min_rate": 0.0, "max_rate": 0.0000001}
    return BackgroundServer(base_settings(root, **data), secrets={"up": UPSTREAM_KEY})


def _acme_row(pg_url: str) -> PartitionState | None:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT state FROM semantic_partition_state WHERE tenant_id = 'acme'").fetchall()
    assert len(rows) <= 1
    if not rows:
        return None
    state = rows[0][0]
    return PartitionState.from_dict(state if isinstance(state, dict) else json.loads(state))


def _acme_memory(server: BackgroundServer) -> PartitionState | None:
    found = [s for _, s in server.gateway.semantic_cache.verifier.states() if s.tenant_id == "acme"]
    return found[0] if found else None


def _stored_hit(pg_url: str, request_id: str) -> tuple[Any, ...] | None:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        return conn.execute(
            "SELECT tenant_id, feedback FROM semantic_hits WHERE request_id = %s", (request_id,)
        ).fetchone()


def test_feedback_counts_once_on_any_replica_and_after_a_restart_for_its_own_tenant_only(
    tmp_path: Path, openai_upstream: Any, pg_url: str
):
    repeat = "What are your opening hours?"  # a repeat of a cached question: no upstream call
    with (
        _quiet_replica(tmp_path, "a", openai_upstream, pg_url) as a,
        _quiet_replica(tmp_path, "b", openai_upstream, pg_url) as b,
    ):
        for question, answer in FAQ.items():
            openai_upstream.queue(Reply(text=answer))
            assert _ask(a, question).headers["x-thrifty-cache"] == "miss"
        _until(lambda: b.gateway.semantic_cache.entries == len(FAQ), "b never followed a's entries")
        first, later = _ask(a, "When are you open?"), _ask(a, "Do you deliver internationally?")
        assert first.headers["x-thrifty-cache"] == later.headers["x-thrifty-cache"] == "semantic"
        rid, rid_later = first.headers["x-thrifty-request-id"], later.headers["x-thrifty-request-id"]
        _until(lambda: _stored_hit(pg_url, rid) == ("acme", 0), "a's hit never reached PostgreSQL")
        # globex names acme's request on b: not matched (globex's own lookup is a miss upstream).
        openai_upstream.queue(Reply(text="fresh"))
        _ask_as(b, repeat, "globex", wrong=rid)
        time.sleep(0.5)  # (feedback is looked up in the background: give it time to go wrong)
        assert _stored_hit(pg_url, rid) == ("acme", 0)
        # acme's feedback on b (a served the hit), then the same on a: counted once.
        _ask_as(b, repeat, "acme", wrong=rid)
        _until(lambda: _stored_hit(pg_url, rid) == ("acme", 1), "b never claimed the hit")
        _ask_as(a, repeat, "acme", wrong=rid)
        row = _until(
            lambda: (r := _acme_row(pg_url)) is not None and r.feedback == 1 and r,
            "the feedback never reached the shared row",
        )
        time.sleep(0.5)  # a's repeat would have been counted by now
        _until(lambda: (m := _acme_memory(a)) is not None and m.feedback == 1, "a never read b's count")
        row = _acme_row(pg_url)
        assert row is not None and (row.feedback, row.feedback_wrong, sum(row.wrong)) == (1, 1, 1)
    # Both shut down: a replica started afresh matches a's later hit, and still not the first again.
    with _quiet_replica(tmp_path, "c", openai_upstream, pg_url) as c:
        _ask_as(c, repeat, "acme", wrong=rid)
        _ask_as(c, repeat, "acme", wrong=rid_later)
        _until(lambda: _stored_hit(pg_url, rid_later) == ("acme", 1), "c never claimed the later hit")
    row = _acme_row(pg_url)
    assert row is not None and (row.feedback, row.feedback_wrong, sum(row.wrong)) == (2, 2, 2)
