"""A router trained on other models than the built-in benchmark's, run by the real gateway; and
the drift watch on a trained route's escalation rate."""

from __future__ import annotations

import dataclasses
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows
from tests.factories import ledger_entry
from tests.fakes.openai_wire import Reply
from tests.test_route_pool import BIG, MID, SMALL, TINY, _pool_row, _reply, third_row
from thrifty.alerts.service import AlertService
from thrifty.errors import ConfigError
from thrifty.routing.train.fit import train
from thrifty.server.run import BackgroundServer
from thrifty.settings import AlertSettings
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database

# This gateway's aliases for the pool's models, served by one OpenAI-compatible endpoint.
ALIASES = {TINY: "local-tiny", SMALL: "groq-small", BIG: "big"}
UPSTREAMS = {
    "local-tiny": "tiny-upstream",
    "groq-small": "small-upstream",
    "big": "big-upstream",
    "mid": "mid-upstream",
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("router") / "pool.json"
    train([_pool_row(i) for i in range(150)], reference=BIG, folds=3, bootstrap=5).save(path)
    return path


def _settings(tmp_path: Path, upstream: Any, artifact: Path, models: dict[str, str], **extra: Any) -> Any:
    return base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models={
            alias: {"provider": "up", "upstream": up, "price": {"flat_per_mtok": "1"}}
            for alias, up in UPSTREAMS.items()
        },
        routes={
            "sums": {
                "model": "local-tiny",
                "strategy": "cascade",
                "router": {"path": str(artifact), "task": "sums", "models": models},
            }
        },
        resilience={"max_retries": 0},
        **extra,
    )


def _ask(server: BackgroundServer) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    messages = [{"role": "user", "content": "What is the sum?"}]
    return client.chat.completions.with_raw_response.create(model="route:sums", messages=messages)


def test_a_router_for_other_models_is_loaded_and_run_by_the_gateway(tmp_path, openai_upstream, artifact):
    with BackgroundServer(
        _settings(tmp_path, openai_upstream, artifact, ALIASES), secrets={"up": UPSTREAM_KEY}
    ) as s:
        # A confident tiny draft is trusted alone: one call.
        openai_upstream.by_model["tiny-upstream"] = [Reply(text=_reply("3", True))]
        resp = _ask(s)
        assert resp.headers["x-thrifty-model"] == "local-tiny"
        assert [r["model"] for r in openai_upstream.requests] == ["tiny-upstream"]
        # A hedging draft is not: small votes, disagrees, and big answers.
        openai_upstream.requests.clear()
        openai_upstream.by_model["tiny-upstream"] = [Reply(text=_reply("103", False))]
        openai_upstream.by_model["small-upstream"] = [Reply(text=_reply("203", False))]
        openai_upstream.by_model["big-upstream"] = [Reply(text=_reply("3", True))]
        resp = _ask(s)
        assert resp.headers["x-thrifty-model"] == "big"
        assert [r["model"] for r in openai_upstream.requests] == [
            "tiny-upstream",
            "small-upstream",
            "big-upstream",
        ]
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [r["escalated"] for r in rows] == [0, 1]
    assert [a["model"] for a in json.loads(rows[1]["attempts"])] == ["local-tiny", "groq-small", "big"]


