"""Batch offload with two real `thrifty serve` replicas on one PostgreSQL: a job uploaded through
one replica is validated, sent and collected once across both (one provider batch per provider,
deferred requests sent to either replica share one provider batch), and when the replica driving
the provider batches is SIGKILLed the other takes them over: every item answered and billed once."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY
from tests.fakes.anthropic_batch_wire import AnthropicBatchWireServer
from tests.fakes.anthropic_wire import Reply as AReply
from tests.fakes.openai_batch_wire import OpenAIBatchWireServer
from tests.fakes.openai_wire import Reply
from tests.test_durability import _free_port
from thrifty.stores.keys import hash_key

M = Decimal(1_000_000)


def _config(tmp_path: Path, i: int, pg_url: str, oa_url: str, an_url: str) -> Path:
    config = {
        "storage": {
            "url": pg_url,
            "local_path": str(tmp_path / f"replica-{i}.db"),
            "spool_path": str(tmp_path / f"replica-{i}.spool.jsonl"),
        },
        "providers": {
            "oa": {"kind": "openai", "base_url": oa_url, "api_key_env": "UP_KEY"},
            "an": {"kind": "anthropic", "base_url": an_url, "api_key_env": "UP_KEY"},
        },
        "models": {
            "gpt-4o-mini": {"provider": "oa", "upstream": "gpt-4o-mini"},
            "claude-haiku": {"provider": "an", "upstream": "claude-haiku-4-5"},
        },
        "routes": {"later": {"model": "gpt-4o-mini", "defer": {"max_batch": 4, "max_age_s": 3600}}},
        "tenants": {"acme": {"key_hashes": [hash_key(KEYS["acme"])]}},
        "batch": {"poll_interval_s": 0.1, "lease_s": 1},
    }
    path = tmp_path / f"replica-{i}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "thrifty", "serve", "--config", str(config), "--port", str(port)],
        env={**os.environ, "UP_KEY": UPSTREAM_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("a replica did not start")


def _until(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_two_replicas_drive_each_job_once_and_take_over_from_a_killed_one(tmp_path, loop_thread, pg_url):
    oa = OpenAIBatchWireServer(api_key=UPSTREAM_KEY)
    an = AnthropicBatchWireServer(api_key=UPSTREAM_KEY)
    loop_thread.run(oa.start())
    loop_thread.run(an.start())
    oa.hold = an.hold = True
    oa.default = Reply(prompt_tokens=100, completion_tokens=20)
    an.default_reply = AReply(input_tokens=100, output_tokens=20)
    ports = [_free_port(), _free_port()]
    procs = [_start(_config(tmp_path, i, pg_url, oa.base_url, an.base_url), ports[i]) for i in range(2)]
    clients = [
        openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key=KEYS["acme"], max_retries=0) for p in ports
    ]
    try:
        lines = [
            {
                "custom_id": f"item-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini" if i % 2 else "claude-haiku",
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "max_tokens": 50,
                },
            }
            for i in range(30)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = clients[0].files.create(file=("nightly.jsonl", io.BytesIO(data)), purpose="batch")
        batch = clients[0].batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert clients[1].batches.retrieve(batch.id).id == batch.id  # the job is seen by both
        _until(lambda: oa.batches and an.batches)
        # Deferred requests sent to either replica fill one shared queue: one provider batch of 4.
        jobs = []
        for i in range(4):
            resp = httpx.post(
                f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions",
                json={"model": "route:later", "messages": [{"role": "user", "content": f"d{i}"}]},
                headers={"authorization": f"Bearer {KEYS['acme']}"},
            )
            assert resp.status_code == 202, resp.text
            jobs.append(resp.json()["id"])
        _until(lambda: len(oa.batches) == 2)
        time.sleep(0.5)  # long enough for a second claim or submission, were there one
        assert oa.batch_creations == 2 and an.batch_creations == 1
        assert sorted(len(b.lines) for b in oa.batches.values()) == [4, 15]
        # SIGKILL the replica that drives the file's OpenAI batch (it holds the batch's lease).
        with psycopg.connect(pg_url) as conn:
            owners = {r[0]: r[1] for r in conn.execute("SELECT upstream_id, lease_owner FROM batch_upstream")}
        victim_pid = int(next(iter(owners.values())).split("-")[0])
        victim = next(i for i, p in enumerate(procs) if p.pid == victim_pid)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        oa.release()
        an.release()
        survivor = clients[1 - victim]
        done = _until(
            lambda: (b := survivor.batches.retrieve(batch.id)).status in ("completed", "failed") and b
        )
        assert done.status == "completed" and done.request_counts.completed == 30
        output = [json.loads(x) for x in survivor.files.content(done.output_file_id).text.splitlines()]
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        port = ports[1 - victim]
        for job in jobs:
            _until(
                lambda job=job: (
                    httpx.get(f"http://127.0.0.1:{port}/v1/thrifty/jobs/{job}", headers=auth).json()["status"]
                    == "completed"
                )
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        loop_thread.run(oa.stop())
        loop_thread.run(an.stop())
    assert sorted(o["custom_id"] for o in output) == sorted(f"item-{i}" for i in range(30))
    assert oa.batch_creations == 2 and an.batch_creations == 1  # nothing sent twice
    with psycopg.connect(pg_url) as conn:
        rows = list(conn.execute("SELECT request_id, model, cost_usd FROM ledger WHERE batch = 1"))
    assert len(rows) == 34 and len({r[0] for r in rows}) == 34
    # Batch prices: gpt-4o-mini $0.075 / $0.30, claude-haiku-4-5 $0.50 / $2.50 per 1M tokens.
    gpt = (100 * Decimal("0.075") + 20 * Decimal("0.3")) / M
    claude = (100 * Decimal("0.5") + 20 * Decimal("2.5")) / M
    assert sum(r[2] for r in rows) == 19 * gpt + 15 * claude
