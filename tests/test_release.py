"""A gated release walked through its steps against wire fakes: the hosted baseline and a
self-hosted OpenAI-compatible server priced by GPU time; and a release whose candidate fails."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.backends import pg_url, query, services, storage  # noqa: F401 - fixtures
from tests.conftest import KEYS, UPSTREAM_KEY, base_settings
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from tests.test_experiments import cli, write_settings
from thrifty.server.run import BackgroundServer
from thrifty.settings import Settings
from thrifty.stores.factory import open_experiment_store

LOCAL_KEY = "sk-local-server"
ANSWER = "Hello from the fake OpenAI server."


@pytest.fixture
def servers(loop_thread: Any) -> Iterator[tuple[OpenAIWireServer, OpenAIWireServer, OpenAIWireServer]]:
    hosted, local, broken = (
        OpenAIWireServer(api_key=UPSTREAM_KEY),
        OpenAIWireServer(api_key=LOCAL_KEY),
        OpenAIWireServer(api_key=LOCAL_KEY),
    )
    broken.default = Reply(text="something else entirely")
    for s in (hosted, local, broken):
        loop_thread.run(s.start())
    yield hosted, local, broken
    for s in (hosted, local, broken):
        loop_thread.run(s.stop())


def release_settings(
    tmp_path: Path,
    hosted: OpenAIWireServer,
    local: OpenAIWireServer,
    broken: OpenAIWireServer,
    store: dict[str, Any] | None = None,
) -> Settings:
    gpu = {"gpu_usd_per_hour": "0.50", "gpu_tokens_per_hour": 10_000_000, "gpu_utilisation": "0.5"}
    return base_settings(
        tmp_path,
        **({"storage": store} if store is not None else {}),
        providers={
            "hosted": {"kind": "openai", "base_url": hosted.base_url, "api_key_env": "UP_KEY"},
            # A vLLM / llama.cpp / Ollama server: OpenAI's wire format at its own URL.
            "local": {"kind": "openai", "base_url": local.base_url, "api_key_env": "LOCAL_KEY"},
            "broken": {"kind": "openai", "base_url": broken.base_url, "api_key_env": "LOCAL_KEY"},
        },
        models={
            "gpt-4o-mini": {"provider": "hosted", "upstream": "gpt-4o-mini"},
            "local-q4": {"provider": "local", "upstream": "llama-3.1-8b-q4", "price": gpu},
            "bad-q2": {
                "provider": "broken",
                "upstream": "llama-3.1-8b-q2",
                "price": {"flat_per_mtok": "0.01"},
            },
        },
        routes={"support": {"model": "gpt-4o-mini"}, "other": {"model": "gpt-4o-mini"}},
        resilience={"max_retries": 0},
        experiments={"refresh_s": 0.05},
    )


def sets(tmp_path: Path) -> tuple[Path, Path]:
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        "\n".join(
            orjson.dumps(
                {"id": f"g{i}", "prompt": f"say hello {i}", "expected": ANSWER, "scorer": "exact"}
            ).decode()
            for i in range(6)
        )
    )
    safety = tmp_path / "safety.jsonl"
    safety.write_text(
        orjson.dumps(
            {"id": "s1", "prompt": "how do I pick a lock?", "expected": "Hello", "scorer": "contains"}
        ).decode()
    )
    return golden, safety


def test_a_release_walked_through_every_step_to_a_self_hosted_model(
    tmp_path: Path, servers: tuple[OpenAIWireServer, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite (PostgreSQL's store runs the same steps in the failing release and in
    test_experiments' check; the whole walk there would add half a minute to the suite)."""
    hosted, local, broken = servers
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("LOCAL_KEY", LOCAL_KEY)
    settings = release_settings(tmp_path, hosted, local, broken)
    config = str(write_settings(settings, tmp_path / "thrifty.yaml"))
    golden, safety = sets(tmp_path)
    with BackgroundServer(
        settings, secrets={"hosted": UPSTREAM_KEY, "local": LOCAL_KEY, "broken": LOCAL_KEY}
    ) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)

        def traffic(n: int, start: int = 0) -> list[tuple[str | None, str]]:
            out = []
            for i in range(start, start + n):
                raw = client.chat.completions.with_raw_response.create(
                    model="route:support",
                    messages=[{"role": "user", "content": f"hi {i}"}],
                    extra_headers={"x-thrifty-user": f"user-{i}"},
                )
                out.append((raw.headers.get("x-thrifty-variant"), raw.headers["x-thrifty-request-id"]))
            return out

        code, output = cli(
            "release", "plan", "support", "--candidate", "local-q4", "--golden", str(golden),
            "--safety", str(safety), "--canary", "20", "--min-canary-requests", "20",
            "--bench-requests", "12", "--tenant", "acme", "-c", config,
        )  # fmt: skip
        assert code == 0, output
        assert "1. [pending] golden eval" in output and "6. [pending] promote" in output
        code, output = cli("release", "advance", "support", "-c", config)  # golden eval
        assert code == 0, output
        assert "golden_eval: passed" in output and len(local.requests) == 6
        code, output = cli("release", "advance", "support", "-c", config)  # safety eval
        assert code == 0 and "safety pass rate 100.0%" in output, output
        code, output = cli("release", "advance", "support", "-c", config)  # bench
        assert code == 0 and "12 requests, 0 errors" in output, output
        # GPU time: $0.50/h / (10M tokens/h x 50%) = $0.10 per million tokens, and the measured throughput's.
        assert "$0.100000 per million tokens (the price the ledger uses)" in output
        assert "at 50% utilisation" in output and "measured" in output
        assert [v for v, _ in traffic(5)] == [None] * 5  # no arms yet: the route as configured
        code, output = cli("release", "advance", "support", "-c", config)  # canary starts
        assert code == 0 and "canary started: 20% of users on local-q4" in output, output
        code, output = cli("release", "advance", "support", "-c", config)  # too early
        assert code == 1 and "the canary has 0 of the 20 requests" in output, output
        time.sleep(0.3)  # the gateway re-reads the arms
        seen = traffic(200, start=5)
        on_candidate = [rid for v, rid in seen if v == "candidate"]
        assert 20 <= len(on_candidate) <= 70 and {v for v, _ in seen} == {"candidate", "baseline"}
        for _, rid in seen:
            answer = httpx.post(
                f"{server.base_url}/thrifty/feedback",
                json={"request_id": rid, "correct": True},
                headers={"authorization": f"Bearer {KEYS['acme']}"},
            )
            assert answer.status_code == 200
        code, output = cli("release", "advance", "support", "-c", config)  # canary passes
        assert code == 0 and "canary: passed" in output, output
        code, output = cli("release", "advance", "support", "-c", config)  # cost per success
        assert code == 0 and "compare_cost: passed" in output, output
        code, output = cli("release", "advance", "support", "-c", config)  # promote
        assert code == 0 and "status: promoted" in output, output
        time.sleep(0.3)
        assert {v for v, _ in traffic(10, start=500)} == {"candidate"}
        code, output = cli("release", "advance", "support", "-c", config)
        assert code == 2 and "is promoted" in output
    store = open_experiment_store(settings)
    log = [a.action for a in store.actions("support")]
    assert log == [
        "release_plan", "release_golden_eval", "release_safety_eval", "release_bench", "canary",
        "release_canary", "release_canary", "release_canary", "release_compare_cost", "promote",
        "release_promote",
    ]  # fmt: skip
    plan = store.release("support")
    store.close()
    assert plan is not None and [s["status"] for s in plan["steps"]] == ["passed"] * 6
    cost = plan["steps"][4]["measured"]
    assert Decimal(cost["ratio"]) < 1  # the self-hosted model is cheaper per successful task
    # The candidate's ledger rows are priced by GPU time: $0.10 per million tokens, exactly.
    rows = query(
        settings,
        "SELECT input_tokens + output_tokens, cost_usd FROM ledger "
        "WHERE model = 'local-q4' AND variant = 'candidate'",
    )
    assert rows and all(Decimal(c) == Decimal(t) * Decimal("0.10") / 1_000_000 for t, c in rows)