def test_a_third_opinion_is_asked_through_the_gateway_and_every_call_is_priced(tmp_path, openai_upstream):
    artifact = tmp_path / "third.json"
    rows = [third_row(i) for i in range(150)]
    train(rows, reference=BIG, ladder=(TINY, SMALL), folds=3, bootstrap=5).save(artifact)
    aliases = {**ALIASES, MID: "mid"}
    with BackgroundServer(
        _settings(tmp_path, openai_upstream, artifact, aliases), secrets={"up": UPSTREAM_KEY}
    ) as s:
        # tiny and small agree, sure of themselves; mid agrees too: tiny's draft is returned.
        openai_upstream.by_model["tiny-upstream"] = [Reply(text=_reply("3", True))] * 2
        openai_upstream.by_model["small-upstream"] = [Reply(text=_reply("3", True))] * 2
        openai_upstream.by_model["mid-upstream"] = [
            Reply(text=_reply("3", True)),
            Reply(text=_reply("4", True)),
        ]
        openai_upstream.by_model["big-upstream"] = [Reply(text=_reply("4", True))]
        assert _ask(s).headers["x-thrifty-model"] == "local-tiny"
        # The same pair again, but mid dissents: big answers.
        assert _ask(s).headers["x-thrifty-model"] == "big"
    assert [r["model"] for r in openai_upstream.requests] == [
        *("tiny-upstream", "small-upstream", "mid-upstream"),
        *("tiny-upstream", "small-upstream", "mid-upstream", "big-upstream"),
    ]
    first, second = ledger_rows(tmp_path / "ledger.db")
    assert (first["escalated"], second["escalated"]) == (0, 1)
    for row, models in (
        (first, ["local-tiny", "groq-small", "mid"]),
        (second, ["local-tiny", "groq-small", "mid", "big"]),
    ):
        attempts = json.loads(row["attempts"])
        assert [a["model"] for a in attempts] == models
        # Every call is paid: the entry's cost is the sum of its attempts', each priced.
        assert all(Decimal(a["cost_usd"]) > 0 for a in attempts)
        assert Decimal(row["cost_usd"]) == sum(Decimal(a["cost_usd"]) for a in attempts)
    assert "tiny-1b, small-8b and mid-30b agree" in json.loads(first["attempts"])[0]["gate"]


def test_the_gateway_refuses_to_start_when_a_router_model_has_no_alias(tmp_path, openai_upstream, artifact):
    partial = {TINY: "local-tiny", BIG: "big"}
    with pytest.raises(ConfigError, match=r"small-8b.*map them in routes\.sums\.router\.models"):
        BackgroundServer(
            _settings(tmp_path, openai_upstream, artifact, partial), secrets={"up": UPSTREAM_KEY}
        )


def test_the_gateway_watches_a_trained_route_for_drift(tmp_path, openai_upstream, artifact):
    # Calibrated: 30% of prompts escalate. Live: every draft hedges and the voter disagrees.
    alerts = {"anomaly_check_s": 0.1, "escalation_drift_min_requests": 3}
    settings = _settings(tmp_path, openai_upstream, artifact, ALIASES, alerts=alerts)
    openai_upstream.by_model["tiny-upstream"] = [Reply(text=_reply(str(100 + i), False)) for i in range(3)]
    openai_upstream.by_model["small-upstream"] = [Reply(text=_reply(str(200 + i), False)) for i in range(3)]
    openai_upstream.by_model["big-upstream"] = [Reply(text=_reply("3", True)) for _ in range(3)]
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as s:
        for _ in range(3):
            assert _ask(s).headers["x-thrifty-model"] == "big"
        db = open_database(tmp_path / "ledger.db")
        deadline = time.monotonic() + 5
        found: list[Any] = []
        while not found and time.monotonic() < deadline:
            time.sleep(0.1)
            found = db.execute("SELECT scope, message FROM alerts WHERE kind = 'escalation_drift'").fetchall()
    (scope, message), *more = found
    assert not more and scope == "route:sums"
    assert "escalated 100.0% of 3 requests, more than the 30.0%" in message


def _routed(i: int, ts: float, escalated: bool) -> tuple[Any, ...]:
    entry = dataclasses.replace(ledger_entry(f"req_{i:08d}", ts=ts), route="sums", escalated=escalated)
    return entry_row(entry)


