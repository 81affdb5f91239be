"""SIGKILL a real `thrifty serve` between batch submission and completion: after a restart every
item is answered once and billed once, and a deferred request queued before the kill is sent."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, ledger_rows
from tests.fakes.openai_batch_wire import OpenAIBatchWireServer
from tests.fakes.openai_wire import Reply
from tests.test_durability import _free_port, _start_gateway
from thrifty.stores.keys import hash_key


def _config(tmp_path: Path, upstream_url: str) -> Path:
    config = {
        "storage": {"url": "sqlite:///ledger.db"},
        "providers": {"up": {"kind": "openai", "base_url": upstream_url, "api_key_env": "UP_KEY"}},
        "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
        "routes": {"later": {"model": "gpt-4o-mini", "defer": {"max_batch": 2, "max_age_s": 3600}}},
        "tenants": {"acme": {"key_hashes": [hash_key(KEYS["acme"])]}},
        "batch": {"poll_interval_s": 0.1, "lease_s": 1},
    }
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _defer(port: int, text: str) -> str:
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "route:later", "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {KEYS['acme']}"},
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_sigkill_between_submit_and_completion_answers_and_bills_each_item_once(tmp_path, loop_thread):
    upstream = OpenAIBatchWireServer(api_key=UPSTREAM_KEY)
    loop_thread.run(upstream.start())
    upstream.hold = True
    upstream.default = Reply(prompt_tokens=100, completion_tokens=20)
    config = _config(tmp_path, upstream.base_url)
    port = _free_port()
    proc = _start_gateway(config, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        lines = [
            {
                "custom_id": f"item-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]},
            }
            for i in range(20)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = client.files.create(file=("nightly.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Submitted and polled (so its provider id is stored), held in progress by the provider.
        _until(lambda: [b for b in upstream.batches.values() if b.status == "in_progress"])
        job = _defer(port, "queued before the kill")  # below max_batch: stays in the queue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    upstream.release()
    port = _free_port()
    proc = _start_gateway(config, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        done = _until(
            lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b
        )
        assert done.status == "completed" and done.request_counts.completed == 20
        _defer(port, "after the restart")  # the second one fills the deferred queue: flushed
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        view = _until(
            lambda: (
                (v := httpx.get(f"http://127.0.0.1:{port}/v1/thrifty/jobs/{job}", headers=auth).json())[
                    "status"
                ]
                == "completed"
                and v
            )
        )
        assert view["response"]["status_code"] == 200
        output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    finally:
        proc.kill()
        proc.wait()
        loop_thread.run(upstream.stop())
    assert sorted(o["custom_id"] for o in output) == sorted(f"item-{i}" for i in range(20))
    # One provider batch for the file (never resubmitted), one for the two deferred requests.
    assert upstream.batch_creations == 2
    assert sum(len(b.lines) for b in upstream.batches.values()) == 22
    rows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["batch"]]
    assert len(rows) == 22 and len({r["request_id"] for r in rows}) == 22
    # gpt-4o-mini at batch prices: 100 x $0.075 + 20 x $0.30 per 1M tokens, once per item.
    each = (100 * Decimal("0.075") + 20 * Decimal("0.3")) / Decimal(1_000_000)
    assert sum(Decimal(r["cost_usd"]) for r in rows) == 22 * each
    assert {o["response"]["request_id"] for o in output} <= {r["request_id"] for r in rows}