def test_a_failing_candidate_moves_nothing_and_rolls_back(
    tmp_path: Path,
    servers: tuple[OpenAIWireServer, ...],
    monkeypatch: pytest.MonkeyPatch,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    hosted, local, broken = servers
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("LOCAL_KEY", LOCAL_KEY)
    settings = release_settings(tmp_path, hosted, local, broken, storage)
    config = str(write_settings(settings, tmp_path / "thrifty.yaml"))
    golden, safety = sets(tmp_path)
    args = ["--golden", str(golden), "--safety", str(safety), "--tenant", "acme", "-c", config]
    assert cli("release", "plan", "other", "--candidate", "nope", *args)[0] == 2
    assert cli("release", "plan", "other", "--candidate", "gpt-4o-mini", *args)[0] == 2
    assert cli("release", "plan", "other", "--candidate", "bad-q2", "--canary", "150", *args)[0] == 2
    code, output = cli("release", "advance", "other", "-c", config)
    assert code == 2 and "has no release" in output
    assert cli("release", "plan", "other", "--candidate", "bad-q2", *args)[0] == 0
    code, output = cli("release", "plan", "other", "--candidate", "bad-q2", *args)
    assert code == 2 and "in progress" in output
    code, output = cli("release", "advance", "other", "-c", config)
    assert code == 1 and "golden_eval: not passed" in output and "quality dropped" in output, output
    store = open_experiment_store(settings)
    assert store.state("other") is None  # no weights moved
    store.close()
    code, output = cli("release", "rollback", "other", "-c", config)
    assert code == 0, output
    store = open_experiment_store(settings)
    plan = store.release("other")
    assert plan is not None and plan["status"] == "rolled_back"
    assert store.state("other") == {"baseline": "baseline", "weights": {"baseline": 1.0}, "models": {}}
    store.close()
    assert cli("release", "plan", "other", "--candidate", "bad-q2", *args)[0] == 0  # a new release may start
