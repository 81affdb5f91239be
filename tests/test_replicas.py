"""Three real `thrifty serve` replicas on one Redis and one PostgreSQL: one set of guarantees.

Budgets, rate limits, alerts and exact-cache entries hold across the replicas; the ledger in
PostgreSQL has every 200 exactly once, also when a replica is SIGKILLed under load; a Redis
that goes away is handled as the settings say (both fault modes, by stopping the real server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, LoopThread, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from tests.services import ServiceDir
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key

# "word " * 999 is 1007 prompt tokens with OpenAI's chat framing; gpt-4o-mini: $0.15 / $0.60 per 1M.
PROMPT = [{"role": "user", "content": "word " * 999}]
PROMPT_TOKENS = 1007
COST = (PROMPT_TOKENS * Decimal("0.15") + 500 * Decimal("0.6")) / 10**6  # worst case = actual: 0.00045105
BUDGET = Decimal("0.01")  # room for exactly 22 requests
REPLICA_KEYS = {
    "acme": KEYS["acme"],
    "globex": KEYS["globex"],
    "initech": "thr-test-key-initech-0003",
    "hooli": "thr-test-key-hooli-0004",
    "umbrella": "thr-test-key-umbrella-0005",
}
# A chat whose history is summarised once it passes 300 tokens (each message below is 54 tokens).
SUMMARISED = {"history": {"budget": 300, "over": "compact", "summary_route": "cheap", "summary_tokens": 40}}
LEASE_S = 3.0  # idempotency lease in the cluster: longer than any generation below but the killed one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    urls: list[str]
    configs: list[Path]
    procs: list[subprocess.Popen[bytes]]
    pg_url: str
    upstream: OpenAIWireServer

    def post(
        self,
        i: int,
        tenant: str,
        body: dict[str, Any],
        timeout: float = 30,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {REPLICA_KEYS[tenant]}"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        return httpx.post(
            f"{self.urls[i % len(self.urls)]}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=timeout,
        )

    def ledger(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return list(conn.execute(sql, params))


def _start(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "thrifty", "serve", "--config", str(config), "--port", str(port)],
        env={**os.environ, "UP_KEY": UPSTREAM_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"replica did not start: {proc.stdout.read() if proc.stdout else b''!r}")


@pytest.fixture(scope="module")
def cluster(
    services: ServiceDir, loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    import psycopg

    db = f"r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    pg_url = services.postgres_url.rsplit("/", 1)[0] + "/" + db
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=0.05)
    loop_thread.run(upstream.start())
    root = tmp_path_factory.mktemp("replicas")
    prefix = f"r{uuid.uuid4().hex[:8]}:"
    configs, procs, urls = [], [], []
    for i in range(3):
        config = {
            "storage": {
                "url": pg_url,
                "spool_path": str(root / f"spool-{i}.jsonl"),
                "local_path": str(root / f"local-{i}.db"),
                "key_refresh_s": 0.3,
            },
            "shared_state": {"url": services.redis_url, "prefix": prefix},
            "providers": {"up": {"kind": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY"}},
            "models": {
                "gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"},
                "selfhosted": openai_models()["selfhosted"],
            },
            "routes": {
                "faq": {"model": "gpt-4o-mini", "cache": {"ttl_s": 600}},
                "agent": {"model": "gpt-4o-mini", "max_steps_per_session": 3},
                "coal": {"model": "gpt-4o-mini", "coalesce": True},
                "chat": {"model": "gpt-4o-mini", "context": SUMMARISED},
                "cheap": {"model": "selfhosted"},
            },
            "resilience": {"max_retries": 0},
            "idempotency": {"lease_s": LEASE_S},
            "tenants": {
                "acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": str(BUDGET)}},
                "globex": {
                    "key_hashes": [hash_key(KEYS["globex"])],
                    "rate_limit": {"requests_per_minute": 10},
                },
                "initech": {},  # its key is created with `thrifty keys create`, in PostgreSQL
                "hooli": {"key_hashes": [hash_key(REPLICA_KEYS["hooli"])]},
                "umbrella": {"key_hashes": [hash_key(REPLICA_KEYS["umbrella"])]},
            },
        }
        path = root / f"replica-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        port = _free_port()
        configs.append(path)
        urls.append(f"http://127.0.0.1:{port}")
        procs.append(_start(path, port))
    for url, proc in zip(urls, procs, strict=True):
        _wait_healthy(url, proc)
    yield Cluster(urls, configs, procs, pg_url, upstream)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    loop_thread.run(upstream.stop())
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_64_concurrent_requests_over_3_replicas_never_overspend_one_budget(cluster: Cluster):
    body = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 500}
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda i: cluster.post(i, "acme", body), range(64)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}
    assert statuses.count(200) == 22, "each request costs its worst case: exactly 22 fit in the budget"
    refusal = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refusal["code"] == "budget_exceeded" and "tenant 'acme' daily usd budget" in refusal["message"]
    # Every replica answered some of them, and the ledger in PostgreSQL holds the exact spend.
    assert all(any(r.status_code == 200 for r in responses[i::3]) for i in range(3))
    ((spent, rows),) = cluster.ledger(
        "SELECT sum(cost_usd), count(*) FROM ledger WHERE tenant_id = 'acme' AND http_status = 200"
    )
    assert rows == 22 and spent == 22 * COST <= BUDGET + COST


def test_budget_alerts_fire_once_across_replicas_and_thrifty_alerts_reads_postgres(cluster: Cluster):
    # After the budget test: acme is past 50% and 80% of its daily budget; three replicas saw it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kinds = cluster.ledger("SELECT alert_key FROM alerts WHERE scope LIKE %s", "%acme%")
        if len(kinds) >= 2:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # any late duplicate would have landed by now
    keys = [k for (k,) in cluster.ledger("SELECT alert_key FROM alerts WHERE scope LIKE %s", "%acme%")]
    assert len(keys) == len(set(keys)) == 2, keys
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "alerts", "-c", str(cluster.configs[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("budget_threshold" in line and "'acme'" in line for line in lines)
    # Whichever replica stored it first wrote the amount it saw then: 18 to 22 requests' worth.
    assert re.search(r"has used 80% of its daily usd budget \(\$0\.00[89]\d* of \$0\.01\)", out.stdout)


def test_rate_limit_over_3_replicas_admits_no_more_than_the_limit(cluster: Cluster):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(lambda i: cluster.post(i, "globex", body), range(30)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    limited = next(r for r in responses if r.status_code == 429)
    assert (
        limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
    )


def test_an_agent_session_gets_its_step_limit_once_across_replicas(cluster: Cluster):
    body = {"model": "route:agent", "messages": [{"role": "user", "content": "step"}], "max_tokens": 5}

    def step(i: int) -> int:
        resp = httpx.post(
            f"{cluster.urls[i % 3]}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {REPLICA_KEYS['hooli']}", "x-thrifty-session": "run-7"},
            timeout=30,
        )
        return resp.status_code

    statuses = [step(i) for i in range(9)]
    assert statuses == [200, 200, 200] + [429] * 6


def test_a_key_created_with_the_cli_works_on_every_replica_and_the_cache_is_shared(cluster: Cluster):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "keys",
            "create",
            "--tenant",
            "initech",
            "-c",
            str(cluster.configs[0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    REPLICA_KEYS["initech"] = out.stdout.strip()
    time.sleep(0.5)  # the replicas refresh their key snapshot every 0.3 s
    body = {
        "model": "route:faq",
        "messages": [{"role": "user", "content": f"faq {uuid.uuid4()}"}],
        "temperature": 0,
    }
    first = cluster.post(0, "initech", body)
    assert first.status_code == 200 and first.headers["x-thrifty-cache"] == "miss"
    written = time.monotonic()
    while True:
        other = cluster.post(1, "initech", body)
        assert other.status_code == 200
        if other.headers["x-thrifty-cache"] == "exact":
            break
        assert time.monotonic() - written < 3, "replica B never saw replica A's cache entry"
        time.sleep(0.01)
    delay_ms = (time.monotonic() - written) * 1000
    print(f"cross-replica exact-cache delay: {delay_ms:.1f} ms")
    assert other.json()["choices"] == first.json()["choices"]
    assert cluster.post(2, "initech", body).headers["x-thrifty-cache"] == "exact"


def test_thrifty_report_reads_postgres(cluster: Cluster):
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "report", "--format", "json", "-c", str(cluster.configs[2])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    by_tenant = {row["group"]: row for row in json.loads(out.stdout)}
    assert Decimal(by_tenant["acme"]["cost_usd"]) == 22 * COST
    assert by_tenant["globex"]["requests"] == 30


def test_50_requests_with_one_idempotency_key_over_3_replicas_make_one_generation_and_one_charge(
    cluster: Cluster,
):
    before = len(cluster.upstream.requests)
    cluster.upstream.queue(Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=1.0))
    body = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 500}
    with ThreadPoolExecutor(50) as pool:
        responses = list(
            pool.map(lambda i: cluster.post(i, "hooli", body, idempotency_key="order-42"), range(50))
        )
    assert [r.status_code for r in responses] == [200] * 50
    assert len({_canonical(r.json()) for r in responses}) == 1, "every replica answered the same response"
    assert len(cluster.upstream.requests) - before == 1
    ((charged, rows),) = cluster.ledger(
        "SELECT sum(cost_usd), count(*) FROM ledger WHERE tenant_id = 'hooli' AND idempotency_key = %s",
        "order-42",
    )
    assert rows == 50 and charged == COST


def test_identical_requests_without_a_key_coalesce_across_3_replicas_and_only_while_in_flight(
    cluster: Cluster,
):
    before = len(cluster.upstream.requests)
    # The generation takes 2.5 s (within the 3 s lease): the 11 others arrive while it runs.
    cluster.upstream.queue(Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=2.5))
    body = {"model": "route:coal", "messages": PROMPT, "max_tokens": 500}
    headers = {"authorization": f"Bearer {REPLICA_KEYS['hooli']}"}
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=40)) as http:

        def post(i: int) -> httpx.Response:
            url = f"{cluster.urls[i % 3]}/v1/chat/completions"
            return http.post(url, json=body, headers=headers)

        with ThreadPoolExecutor(12) as pool:
            leader = pool.submit(post, 0)
            time.sleep(0.3)  # it leads (whichever request leads, the first upstream call is the slow one)
            others = list(pool.map(post, range(1, 12)))
            responses = [leader.result(), *others]
    assert [r.status_code for r in responses] == [200] * 12
    assert len(cluster.upstream.requests) - before == 1, "one generation for 12 requests on 3 replicas"
    assert len({_canonical(r.json()) for r in responses}) == 1, [r.json() for r in responses[:3]]
    caches = cluster.ledger(
        "SELECT cache, count(*), sum(cost_usd), sum(saved_usd) FROM ledger "
        "WHERE tenant_id = 'hooli' AND route = 'coal' GROUP BY cache ORDER BY cache"
    )
    assert caches == [("dedup", 11, 0, 11 * COST), ("miss", 1, COST, None)]
    # Coalescing is not a cache: the same request after the flight ended is generated again.
    again = cluster.post(1, "hooli", body)
    assert again.status_code == 200 and len(cluster.upstream.requests) - before == 2


def test_a_chats_summary_made_on_one_replica_is_reused_on_another_and_never_by_another_tenant(
    cluster: Cluster,
):
    def summary_calls() -> int:
        return sum(r["model"] == "llama-3.1-8b-local" for r in cluster.upstream.requests)

    def turn(t: int) -> list[dict[str, str]]:  # t user turns and the t - 1 answers between them
        words = ("apple", "river", "stone", "cloud", "green", "house", "music", "paper", "table")
        history: list[dict[str, str]] = []
        for i in range(t):
            history.append({"role": "user", "content": " ".join([words[2 * i % 9]] * 50)})
            if i < t - 1:
                history.append({"role": "assistant", "content": " ".join([words[(2 * i + 1) % 9]] * 50)})
        return history

    cluster.upstream.by_model["llama-3.1-8b-local"] = [Reply(text="S: the user listed words")]
    before = summary_calls()
    first = cluster.post(0, "hooli", {"model": "route:chat", "messages": turn(4)})
    assert first.status_code == 200 and summary_calls() - before == 1  # replica 0 summarised
    # The next turn of the same chat on replica 1: the summary comes from PostgreSQL.
    nxt = cluster.post(1, "hooli", {"model": "route:chat", "messages": turn(5)})
    assert nxt.status_code == 200 and summary_calls() - before == 1, "replica 1 made no summary call"
    sent = cluster.upstream.requests[-1]["messages"]
    assert sent[0]["role"] == "system" and "S: the user listed words" in sent[0]["content"]
    rows = cluster.ledger(
        "SELECT context::jsonb -> 'summary' ->> 'made' FROM ledger WHERE tenant_id = 'hooli' "
        "AND route = 'chat' ORDER BY ts"
    )
    assert rows == [("true",), ("false",)]
    # The same chat from another tenant is summarised for that tenant, not answered from hooli's.
    other = cluster.post(2, "umbrella", {"model": "route:chat", "messages": turn(5)})
    assert other.status_code == 200 and summary_calls() - before == 2


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def test_sigkill_of_one_replica_under_load_every_200_is_in_the_ledger_exactly_once(cluster: Cluster):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "load"}], "max_tokens": 5}
    received: list[str] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            resp = cluster.post(i, "initech", {**body, "stream": i % 2 == 0}, timeout=10)
        except httpx.TransportError:
            return  # the killed replica: never answered, so not owed to the ledger
        if resp.status_code == 200 and (i % 2 or b"[DONE]" in resp.content):
            with lock:
                received.append(resp.headers["x-thrifty-request-id"])

    victim = cluster.procs[1]
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(call, i) for i in range(240)]
        wait(futures, return_when=FIRST_COMPLETED)
        time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        wait(futures)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert 100 < len(received) < 240, "the kill came too early or too late to test anything"
    rows = cluster.ledger("SELECT request_id, count(*) FROM ledger GROUP BY request_id HAVING count(*) > 1")
    assert rows == []
    recorded = {rid for (rid,) in cluster.ledger("SELECT request_id FROM ledger WHERE tenant_id = 'initech'")}
    missing = set(received) - recorded
    assert not missing, f"{len(missing)} of {len(received)} answered requests are not in the ledger"


def test_a_leader_killed_mid_generation_is_replaced_after_its_lease(cluster: Cluster):
    # Replica 1 is gone (the SIGKILL test); replica 0 leads this key and is killed mid-generation.
    before = len(cluster.upstream.requests)
    # The doomed call outlives its replica, not the fake upstream's shutdown at the end of the module.
    cluster.upstream.queue(Reply(delay_s=4.0), Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500))
    body = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 500}
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(cluster.post, 0, "hooli", body, 60, "order-43")
        deadline = time.monotonic() + 10
        while len(cluster.upstream.requests) == before:
            assert time.monotonic() < deadline, "the leader never called upstream"
            time.sleep(0.02)
        os.kill(cluster.procs[0].pid, signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            doomed.result()
    cluster.procs[0].wait()
    started = time.monotonic()
    answered = cluster.post(2, "hooli", body, idempotency_key="order-43")
    waited = time.monotonic() - started
    assert answered.status_code == 200 and waited < LEASE_S + 2
    assert len(cluster.upstream.requests) - before == 2  # the dead leader's call, then the new one's
    ((charged, rows),) = cluster.ledger(
        "SELECT sum(cost_usd), count(*) FROM ledger WHERE tenant_id = 'hooli' AND idempotency_key = %s",
        "order-43",
    )
    assert rows == 1 and charged == COST  # one charge, for the generation that completed
    again = cluster.post(2, "hooli", body, idempotency_key="order-43")
    assert again.json() == answered.json() and len(cluster.upstream.requests) - before == 2


# -- Redis unreachable: the configured fault mode ------------------------------------------------


def _one_replica(tmp_path: Path, upstream: OpenAIWireServer, redis_url: str, mode: str) -> BackgroundServer:
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        shared_state={"url": redis_url, "fault_mode": mode, "timeout_s": 0.3},
        tenants={
            "acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": str(BUDGET)}},
            "globex": {"key_hashes": [hash_key(KEYS["globex"])], "rate_limit": {"requests_per_minute": 3}},
        },
        resilience={"max_retries": 0},
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _chat(
    server: BackgroundServer, tenant: str, idempotency_key: str | None = None, max_tokens: int = 500
) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEYS[tenant]}"}
    if idempotency_key is not None:
        headers["idempotency-key"] = idempotency_key
    return httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": max_tokens},
        headers=headers,
        timeout=30,
    )


def test_redis_down_fail_closed_refuses_with_a_503_naming_redis(tmp_path, openai_upstream, private_redis):
    openai_upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500)
    with _one_replica(tmp_path, openai_upstream, private_redis.redis_url, "fail_closed") as server:
        assert _chat(server, "acme").status_code == 200
        private_redis.stop("redis")
        for tenant, key in (("acme", None), ("globex", None), ("globex", "order-9")):
            refused = _chat(server, tenant, key)
            assert refused.status_code == 503
            error = refused.json()["error"]
            assert (
                error["code"] == "dependency_unavailable" and "Redis at redis://127.0.0.1" in error["message"]
            )
        private_redis.run("start", "redis")
        assert _chat(server, "acme").status_code == 200  # back as soon as Redis is
    assert len(openai_upstream.requests) == 2  # nothing reached the provider while Redis was away


def test_redis_down_degrade_local_keeps_per_replica_limits_and_warns(
    tmp_path, openai_upstream, private_redis, caplog
):
    openai_upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500)
    with _one_replica(tmp_path, openai_upstream, private_redis.redis_url, "degrade_local") as server:
        assert [_chat(server, "globex").status_code for _ in range(2)] == [200, 200]
        private_redis.stop("redis")
        with caplog.at_level("WARNING", logger="thrifty.stores.faults"):
            statuses = [_chat(server, "globex").status_code for _ in range(4)]
            # This replica's own window knows nothing of the two shared-state admissions before.
            assert statuses == [200, 200, 200, 429]
            budget = [_chat(server, "acme").status_code for _ in range(25)]
        assert budget.count(200) == 22 and budget[-1] == 429  # the local book still holds the budget
        assert any("decided per replica" in r.getMessage() for r in caplog.records)
        health = httpx.get(f"{server.base_url.removesuffix('/v1')}/healthz").json()
        assert health["status"] == "ok" and health["shared_state_degraded_decisions"] == 4 + 25


@pytest.mark.parametrize("mode", ["fail_closed", "degrade_local"])
def test_redis_stopped_mid_load_answers_as_the_fault_mode_says_and_loses_no_row(
    tmp_path, openai_upstream, private_redis, mode
):
    openai_upstream.default = Reply(prompt_tokens=20, completion_tokens=5, delay_s=0.02)
    statuses: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()
    with _one_replica(tmp_path, openai_upstream, private_redis.redis_url, mode) as server:

        def call(i: int) -> None:
            resp = httpx.post(
                f"{server.base_url}/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                },
                headers={"authorization": f"Bearer {KEYS['acme']}"},
                timeout=30,
            )
            code = resp.json()["error"]["code"] if resp.status_code != 200 else None
            with lock:
                statuses.append((resp.status_code, code, resp.headers.get("x-thrifty-request-id")))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, i) for i in range(160)]
            wait(futures, return_when=FIRST_COMPLETED)
            private_redis.stop("redis")
            time.sleep(0.3)
            private_redis.run("start", "redis")
            for future in futures:
                future.result()
    codes = {(status, code) for status, code, _ in statuses}
    if mode == "fail_closed":
        assert codes == {(200, None), (503, "dependency_unavailable")}, codes
    else:
        assert codes == {(200, None)}, codes
    answered = {rid for status, _, rid in statuses if status == 200}
    recorded = {r["request_id"] for r in ledger_rows(tmp_path / "ledger.db") if r["http_status"] == 200}
    assert answered <= recorded


def test_redis_down_degrade_local_keeps_an_idempotency_key_at_most_once_per_replica(
    tmp_path, openai_upstream, private_redis
):
    openai_upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with _one_replica(tmp_path / "a", openai_upstream, private_redis.redis_url, "degrade_local") as a:
        # A leader claimed in Redis, which goes away mid-generation: its result is kept locally.
        openai_upstream.queue(Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=1.0))
        with ThreadPoolExecutor(1) as pool:
            leading = pool.submit(_chat, a, "globex", "order-8")
            deadline = time.monotonic() + 10
            while not openai_upstream.requests:
                assert time.monotonic() < deadline, "the leader never called upstream"
                time.sleep(0.02)
            private_redis.stop("redis")
            led = leading.result()
        assert led.status_code == 200
        repeat = _chat(a, "globex", "order-8")
        assert repeat.json() == led.json() and repeat.headers["x-thrifty-cache"] == "dedup"
        assert len(openai_upstream.requests) == 1
        openai_upstream.requests.clear()
        first = _chat(a, "globex", "order-7")
        assert first.status_code == 200 and len(openai_upstream.requests) == 1
        again = _chat(a, "globex", "order-7")  # this replica's own record answers the repeat
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["x-thrifty-cache"] == "dedup" and again.headers["x-thrifty-cost-usd"] == "0"
        other = _chat(a, "globex", "order-7", max_tokens=499)
        assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"
        assert len(openai_upstream.requests) == 1
        health = httpx.get(f"{a.base_url.removesuffix('/v1')}/healthz").json()
        assert health["shared_state_degraded_decisions"] >= 3
        private_redis.run("start", "redis")
        # Redis is back (empty): the result made during the outage answers here and is published,
        with _one_replica(tmp_path / "b", openai_upstream, private_redis.redis_url, "degrade_local") as b:
            back = _chat(a, "globex", "order-7")
            assert back.status_code == 200 and back.json() == first.json()
            # so another replica answers the key from Redis: still one generation, one charge.
            elsewhere = _chat(b, "globex", "order-7")
            assert elsewhere.status_code == 200 and elsewhere.json() == first.json()
    assert len(openai_upstream.requests) == 1
    rows = [r for db in ("a", "b") for r in ledger_rows(tmp_path / db / "ledger.db")]
    keyed = [r for r in rows if r["idempotency_key"] == "order-7" and r["http_status"] == 200]
    assert len(keyed) == 4 and sum(Decimal(r["cost_usd"]) for r in keyed) == COST


async def test_a_plain_request_makes_one_redis_round_trip_before_its_call_and_one_after(
    tmp_path, openai_upstream, services, redis_prefix
):
    from thrifty.gateway import Gateway

    openai_upstream.default = Reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=500)
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        shared_state={"url": services.redis_url, "prefix": redis_prefix},
        tenants={
            "acme": {
                "key_hashes": [hash_key(KEYS["acme"])],
                "budget": {"usd_per_day": str(BUDGET)},
                "rate_limit": {"requests_per_minute": 100, "tokens_per_minute": 100_000},
            }
        },
    )
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    await gateway.start()
    try:
        state = gateway.stores.redis
        before = state.round_trips
        ctx, _ = await gateway.chat_completion(
            {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 500}, tenant="acme"
        )
        await gateway._spend_guard.drain()
        # Rate admission and budget reservation in one script; the settle off the response path.
        assert state.round_trips - before == 2
        assert ctx.budget_remaining == f"{BUDGET - COST}; scope=tenant:acme; window=day"
        remaining = await gateway.stores.shared_budgets.remaining(
            gateway.budget_plan.limits_for("acme", None, None), ctx.ts
        )
        assert remaining == [BUDGET - COST]
    finally:
        await gateway.close()


async def test_a_breaker_opened_on_one_replica_is_open_on_the_others(
    tmp_path, openai_upstream, services, redis_prefix
):
    from thrifty.errors import CircuitOpen, ThriftyError
    from thrifty.gateway import Gateway

    openai_upstream.default = Reply(status=500)

    def replica(name: str) -> Gateway:
        (tmp_path / name).mkdir()
        settings = base_settings(
            tmp_path / name,
            providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
            models=openai_models(),
            shared_state={"url": services.redis_url, "prefix": redis_prefix, "breaker_poll_s": 0.05},
            resilience={"max_retries": 0, "breaker_failures": 2, "breaker_cooldown_s": 30},
        )
        return Gateway(settings, secrets={"up": UPSTREAM_KEY})

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with replica("a") as a, replica("b") as b:
        for _ in range(2):
            with pytest.raises(ThriftyError) as failed:
                await a.chat_completion(body, tenant="acme")
            assert failed.value.status == 500
        await asyncio.sleep(0.3)  # b reads the board every 50 ms
        with pytest.raises(CircuitOpen) as skipped:
            await b.chat_completion(body, tenant="acme")
        assert skipped.value.retry_after_s is not None and 25 < skipped.value.retry_after_s <= 30
    assert len(openai_upstream.requests) == 2  # replica b never called the failing target


def test_postgres_restart_under_load_every_200_is_in_the_ledger_exactly_once(tmp_path, openai_upstream):
    service = ServiceDir.start("postgres")
    try:
        # Slow enough that the load outlasts the stop (16 at a time: at least 0.6 s for 100).
        openai_upstream.default = Reply(delay_s=0.1)
        settings = base_settings(
            tmp_path,
            providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
            models=openai_models(),
            storage={
                "url": service.postgres_url,
                "spool_path": str(tmp_path / "spool.jsonl"),
                "local_path": str(tmp_path / "local.db"),
            },
            resilience={"max_retries": 0},
        )
        received: list[str] = []
        lock = threading.Lock()
        with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server, httpx.Client() as http:

            def call(i: int) -> None:
                resp = http.post(
                    f"{server.base_url}/chat/completions",
                    json={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": i % 2 == 0,
                    },
                    headers={"authorization": f"Bearer {KEYS['acme']}"},
                    timeout=30,
                )
                if resp.status_code == 200 and (i % 2 or b"[DONE]" in resp.content):
                    with lock:
                        received.append(resp.headers["x-thrifty-request-id"])

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(call, i) for i in range(100)]
                wait(futures, return_when=FIRST_COMPLETED)
                service.stop("postgres")  # mid-load: rows go to the spool, responses still go out
                service.run("start", "postgres")
                for future in futures:
                    future.result()
            deadline = time.monotonic() + 20
            while (tmp_path / "spool.jsonl").exists() or (tmp_path / "spool.jsonl.replaying").exists():
                assert time.monotonic() < deadline, "the spool was not replayed"
                time.sleep(0.1)
            spooled = httpx.get(f"{server.base_url.removesuffix('/v1')}/healthz").json()[
                "ledger_rows_spooled"
            ]
        import psycopg

        with psycopg.connect(service.postgres_url) as conn:
            ids = [rid for (rid,) in conn.execute("SELECT request_id FROM ledger")]
        assert len(received) == 100 and spooled > 0, "the restart should have been felt mid-load"
        assert len(ids) == len(set(ids)) and set(received) <= set(ids)
    finally:
        service.remove()


def test_an_unreachable_postgres_is_one_clear_line_for_the_cli_and_at_start(tmp_path: Path):
    port = _free_port()  # nothing listens there
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"url": f"postgresql://thrifty:secret@127.0.0.1:{port}/thrifty"},
                "providers": {"p": {"kind": "replay", "data": ["builtin:quickstart"]}},
                "models": {"m": {"provider": "p"}},
                "tenants": {"a": {}},
            }
        )
    )
    for args in (["report"], ["keys", "list"], ["alerts"]):
        out = subprocess.run(
            [sys.executable, "-m", "thrifty", *args, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"PostgreSQL at 127.0.0.1:{port}/thrifty (storage.url) is unreachable" in out.stderr
        assert "secret" not in out.stderr
