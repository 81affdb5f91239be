"""A replica that dies (or stalls) mid-request holds its key or flight for one short lease only.

Three real `thrifty serve` replicas on one Redis and one PostgreSQL, with a short lease
(`idempotency.flight_lease_s`) that the live owner renews and a long `idempotency.lease_s`: a
leader SIGKILLed while its upstream call runs is replaced within about one short lease (not the
long one) by exactly one new upstream call; a leader paused past its lease cannot record over its
successor; a live leader whose call outlasts several short leases is not duplicated. And the
single-process SQLite gateway: a keyed request cut by a SIGKILL is retried after a restart within
one short lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY, LoopThread, ledger_rows
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from tests.services import ServiceDir
from tests.test_replicas import COST, PROMPT, PROMPT_TOKENS, _free_port, _start, _wait_healthy
from thrifty.stores.keys import hash_key

FLIGHT_LEASE_S = 1.5  # the renewed lease
LEASE_S = 60.0  # the most a live owner holds a key: far above what any wait below may take
DOOMED_S = 8.0  # the killed leader's upstream call: outlives its replica, not the fake upstream
KEYS = {t: f"thr-test-key-{t}-{i:04d}" for i, t in enumerate(("north", "south", "east", "west", "up"), 101)}
BODY = {"model": "route:coal", "messages": PROMPT, "max_tokens": 500}
KEYED = {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 500}


def _reply(text: str, delay_s: float = 0.05) -> Reply:
    return Reply(text=text, prompt_tokens=PROMPT_TOKENS, completion_tokens=500, delay_s=delay_s)


class Replicas:
    def __init__(
        self, configs: list[Path], ports: list[int], pg_url: str, upstream: OpenAIWireServer
    ) -> None:
        self.configs, self.ports, self.pg_url, self.upstream = configs, ports, pg_url, upstream
        self.procs = [_start(c, p) for c, p in zip(configs, ports, strict=True)]
        for i in range(len(ports)):
            _wait_healthy(self.url(i), self.procs[i])

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def post(self, i: int, tenant: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {KEYS[tenant]}"}
        if key is not None:
            headers["idempotency-key"] = key
        return httpx.post(f"{self.url(i)}/v1/chat/completions", json=body, headers=headers, timeout=60)

    def kill(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()

    def restart(self, i: int) -> None:
        self.procs[i] = _start(self.configs[i], self.ports[i])
        _wait_healthy(self.url(i), self.procs[i])

    def calls(self) -> int:
        return len(self.upstream.requests)

    def wait_for_call(self, before: int) -> None:
        deadline = time.monotonic() + 15
        while self.calls() == before:
            assert time.monotonic() < deadline, "the leader never called upstream"
            time.sleep(0.01)

    def ledger(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return list(conn.execute(sql, params))


@pytest.fixture(scope="module")
def replicas(
    services: ServiceDir, loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    import psycopg

    db = f"f_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    pg_url = services.postgres_url.rsplit("/", 1)[0] + "/" + db
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    upstream.default = _reply("default")
    loop_thread.run(upstream.start())
    root = tmp_path_factory.mktemp("flight")
    prefix = f"f{uuid.uuid4().hex[:8]}:"
    configs, ports = [], []
    for i in range(3):
        config = {
            "storage": {
                "url": pg_url,
                "spool_path": str(root / f"spool-{i}.jsonl"),
                "local_path": str(root / f"local-{i}.db"),
            },
            "shared_state": {"url": services.redis_url, "prefix": prefix},
            "providers": {"up": {"kind": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY"}},
            "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
            "routes": {"coal": {"model": "gpt-4o-mini", "coalesce": True}},
            "resilience": {"max_retries": 0},
            "idempotency": {"lease_s": LEASE_S, "flight_lease_s": FLIGHT_LEASE_S},
            "tenants": {t: {"key_hashes": [hash_key(k)]} for t, k in KEYS.items()},
        }
        path = root / f"replica-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        configs.append(path)
        ports.append(_free_port())
    cluster = Replicas(configs, ports, pg_url, upstream)
    yield cluster
    for proc in cluster.procs:
        proc.terminate()
    for proc in cluster.procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    loop_thread.run(upstream.stop())
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _by_cache(replicas: Replicas, tenant: str) -> list[tuple[Any, ...]]:
    return replicas.ledger(
        "SELECT cache, count(*), sum(cost_usd), sum(saved_usd) FROM ledger WHERE tenant_id = %s "
        "GROUP BY cache ORDER BY cache",
        tenant,
    )


def _text(response: httpx.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"])


def test_waiters_on_two_replicas_take_over_within_one_short_lease_when_the_leader_is_sigkilled(
    replicas: Replicas,
):
    before = replicas.calls()
    replicas.upstream.queue(_reply("doomed", DOOMED_S), _reply("second"))
    with ThreadPoolExecutor(7) as pool:
        doomed = pool.submit(replicas.post, 0, "north", BODY)
        replicas.wait_for_call(before)  # replica 0 leads the flight
        waiters = [pool.submit(replicas.post, 1 + i % 2, "north", BODY) for i in range(6)]
        time.sleep(0.5)  # they joined it and wait (three on replica 1, three on replica 2)
        assert replicas.calls() == before + 1
        replicas.kill(0)
        killed = time.monotonic()
        with pytest.raises(httpx.TransportError):
            doomed.result()
        responses = [w.result() for w in waiters]
        waited = time.monotonic() - killed
    replicas.restart(0)
    assert [r.status_code for r in responses] == [200] * 6
    assert {_text(r) for r in responses} == {"second"}, "every waiter got the new leader's answer"
    # Its lease was renewed up to the kill: it ends at most one short lease after it (not LEASE_S).
    assert waited < FLIGHT_LEASE_S + 2.0, waited
    assert replicas.calls() == before + 2, "exactly one more upstream call"
    assert _by_cache(replicas, "north") == [("dedup", 5, 0, 5 * COST), ("miss", 1, COST, None)]
    answered = {r.headers["x-thrifty-request-id"] for r in responses}
    recorded = {rid for (rid,) in replicas.ledger("SELECT request_id FROM ledger WHERE tenant_id = 'north'")}
    assert recorded == answered  # the killed leader never answered, so it owes no row


def test_a_keyed_retry_proceeds_within_one_short_lease_after_its_owner_is_sigkilled(replicas: Replicas):
    before = replicas.calls()
    replicas.upstream.queue(_reply("doomed", DOOMED_S), _reply("kept"))
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(replicas.post, 2, "south", KEYED, "order-7")
        replicas.wait_for_call(before)
        replicas.kill(2)
        killed = time.monotonic()
        with pytest.raises(httpx.TransportError):
            doomed.result()
    retry = replicas.post(1, "south", KEYED, "order-7")  # waits for the key (polling), no 409
    waited = time.monotonic() - killed
    replicas.restart(2)
    assert retry.status_code == 200 and _text(retry) == "kept"
    assert waited < FLIGHT_LEASE_S + 2.0, waited
    assert replicas.calls() == before + 2
    again = replicas.post(2, "south", KEYED, "order-7")  # the restarted replica answers the stored result
    assert again.status_code == 200 and again.json() == retry.json() and replicas.calls() == before + 2
    assert _by_cache(replicas, "south") == [("dedup", 1, 0, COST), ("miss", 1, COST, None)]


def test_a_live_leader_whose_call_outlasts_several_short_leases_is_not_duplicated(replicas: Replicas):
    before = replicas.calls()
    long_s = 3 * FLIGHT_LEASE_S + 0.5  # the lease is renewed about 9 times meanwhile
    replicas.upstream.queue(_reply("long", long_s), _reply("long", long_s))
    with ThreadPoolExecutor(6) as pool:
        leaders = [
            pool.submit(replicas.post, 0, "east", BODY),
            pool.submit(replicas.post, 0, "west", KEYED, "k-1"),
        ]
        deadline = time.monotonic() + 15
        while replicas.calls() < before + 2:
            assert time.monotonic() < deadline, "the leaders never called upstream"
            time.sleep(0.01)
        others = [pool.submit(replicas.post, i, "east", BODY) for i in (1, 2)]
        others += [pool.submit(replicas.post, i, "west", KEYED, "k-1") for i in (1, 2)]
        responses = [f.result() for f in leaders + others]
    assert [r.status_code for r in responses] == [200] * 6
    assert {_text(r) for r in responses} == {"long"}
    assert replicas.calls() == before + 2, "no waiter took over a live leader's flight or key"
    for tenant in ("east", "west"):
        assert _by_cache(replicas, tenant) == [("dedup", 2, 0, 2 * COST), ("miss", 1, COST, None)]


def test_a_stale_owner_paused_past_its_lease_cannot_record_over_the_new_owner(replicas: Replicas):
    before = replicas.calls()
    # Replica 0 claims the key and is paused (SIGSTOP) mid-call; replica 1's retry takes the key over
    # once the paused owner's lease ends. Resumed, the stale owner answers its own client (that
    # generation was made and paid for) but cannot store its result over the new owner's.
    replicas.upstream.queue(_reply("stale", 3.0), _reply("fresh"))
    with ThreadPoolExecutor(1) as pool:
        stale = pool.submit(replicas.post, 0, "up", KEYED, "order-9")
        replicas.wait_for_call(before)
        os.kill(replicas.procs[0].pid, signal.SIGSTOP)
        try:
            fresh = replicas.post(1, "up", KEYED, "order-9")
        finally:
            os.kill(replicas.procs[0].pid, signal.SIGCONT)
        stale_answer = stale.result()
    assert fresh.status_code == 200 and _text(fresh) == "fresh"
    assert stale_answer.status_code == 200 and _text(stale_answer) == "stale"
    time.sleep(0.3)  # the stale owner's (refused) store has landed
    later = replicas.post(2, "up", KEYED, "order-9")
    assert later.status_code == 200 and later.json() == fresh.json()
    assert replicas.calls() == before + 2
    # Two generations were made, and both are charged, exactly; the repeat costs nothing.
    assert _by_cache(replicas, "up") == [("dedup", 1, 0, COST), ("miss", 2, 2 * COST, None)]


# -- one process on SQLite ------------------------------------------------------------------------


def test_a_keyed_request_cut_by_a_sigkill_is_retried_after_a_restart_within_one_short_lease(
    tmp_path: Path, openai_upstream: OpenAIWireServer
):
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
                "providers": {
                    "up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}
                },
                "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
                "resilience": {"max_retries": 0},
                # lease_s stays at its default (600 s): only the short lease may hold the key.
                "idempotency": {"flight_lease_s": FLIGHT_LEASE_S},
                "tenants": {"north": {"key_hashes": [hash_key(KEYS["north"])]}},
            }
        )
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEYS['north']}", "idempotency-key": "order-1"}
    openai_upstream.queue(_reply("doomed", DOOMED_S), _reply("kept"))
    proc = _start(config, port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        with ThreadPoolExecutor(1) as pool:
            doomed = pool.submit(httpx.post, url, json=KEYED, headers=headers, timeout=60)
            deadline = time.monotonic() + 15
            while not openai_upstream.requests:
                assert time.monotonic() < deadline, "the gateway never called upstream"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = time.monotonic()
            with pytest.raises(httpx.TransportError):
                doomed.result()
        # What the killed process left: a running row whose lease ends one short lease after its
        # last renewal (whatever the restart then takes), not 600 s after the claim.
        with closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
            ((state, expires_at),) = db.execute(
                "SELECT state, expires_at FROM idempotency WHERE idem_key = 'order-1'"
            ).fetchall()
        assert state == "running" and expires_at - time.time() <= FLIGHT_LEASE_S, expires_at - time.time()
        proc = _start(config, port)
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        refused = httpx.post(url, json=KEYED, headers=headers, timeout=30)
        if refused.status_code == 409:  # the restart took less than the short lease
            retry_after = float(refused.headers["retry-after"])
            assert retry_after <= FLIGHT_LEASE_S + 1, retry_after  # never the 600 s lease
            time.sleep(max(0.0, killed + FLIGHT_LEASE_S - time.monotonic()) + 0.1)
        answered = httpx.post(url, json=KEYED, headers=headers, timeout=30)
        assert answered.status_code == 200 and _text(answered) == "kept"
        assert time.monotonic() - killed < FLIGHT_LEASE_S + 10  # not the 600 s lease
        again = httpx.post(url, json=KEYED, headers=headers, timeout=30)
        assert again.status_code == 200 and again.json() == answered.json()
        assert len(openai_upstream.requests) == 2  # the killed call, then the retry's
    finally:
        proc.terminate()
        proc.wait(15)
    rows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["idempotency_key"] == "order-1"]
    charged = [r for r in rows if r["cost_usd"] is not None and Decimal(str(r["cost_usd"])) > 0]
    assert len(charged) == 1 and Decimal(str(charged[0]["cost_usd"])) == COST


# -- what renewal costs ---------------------------------------------------------------------------


async def test_renewal_runs_only_while_a_keyed_or_coalesced_call_is_open_and_never_on_the_request_path(
    tmp_path, openai_upstream, services, redis_prefix
):
    from tests.conftest import KEYS as TENANT_KEYS
    from tests.conftest import base_settings, openai_models
    from thrifty.gateway import Gateway

    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={"coal": {"model": "gpt-4o-mini", "coalesce": True}},
        # The breaker board's poll would count too: out of the way for the length of the test.
        shared_state={"url": services.redis_url, "prefix": redis_prefix, "breaker_poll_s": 3600},
        idempotency={"flight_lease_s": 0.6},  # renewed every 0.2 s
        tenants={"acme": {"key_hashes": [hash_key(TENANT_KEYS["acme"])]}},
    )
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    await gateway.start()
    state = gateway.stores.redis

    async def round_trips(body: dict[str, Any], delay_s: float, key: str | None = None) -> tuple[int, int]:
        """The round trips until the answer, and those after it (a second later)."""
        openai_upstream.queue(_reply("x", delay_s))
        before = state.round_trips
        await gateway.chat_completion(body, tenant="acme", idempotency_key=key)
        answered = state.round_trips
        await asyncio.sleep(1.0)
        return answered - before, state.round_trips - answered

    try:
        plain = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "plain"}]}
        coal = {"model": "route:coal", "messages": [{"role": "user", "content": "coal"}]}
        assert await round_trips(plain, 0.05) == (0, 0)  # neither coalesced nor keyed: nothing at all
        # Shorter than a third of the lease: join and publish, claim and complete, as without renewal.
        assert await round_trips(coal, 0.05) == (2, 0)
        assert await round_trips(plain, 0.05, key="k-short") == (2, 0)
        # A 1.1 s call renews about every 0.2 s while it runs (in the background), and stops with it.
        during, after = await round_trips({**coal, "max_tokens": 9}, 1.1)
        assert 2 + 4 <= during <= 2 + 6 and after == 0, during
        during, after = await round_trips(plain, 1.1, key="k-long")
        assert 2 + 4 <= during <= 2 + 6 and after == 0, during
    finally:
        await gateway.close()
