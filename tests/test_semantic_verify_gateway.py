"""Live verification of semantic hits through the real gateway: shadow calls off the response path,
their ledger entries and cost, thresholds moved by what they find, feedback, `thrifty cache stats`,
and tenant isolation. Real local embedding model, real SQLite file, the openai SDK as the client and
a wire-level fake upstream."""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import KEYS, UPSTREAM_KEY, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.cache.semantic.adaptive import PartitionState
from thrifty.server.run import BackgroundServer
from thrifty.settings import load_settings
from thrifty.stores.keys import hash_key

pytest.importorskip("onnxruntime")

SYSTEM = {"role": "system", "content": "You are the Acme support desk."}
FAQ = {
    "What are your opening hours?": "We are open 9 to 5, Monday to Friday.",
    "How do I return an item I bought?": "Send it back within 30 days with the receipt.",
    "Do you ship to other countries?": "Yes, we ship to 40 countries.",
    "How do I reset my password?": "Use the 'forgot password' link on the sign-in page.",
}
HOURS = FAQ["What are your opening hours?"]
PARAPHRASE = "When are you open?"
# gpt-4o-mini list price: 0.15 / 0.60 USD per million tokens; the fake reports 42 in, 9 out.
COST = (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6


def _config(tmp_path: Path, upstream: Any, **verify: Any) -> Path:
    """A settings file (the CLI reads the same one): every paraphrase hit verified unless told."""
    data = {
        "storage": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "providers": {"up": {"kind": "openai", "base_url": upstream.base_url}},
        "models": openai_models(),
        "tenants": {t: {"key_hashes": [hash_key(k)]} for t, k in KEYS.items()},
        "routes": {
            # A four-entry FAQ is far sparser than the built-in rule was tuned for: the route sets
            # its own floor and cut (as the other gateway tests do); verification starts from it.
            "support": {
                "model": "gpt-4o-mini",
                "semantic_cache": {
                    "ttl_s": 600,
                    "threshold": 0.5,
                    "min_entries": 0,
                    "verify": {"min_rate": 1.0, "max_rate": 1.0, **verify},
                },
            }
        },
        "semantic": {"embed_threads": 2, "state_flush_s": 0},
        "resilience": {"max_retries": 0},
    }
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _server(config: Path) -> BackgroundServer:
    return BackgroundServer(load_settings(config), secrets={"up": UPSTREAM_KEY})


def _ask(
    server: BackgroundServer, question: str, tenant: str = "acme", headers: dict[str, str] | None = None
):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": question}],
        temperature=0,
        extra_headers=headers or {},
    )


def _seed(server: BackgroundServer, upstream: Any, tenant: str = "acme") -> None:
    for question, answer in FAQ.items():
        upstream.queue(Reply(text=answer))
        assert _ask(server, question, tenant).headers["x-thrifty-cache"] == "miss"


