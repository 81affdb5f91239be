"""Recording: per route, opt-in, sampled, redacted before anything is written, per tenant; exported
as traffic JSONL that `thrifty simulate` reads."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.recording import read_recordings
from thrifty.server.run import BackgroundServer
from thrifty.simulate.traffic import read_traffic
from thrifty.stores.keys import hash_key

ANSWER = Reply(text="Mail jane@example.com about 1234-5678, Jane.")
REDACT = [
    {"preset": "email"},
    {"regex": r"\b\d{4}-\d{4}\b", "replace": "[account]"},
    {"field": "user"},
    {"field": "metadata.customer"},
    {"field": "messages.*.name"},
]


def _settings(tmp_path: Path, upstream: OpenAIWireServer) -> dict[str, Any]:
    return {
        "storage": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "providers": {"up": {"kind": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY"}},
        "models": openai_models(),
        "routes": {
            "support": {"model": "gpt-4o-mini", "record": {"sample": 1.0, "redact": REDACT}},
            "private": {"model": "gpt-4o-mini"},
            "never": {"model": "gpt-4o-mini", "record": {"sample": 0.0}},
        },
        "tenants": {t: {"key_hashes": [hash_key(k)]} for t, k in KEYS.items()},
        "resilience": {"max_retries": 0},
    }


def _client(server: BackgroundServer, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)


def test_recordings_are_redacted_before_they_are_written_and_kept_per_tenant(
    tmp_path: Path, openai_upstream: OpenAIWireServer
):
    openai_upstream.default = ANSWER
    settings = base_settings(
        tmp_path,
        **{k: v for k, v in _settings(tmp_path, openai_upstream).items() if k not in ("storage", "tenants")},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        acme, globex = _client(server, "acme"), _client(server, "globex")
        acme.chat.completions.create(
            model="route:support",
            messages=[
                {"role": "system", "content": "You help customers."},
                {"role": "user", "name": "jane", "content": "I am jane@example.com, account 1234-5678"},
            ],
            user="jane-42",
            metadata={"customer": "Jane Doe", "ticket": "T-9"},
            store=True,
            extra_headers={
                "x-thrifty-feature": "faq",
                "x-thrifty-prompt-version": "v2",
                "Idempotency-Key": "k-1",
            },
        )
        stream = acme.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream jane@example.com"}],
            stream=True,
            extra_headers={"x-thrifty-route": "support"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        globex.chat.completions.create(model="route:support", messages=[{"role": "user", "content": "hi"}])
        acme.chat.completions.create(model="route:private", messages=[{"role": "user", "content": "x@y.io"}])
        acme.chat.completions.create(model="route:never", messages=[{"role": "user", "content": "x@y.io"}])
    # Nothing unredacted reached the recordings table, in any column. (The idempotency store keeps
    # the keyed request's answer as it was, to answer its repeats: that is not a recording.)
    conn = sqlite3.connect(tmp_path / "ledger.db")
    stored = repr(conn.execute("SELECT * FROM recordings").fetchall())
    for secret in ("jane@example.com", "1234-5678", "Jane Doe", "jane-42", "'jane'"):
        assert secret not in stored
    acme_recs = list(read_recordings(settings, "acme"))
    assert [r.route for r in acme_recs] == ["support", "support"]  # not `private`, not `never`
    first = acme_recs[0]
    user_turn = first.request["messages"][1]
    assert user_turn == {"role": "user", "content": "I am [redacted], account [account]"}  # name dropped
    assert "user" not in first.request and first.user is None
    assert first.request["metadata"] == {"ticket": "T-9"}
    assert first.response["choices"][0]["message"]["content"] == "Mail [redacted] about [account], Jane."
    assert (first.feature, first.prompt_version, first.idempotency_key) == ("faq", "v2", "k-1")
    assert first.model == "gpt-4o-mini" and first.cache == "miss"
    streamed = acme_recs[1]
    assert streamed.request["messages"][0]["content"] == "stream [redacted]"
    assert streamed.response["choices"][0]["message"]["content"] == "Mail [redacted] about [account], Jane."
    (g,) = read_recordings(settings, "globex")
    assert g.tenant_id == "globex" and g.request["messages"] == [{"role": "user", "content": "hi"}]
    assert conn.execute("SELECT count(*) FROM recordings").fetchone() == (3,)
    assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (5,)  # the ledger has every request


def test_export_writes_traffic_that_simulate_reads(tmp_path: Path, openai_upstream: OpenAIWireServer):
    config = _settings(tmp_path, openai_upstream)
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = base_settings(tmp_path, **{k: v for k, v in config.items() if k not in ("storage", "tenants")})
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        acme = _client(server, "acme")
        for question in ("one", "two", "one"):
            acme.chat.completions.create(
                model="route:support", messages=[{"role": "user", "content": question}], temperature=0
            )
        _client(server, "globex").chat.completions.create(
            model="route:support", messages=[{"role": "user", "content": "globex only"}]
        )
    out = tmp_path / "acme.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "recordings",
            "export",
            "--tenant",
            "acme",
            "-c",
            str(path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "UP_KEY": UPSTREAM_KEY},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "3 recordings of tenant acme" in run.stderr
    read = read_traffic([out])
    assert not read.bad and [line.body()["messages"][0]["content"] for line in read.lines] == [
        "one",
        "two",
        "one",
    ]
    assert all(line.tenant == "acme" and line.route == "support" and line.response for line in read.lines)
    assert b"globex only" not in out.read_bytes()
    # The export replays: a candidate with an exact cache on the route saves the repeat of "one".
    candidate = tmp_path / "candidate.yaml"
    config["routes"]["support"]["cache"] = {"ttl_s": 600}
    candidate.write_text(yaml.safe_dump(config))
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "simulate",
            "--traffic",
            str(out),
            "--settings",
            str(candidate),
            "--format",
            "json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    report = json.loads(sim.stdout)
    exact = next(layer for layer in report["layers"] if layer["layer"] == "exact_cache")
    assert exact["detail"] == {"hits": 1} and exact["requests_affected"] == 1
    # gpt-4o-mini at $0.15 / $0.60 per million: 42 in + 9 out as the fake upstream billed it.
    assert Decimal(report["baseline_cost_usd"]) == 3 * Decimal("0.0000117")
    assert Decimal(exact["saving_usd"]) == Decimal("0.0000117")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"regex": "("}, "does not compile"),
        ({"regex": "a", "field": "user"}, "exactly one of"),
        ({}, "exactly one of"),
        ({"preset": "ssn"}, "preset"),
    ],
)
def test_bad_redact_rules_are_refused_at_start(tmp_path: Path, rule: dict[str, Any], message: str):
    from thrifty.errors import ConfigError
    from thrifty.settings import load_settings

    config = {
        "providers": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9"}},
        "models": {"m": {"provider": "up"}},
        "routes": {"r": {"model": "m", "record": {"redact": [rule]}}},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_recordings_on_postgresql_are_shared_redacted_and_per_tenant(
    tmp_path: Path, openai_upstream: OpenAIWireServer, pg_url: str
):
    config = _settings(tmp_path, openai_upstream)
    config["storage"] = {
        "url": pg_url,
        "local_path": str(tmp_path / "local.db"),
        "spool_path": str(tmp_path / "spool.jsonl"),
    }
    from thrifty.settings import settings_from_mapping

    settings = settings_from_mapping(config)
    openai_upstream.default = ANSWER
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        for tenant in ("acme", "globex"):
            _client(server, tenant).chat.completions.create(
                model="route:support", messages=[{"role": "user", "content": f"{tenant}: me@corp.example"}]
            )
    (acme,) = read_recordings(settings, "acme")
    assert acme.request["messages"] == [{"role": "user", "content": "acme: [redacted]"}]
    assert acme.response["choices"][0]["message"]["content"] == "Mail [redacted] about [account], Jane."
    assert [r.tenant_id for r in read_recordings(settings, "globex")] == ["globex"]
    import psycopg

    with psycopg.connect(pg_url) as conn:  # in PostgreSQL, where every replica writes and reads
        assert conn.execute("SELECT count(*) FROM recordings").fetchone() == (2,)
