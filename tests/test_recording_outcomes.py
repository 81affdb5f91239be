"""Recordings of requests that did not end in an answer now: failed (an upstream error, a budget
refusal) and deferred to a batch (its answer added when the batch ends); exported with their
outcome, and accounted for by `thrifty simulate`."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import httpx
import orjson

from tests.conftest import KEYS
from tests.fakes.openai_wire import Reply
from tests.test_batch import an, backend, make_gateway, oa  # noqa: F401 - the batch fakes and gateway
from thrifty.recording import read_recordings
from thrifty.settings import settings_from_mapping
from thrifty.simulate.engine import simulate
from thrifty.simulate.traffic import parse_line, read_traffic

RECORD = {"sample": 1.0, "redact": [{"preset": "email"}]}


def _post(http: httpx.Client, url: str, route: str, text: str) -> httpx.Response:
    body = {"model": f"route:{route}", "messages": [{"role": "user", "content": text}]}
    return http.post(url, json=body, headers={"authorization": f"Bearer {KEYS['acme']}"})


def test_failed_and_deferred_requests_are_recorded_with_their_outcome_and_replayed(
    make_gateway,  # noqa: F811
    oa,  # noqa: F811
    tmp_path: Path,
):
    server = make_gateway(
        routes={
            "support": {"model": "gpt-4o-mini", "record": RECORD},
            "capped": {"model": "gpt-4o-mini", "record": RECORD, "budget": {"tokens_per_day": 5}},
            "nightly": {"model": "gpt-4o-mini", "record": RECORD, "defer": {"max_batch": 1, "max_age_s": 60}},
        },
        resilience={"max_retries": 0},
    )
    url = server.base_url + "/chat/completions"
    oa.queue(Reply(), Reply(status=503, error_message="overloaded, write to ops@example.com"))
    with httpx.Client(timeout=10) as http:
        assert _post(http, url, "support", "first").status_code == 200
        assert _post(http, url, "support", "second").status_code == 503
        assert _post(http, url, "capped", "too big for the budget").status_code == 429
        deferred = _post(http, url, "nightly", "classify jane@example.com")
        assert deferred.status_code == 202, deferred.text
        poll = server.base_url.removesuffix("/v1") + deferred.json()["poll_url"]
        deadline = time.monotonic() + 15
        while (
            http.get(poll, headers={"authorization": f"Bearer {KEYS['acme']}"}).json()["status"]
            != "completed"
        ):
            assert time.monotonic() < deadline, "the deferred request's batch did not end"
            time.sleep(0.05)
    settings = server.app.gateway.settings
    deadline = time.monotonic() + 10
    while True:  # the batch answer reaches the recordings off the request path
        recs = {r.request["messages"][0]["content"]: r for r in read_recordings(settings, "acme")}
        nightly = recs.get("classify [redacted]")
        if (nightly is not None and nightly.response is not None) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert set(recs) == {"first", "second", "too big for the budget", "classify [redacted]"}
    assert recs["first"].outcome == "ok" and recs["first"].response is not None
    failed = recs["second"]
    assert failed.outcome == "error" and failed.response is None
    assert failed.error is not None and failed.error["status"] == 503
    assert "[redacted]" in failed.error["message"] and "ops@example.com" not in failed.error["message"]
    refused = recs["too big for the budget"]
    assert refused.outcome == "error" and refused.error is not None and refused.error["status"] == 429
    assert nightly is not None and nightly.outcome == "deferred" and nightly.model == "gpt-4o-mini"
    assert (
        nightly.response is not None and nightly.response["choices"][0]["message"]["content"] == Reply().text
    )

    # The export's lines carry the outcome; simulate replays the failures as failures ($0 each) and
    # answers the deferred one now in the baseline, at the batch price where the candidate defers.
    lines = [orjson.dumps(r.traffic_line()) for r in read_recordings(settings, "acme")]
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_bytes(b"\n".join(lines) + b"\n")
    read = read_traffic([traffic])
    assert not read.bad
    assert [line.outcome for line in read.lines] == ["ok", "error", "error", "deferred"]
    # Real-time gpt-4o-mini ($0.15 / $0.60 per million) for the fake's 42 in / 9 out; batch is half.
    answer = Decimal("0.0000117")
    (tmp_path / "none.jsonl").write_bytes(b"")  # every answer comes from the traffic itself
    candidate = settings_from_mapping(
        {
            "providers": {"p": {"kind": "replay", "data": [str(tmp_path / "none.jsonl")]}},
            "models": {"gpt-4o-mini": {"provider": "p", "upstream": "gpt-4o-mini"}},
            "routes": {
                "support": {"model": "gpt-4o-mini"},
                "capped": {"model": "gpt-4o-mini"},
                "nightly": {"model": "gpt-4o-mini", "defer": {"max_batch": 10, "max_age_s": 60}},
            },
        }
    )
    sim = simulate(candidate, read.lines, workers=1)
    report = sim.report
    assert (report.recorded_failures, report.recorded_failures_answered) == (2, 0)
    assert (report.recorded_deferred, report.recorded_deferred_unanswered) == (1, 0)
    assert report.unrecorded == 0 and report.failed == 0
    base = sim.runs[0].outcomes
    assert [o is not None and o.ok for o in base] == [True, False, False, True]
    assert all(o is not None and "failed when recorded" in (o.error or "") for o in base[1:3])
    assert report.baseline_cost == 2 * answer  # the failures cost nothing, as when recorded
    batch = next(layer for layer in report.layers if layer.key == "batch")
    assert batch.saving == answer / 2 and batch.detail == {"deferred_to_batch": 1}


def test_the_traffic_format_checks_outcomes():
    def parse(**row: object) -> str:
        try:
            parse_line(
                orjson.dumps({"ts": 1, "tenant": "t", "request": {"model": "m", "messages": [{}]}, **row}),
                "f:1",
            )
        except ValueError as err:
            return str(err)
        return "ok"

    assert parse(outcome="deferred") == "ok"
    assert parse(outcome="error", error={"type": "upstream_error", "status": 503, "message": "x"}) == "ok"
    assert "one of ok, deferred, error" in parse(outcome="failed")
    assert "needs its 'error'" in parse(outcome="error")
    assert "has no 'response'" in parse(
        outcome="error", error={"status": 500}, response={"choices": [{"message": {"content": "x"}}]}
    )
    assert "must be an object" in parse(outcome="error", error="boom")