def _rows(tmp_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _wait_for(tmp_path: Path, request_id: str, timeout: float = 15.0) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _rows(
            tmp_path, "SELECT attempts, cost_usd, cache, route FROM ledger WHERE request_id = ?", request_id
        )
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no ledger entry {request_id}")


def _states(tmp_path: Path, tenant: str | None = None) -> list[PartitionState]:
    sql = "SELECT state FROM semantic_partition_state"
    rows = _rows(tmp_path, sql + " WHERE tenant_id = ?", tenant) if tenant else _rows(tmp_path, sql)
    return [PartitionState.from_dict(json.loads(r[0])) for r in rows]


def _settle(tmp_path: Path, check: Any, timeout: float = 15.0) -> list[PartitionState]:
    """The partition states once ``check(states)`` holds (state rows are written as they change)."""
    deadline = time.monotonic() + timeout
    while True:
        states = _states(tmp_path)
        if check(states) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_a_slow_shadow_call_does_not_slow_the_hit_and_is_in_the_ledger_with_its_cost(
    tmp_path, openai_upstream
):
    with _server(_config(tmp_path, openai_upstream)) as server:
        _seed(server, openai_upstream)
        openai_upstream.queue(Reply(text=HOURS, delay_s=3.0))  # the shadow call's upstream is slow
        started = time.monotonic()
        resp = _ask(server, PARAPHRASE)
        elapsed = time.monotonic() - started
        assert resp.headers["x-thrifty-cache"] == "semantic"
        assert resp.parse().choices[0].message.content == HOURS
        rid = resp.headers["x-thrifty-request-id"]
        # The client had its answer while the upstream was still sleeping on the verification.
        assert not _rows(tmp_path, "SELECT 1 FROM ledger WHERE request_id = ?", rid + ".verify")
        assert elapsed < 3.0
        attempts, cost, cache, route = _wait_for(tmp_path, rid + ".verify")
    (attempt,) = json.loads(attempts)
    assert attempt["role"] == "verify" and attempt["model"] == "gpt-4o-mini"
    assert Decimal(cost) == COST and Decimal(attempt["cost_usd"]) == COST
    assert (cache, route) == ("miss", "support")
    (hit,) = _rows(tmp_path, "SELECT cost_usd, saved_usd, cache FROM ledger WHERE request_id = ?", rid)
    assert (Decimal(hit[0]), Decimal(hit[1]), hit[2]) == (0, COST, "semantic")
    (state,) = _states(tmp_path)
    assert (state.verifications, state.verified_wrong, state.verify_cost_usd) == (1, 0, COST)
    assert state.saved_usd - state.verify_cost_usd == 0  # one hit saved what its verification cost


def test_a_wrong_hit_found_by_verification_tightens_the_threshold_and_stores_the_right_answer(
    tmp_path, openai_upstream
):
    config = _config(tmp_path, openai_upstream)
    with _server(config) as server:
        _seed(server, openai_upstream)
        openai_upstream.queue(Reply(text="We open at 8 on Saturdays too."))  # the fresh answer differs
        resp = _ask(server, PARAPHRASE)
        assert resp.headers["x-thrifty-cache"] == "semantic"
        _wait_for(tmp_path, resp.headers["x-thrifty-request-id"] + ".verify")
        (state,) = _settle(tmp_path, lambda s: s and s[0].verified_wrong == 1)
        assert (state.verifications, state.verified_wrong) == (1, 1)
        assert sum(state.wrong) == 1
        # The fresh answer is now cached for that question: asked again, it is what is served.
        deadline = time.monotonic() + 10
        while True:
            again = _ask(server, PARAPHRASE)
            if again.parse().choices[0].message.content == "We open at 8 on Saturdays too.":
                break
            assert time.monotonic() < deadline, "the verified answer was never stored"
        assert again.headers["x-thrifty-cache"] == "semantic"
    out = CliRunner().invoke(_cli(), ["cache", "stats", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    (part,) = [r for r in rows if r["partition"] != "all"]
    assert part["verified_wrong"] == 1 and part["verifications"] >= 1
    assert Decimal(part["verify_cost_usd"]) == COST * part["verifications"]
    assert Decimal(part["net_saved_usd"]) == Decimal(part["saved_usd"]) - Decimal(part["verify_cost_usd"])
    assert part["precision"]["estimate"] < 1 and part["status"] in ("learning", "off")
    table = CliRunner(env={"COLUMNS": "220"}).invoke(
        _cli(), ["cache", "stats", "--config", str(config), "--route", "support"]
    )
    assert table.exit_code == 0 and "support" in table.output and "threshold" in table.output


def test_a_partition_that_cannot_meet_the_bound_stops_answering_paraphrases_but_serves_repeats(
    tmp_path, openai_upstream
):
    config = _config(tmp_path, openai_upstream, error_bound=0.05)
    paraphrases = [PARAPHRASE, "How can I return something I purchased?", "Do you deliver internationally?"]
    with _server(config) as server:
        _seed(server, openai_upstream)
        served = []
        for i, question in enumerate(paraphrases):  # every verification finds the cached answer wrong
            openai_upstream.queue(Reply(text=f"something else entirely {i}"))
            resp = _ask(server, question)
            served.append(resp.headers["x-thrifty-cache"])
            if served[-1] == "semantic":
                _wait_for(tmp_path, resp.headers["x-thrifty-request-id"] + ".verify")
                hits = served.count("semantic")
                _settle(tmp_path, lambda s: sum(x.verifications for x in s) == hits)  # noqa: B023
        # The first hit is verified wrong; paraphrases of other questions are no longer answered (and
        # their fresh answers, compared with the candidates they were not given, differ too).
        assert served == ["semantic", "miss", "miss"]
        (state,) = _settle(tmp_path, lambda s: s and s[0].near_miss_checks == 2)
        assert (state.verifications, state.verified_wrong, state.near_miss_checks) == (1, 1, 2)
        assert sum(state.wrong) == 3
        # A repeat of a cached question (up to case and punctuation) is still served.
        assert _ask(server, "what are your opening hours").headers["x-thrifty-cache"] == "semantic"
    out = CliRunner().invoke(_cli(), ["cache", "stats", "--config", str(config), "--json"])
    (part,) = [r for r in json.loads(out.output) if r["partition"] != "all"]
    assert part["status"] == "off" and part["threshold"] is None
    table = CliRunner(env={"COLUMNS": "220"}).invoke(_cli(), ["cache", "stats", "--config", str(config)])
    assert "paraphrases off" in table.output


def test_feedback_on_a_hit_counts_once_and_only_from_its_own_tenant(tmp_path, openai_upstream):
    config = _config(tmp_path, openai_upstream, min_rate=0.0, max_rate=0.0000001)  # no shadow calls
    with _server(config) as server:
        _seed(server, openai_upstream)
        _seed(server, openai_upstream, tenant="globex")
        hit = _ask(server, PARAPHRASE)
        assert hit.headers["x-thrifty-cache"] == "semantic"
        rid = hit.headers["x-thrifty-request-id"]
        openai_upstream.queue(Reply(text="fresh"), Reply(text="fresh"), Reply(text="fresh"))
        # Another tenant cannot mark acme's answer wrong, even knowing its request id.
        _ask(server, "Is there a phone number?", tenant="globex", headers={"x-thrifty-cache-wrong": rid})
        # The tenant itself can, on its next request; sending it again counts nothing more.
        _ask(server, "Is there a phone number?", headers={"x-thrifty-cache-wrong": rid})
        _ask(server, "Is there an email address?", headers={"x-thrifty-cache-wrong": rid})
        acme = _settle(tmp_path, lambda s: any(x.feedback for x in s))
    (acme_state,) = [s for s in acme if s.tenant_id == "acme"]
    (globex_state,) = [s for s in acme if s.tenant_id == "globex"]
    assert (acme_state.feedback, acme_state.feedback_wrong, sum(acme_state.wrong)) == (1, 1, 1)
    assert (globex_state.feedback, sum(globex_state.wrong)) == (0, 0)
    assert not _rows(tmp_path, "SELECT 1 FROM ledger WHERE request_id LIKE '%.verify'")


def test_verification_data_stays_with_its_tenant_in_the_stats_and_on_the_dashboard(tmp_path, openai_upstream):
    from tests.dashboard_helpers import ADMIN_KEY, get

    config = _config(tmp_path, openai_upstream)
    data = yaml.safe_load(config.read_text())
    data["dashboard"] = {"admin_key_hashes": [hash_key(ADMIN_KEY)]}
    config.write_text(yaml.safe_dump(data))
    with _server(config) as server:
        _seed(server, openai_upstream)
        _seed(server, openai_upstream, tenant="globex")
        openai_upstream.queue(Reply(text="a different answer"))
        resp = _ask(server, PARAPHRASE)  # acme's hit, found wrong
        _wait_for(tmp_path, resp.headers["x-thrifty-request-id"] + ".verify")
        openai_upstream.queue(Reply(text=HOURS))
        resp = _ask(server, PARAPHRASE, tenant="globex")  # globex's hit, found right
        _wait_for(tmp_path, resp.headers["x-thrifty-request-id"] + ".verify")
        states = _settle(tmp_path, lambda s: sum(x.verifications for x in s) == 2)
        # The dashboard shows the same rows as `thrifty cache stats`; a tenant's key its own only.
        url = server.base_url.removesuffix("/v1")
        mine = get(url + "/dashboard/api/cache", KEYS["globex"]).json()["partitions"]
        every = get(url + "/dashboard/api/cache", ADMIN_KEY).json()["partitions"]
        page = get(url + "/dashboard", KEYS["globex"]).text
        assert get(url + "/dashboard/api/page", KEYS["globex"]).json()["cache"]["partitions"] == mine
    by_tenant = {s.tenant_id: s for s in states}
    assert (by_tenant["acme"].verified_wrong, by_tenant["globex"].verified_wrong) == (1, 0)
    assert by_tenant["globex"].verifications == 1
    # The CLI shows a tenant its own partitions only.
    out = CliRunner().invoke(
        _cli(), ["cache", "stats", "--config", str(config), "--tenant", "globex", "--json"]
    )
    cli = json.loads(out.output)
    assert {r["tenant_id"] for r in cli} == {"globex"}
    assert mine == cli and len(mine) == 2  # the partition and the route's summary
    assert {r["tenant_id"] for r in every} == {"acme", "globex"}
    assert [r["verified_wrong"] for r in every if r["tenant_id"] == "acme"] == [1, 1]
    assert 'id="semantic-cache"' in page and "globex" in page and "acme" not in page
    # The verify entries are attributed to the tenant whose hit they checked.
    tenants = _rows(tmp_path, "SELECT tenant_id FROM ledger WHERE request_id LIKE '%.verify' ORDER BY ts")
    assert [t for (t,) in tenants] == ["acme", "globex"]
    # `thrifty dashboard` (no gateway running) shows the same rows, read from the stored states.
    from tests.dashboard_helpers import serve_asgi
    from thrifty.server.dashboard.standalone import DashboardServer

    with serve_asgi(DashboardServer(load_settings(config))) as url:
        assert get(url + "/dashboard/api/cache", KEYS["globex"]).json()["partitions"] == mine
        assert get(url + "/dashboard/api/cache", ADMIN_KEY).json()["partitions"] == every
        assert get(url + "/dashboard/api/page", KEYS["globex"]).json()["cache"]["partitions"] == mine
        alone = get(url + "/dashboard", KEYS["globex"]).text
    assert 'id="semantic-cache"' in alone and "globex" in alone and "acme" not in alone


def test_evidence_ids_are_checked_before_serving_without_an_upstream_call(tmp_path, openai_upstream):
    with _server(_config(tmp_path, openai_upstream, compare="evidence")) as server:
        for i, (question, answer) in enumerate(FAQ.items()):
            openai_upstream.queue(Reply(text=answer))
            _ask(server, question, headers={"x-thrifty-evidence": f"kb:{i}"})
        calls = len(openai_upstream.requests)
        same = _ask(server, PARAPHRASE, headers={"x-thrifty-evidence": "kb:0"})
        assert same.headers["x-thrifty-cache"] == "semantic"
        openai_upstream.queue(Reply(text="Saturday hours are 10 to 2."))
        other = _ask(server, PARAPHRASE, headers={"x-thrifty-evidence": "kb:weekend-hours"})
        assert other.headers["x-thrifty-cache"] == "miss"
        assert other.parse().choices[0].message.content == "Saturday hours are 10 to 2."
        assert len(openai_upstream.requests) == calls + 1  # only the miss went upstream
        (state,) = _settle(tmp_path, lambda s: s and s[0].verifications == 2)
    assert (state.verifications, state.verified_wrong, state.verify_cost_usd) == (2, 1, 0)


def _cli() -> Any:
    from thrifty.cli import app

    return app


def test_cache_wrong_feedback_through_the_feedback_endpoint_counts_as_a_failed_verification(
    tmp_path, openai_upstream
):
    config = _config(tmp_path, openai_upstream, min_rate=0.0, max_rate=0.0000001)  # no shadow calls
    with _server(config) as server:
        _seed(server, openai_upstream)
        hit = _ask(server, PARAPHRASE)
        assert hit.headers["x-thrifty-cache"] == "semantic"
        rid = hit.headers["x-thrifty-request-id"]

        def feedback(tenant: str) -> httpx.Response:
            return httpx.post(
                server.base_url + "/thrifty/feedback",
                json={"request_id": rid, "label": "cache_wrong"},
                headers={"authorization": f"Bearer {KEYS[tenant]}"},
                timeout=10,
            )

        assert feedback("globex").status_code == 404  # not globex's request: nothing counted
        assert feedback("acme").status_code == 200
        states = _settle(tmp_path, lambda s: any(x.feedback for x in s))
    (state,) = states
    assert (state.feedback, state.feedback_wrong, sum(state.wrong)) == (1, 1, 1)


def test_a_judge_route_compares_worded_anew_answers_and_its_cost_is_the_tenants(tmp_path, openai_upstream):
    from thrifty.cache.semantic.judge import parse_verdict

    config = _config(tmp_path, openai_upstream, compare="judge", judge_route="judge")
    data = yaml.safe_load(config.read_text())
    data["routes"]["judge"] = {"model": "gpt-4o-mini"}
    config.write_text(yaml.safe_dump(data))
    with _server(config) as server:
        _seed(server, openai_upstream)
        # Worded anew (text compare would call it wrong); the judge says it is the same answer.
        openai_upstream.queue(Reply(text="Weekdays, nine to five."), Reply(text="Yes."))
        first = _ask(server, PARAPHRASE).headers["x-thrifty-request-id"]
        judged = _wait_for(tmp_path, first + ".judge")
        asked = openai_upstream.requests[-1]
        assert asked["max_tokens"] == 5 and asked["temperature"] == 0
        prompt = asked["messages"][-1]["content"]
        assert PARAPHRASE in prompt and HOURS in prompt and "Weekdays, nine to five." in prompt
        # A reply that is neither yes nor no is no verdict.
        openai_upstream.queue(Reply(text=HOURS), Reply(text="Maybe, it depends."))
        second = _ask(server, "When do you open?")
        assert second.headers["x-thrifty-cache"] == "semantic"
        _wait_for(tmp_path, second.headers["x-thrifty-request-id"] + ".judge")
        # Worded the same but the judge says no: a wrong hit.
        openai_upstream.queue(Reply(text=HOURS), Reply(text="no"))
        third = _ask(server, "What time do you open?")
        assert third.headers["x-thrifty-cache"] == "semantic"
        _wait_for(tmp_path, third.headers["x-thrifty-request-id"] + ".judge")
        (state,) = _settle(tmp_path, lambda s: s and s[0].verify_cost_usd == 6 * COST)
    attempts, cost, cache, route = judged
    (attempt,) = json.loads(attempts)
    assert (attempt["role"], route, cache, Decimal(cost)) == ("judge", "judge", "miss", COST)
    tenants = _rows(tmp_path, "SELECT tenant_id FROM ledger WHERE request_id LIKE '%.judge'")
    assert tenants == [("acme",)] * 3
    assert (state.verifications, state.verified_wrong) == (2, 1)
    assert state.verify_cost_usd == 6 * COST  # three shadow calls and three judge calls
    assert [parse_verdict({"choices": [{"message": {"content": t}}]}) for t in ("YES!", "No.", "")] == [
        True,
        False,
        None,
    ]


@pytest.mark.parametrize(
    ("verify", "says"),
    [
        ({"compare": "judge"}, "needs verify.judge_route"),
        ({"compare": "judge", "judge_route": "nope"}, "unknown route 'nope'"),
        ({"compare": "judge", "judge_route": "support"}, "cannot judge its own cache"),
    ],
)
def test_a_judge_route_must_be_named_and_exist(tmp_path, openai_upstream, verify, says):
    from thrifty.errors import ConfigError

    config = _config(tmp_path, openai_upstream, **verify)
    with pytest.raises(ConfigError, match=says):
        load_settings(config)


def test_feedback_after_a_restart_is_counted_once_and_only_for_its_own_tenant(tmp_path, openai_upstream):
    """The hit records are in the SQLite file (``semantic_hits``), not only in memory."""
    config = _config(tmp_path, openai_upstream, min_rate=0.0, max_rate=0.0000001)  # no shadow calls
    with _server(config) as server:
        _seed(server, openai_upstream)
        hit = _ask(server, PARAPHRASE)
        assert hit.headers["x-thrifty-cache"] == "semantic"
        rid = hit.headers["x-thrifty-request-id"]
    ((tenant, route, score, judged),) = _rows(
        tmp_path, "SELECT tenant_id, route, score, feedback FROM semantic_hits WHERE request_id = ?", rid
    )
    assert (tenant, route, judged) == ("acme", "support", 0) and 0.5 <= score < 1
    repeat = "What are your opening hours?"  # served from the cache: no upstream call
    with _server(config) as server:
        # Another tenant naming acme's request id matches nothing (as an unknown id would).
        openai_upstream.queue(Reply(text="fresh"))
        _ask(server, repeat, tenant="globex", headers={"x-thrifty-cache-wrong": rid})
        _ask(server, repeat, tenant="globex", headers={"x-thrifty-cache-wrong": "no-such-request"})
        time.sleep(0.5)  # (the feedback is looked up in the background: give it time to go wrong)
        assert _rows(tmp_path, "SELECT feedback FROM semantic_hits WHERE request_id = ?", rid) == [(0,)]
        assert all(s.feedback == 0 for s in _states(tmp_path))
        assert _ask(server, repeat, headers={"x-thrifty-cache-wrong": rid}).headers["x-thrifty-cache"] == (
            "semantic"
        )
        states = _settle(tmp_path, lambda s: any(x.feedback for x in s))
        (state,) = [s for s in states if s.feedback]
        assert (state.tenant_id, state.feedback, state.feedback_wrong, sum(state.wrong)) == ("acme", 1, 1, 1)
        _ask(server, repeat, headers={"x-thrifty-cache-wrong": rid})  # sent again: counted already
        # (Shutting down waits for the feedback still being looked up, then writes the states.)
    with _server(config) as server:
        _ask(server, repeat, headers={"x-thrifty-cache-wrong": rid})  # and again after another restart
    states = _states(tmp_path)
    (acme,) = [s for s in states if s.tenant_id == "acme"]
    assert (acme.feedback, acme.feedback_wrong, sum(acme.wrong)) == (1, 1, 1)
    assert all(s.feedback == 0 for s in states if s.tenant_id != "acme")
    assert _rows(tmp_path, "SELECT feedback FROM semantic_hits WHERE request_id = ?", rid) == [(1,)]