def test_drift_alert_fires_once_per_window(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "l.db")
    settings = AlertSettings(
        escalation_drift_margin=0.15, escalation_drift_window_s=3600, escalation_drift_min_requests=20
    )
    service = AlertService(settings, conn, {"sums": 0.30})
    window = 3600.0
    now = (time.time() // window) * window + 1800  # mid-window
    # 40 requests in the last hour, 14 escalated: 35%, within 15 points of the calibrated 30%.
    conn.executemany(INSERT_ENTRY_SQL, [_routed(i, now - 60, i < 14) for i in range(40)])
    assert service.drift(now) == []
    # 30 more, all escalated: 44 of 70 = 62.9%, far above 30%.
    conn.executemany(INSERT_ENTRY_SQL, [_routed(100 + i, now - 30, True) for i in range(30)])
    (alert,) = service.drift(now)
    assert alert.kind == "escalation_drift" and alert.scope == "route:sums"
    assert "62.9% of 70 requests, more than the 30.0%" in alert.message
    assert service.fire([alert]) == 1
    # Later in the same window: the same alert, not fired again.
    assert service.fire(service.drift(now + 600)) == 0
    # The next window, still drifting: it fires once more.
    conn.executemany(INSERT_ENTRY_SQL, [_routed(200 + i, now + 3600, True) for i in range(30)])
    assert service.fire(service.drift(now + 3700)) == 1
    assert conn.execute("SELECT COUNT(*) FROM alerts WHERE kind = 'escalation_drift'").fetchone()[0] == 2
    # Too few requests in a window say nothing; a route without a calibrated rate is not watched.
    few = open_database(tmp_path / "q.db")
    few.executemany(INSERT_ENTRY_SQL, [_routed(i, now - 60, True) for i in range(19)])
    assert AlertService(settings, few, {"sums": 0.30}).drift(now) == []
    few.executemany(INSERT_ENTRY_SQL, [_routed(50 + i, now - 60, True) for i in range(5)])
    assert AlertService(settings, few, {"other": 0.30}).drift(now) == []
    assert len(AlertService(settings, few, {"sums": 0.30}).drift(now)) == 1


def test_a_vote_cascade_artifact_is_run_by_the_gateway_and_every_vote_is_priced(
    tmp_path, openai_upstream, artifact
):
    obj = json.loads(artifact.read_text())
    obj["votes"] = {"sums": {"cheap": [TINY, SMALL, MID], "min_votes": 2, "max_dissent": 1, "strong": BIG}}
    voted = tmp_path / "votes.json"
    voted.write_text(json.dumps(obj))
    aliases = {**ALIASES, MID: "mid"}
    with BackgroundServer(
        _settings(tmp_path, openai_upstream, voted, aliases), secrets={"up": UPSTREAM_KEY}
    ) as s:
        # tiny and small agree: two calls, tiny's draft returned.
        openai_upstream.by_model["tiny-upstream"] = [
            Reply(text=_reply("3", True)),
            Reply(text=_reply("3", True)),
        ]
        openai_upstream.by_model["small-upstream"] = [
            Reply(text=_reply("3", True)),
            Reply(text=_reply("4", True)),
        ]
        openai_upstream.by_model["mid-upstream"] = [Reply(text=_reply("4", True))]
        assert _ask(s).headers["x-thrifty-model"] == "local-tiny"
        # They disagree: mid is asked and sides with small, whose draft is returned; big is never called.
        assert _ask(s).headers["x-thrifty-model"] == "groq-small"
    assert [r["model"] for r in openai_upstream.requests] == [
        *("tiny-upstream", "small-upstream"),
        *("tiny-upstream", "small-upstream", "mid-upstream"),
    ]
    first, second = ledger_rows(tmp_path / "ledger.db")
    assert (first["escalated"], second["escalated"]) == (0, 0)
    attempts = json.loads(second["attempts"])
    assert [a["model"] for a in attempts] == ["local-tiny", "groq-small", "mid"]
    assert [a["role"] for a in attempts] == ["draft", "answer", "draft"]
    assert all(Decimal(a["cost_usd"]) > 0 for a in attempts)
    assert Decimal(second["cost_usd"]) == sum(Decimal(a["cost_usd"]) for a in attempts)
    assert "2 agree" in attempts[1]["gate"]
