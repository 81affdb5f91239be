"""SIGKILL a real `thrifty serve` between batch submission and completion, and right after a
provider accepted a batch: after a restart every item is answered once and billed once (the
provider batch is never sent twice), and a deferred request queued before the kill is sent."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, ledger_rows
from tests.fakes.anthropic_batch_wire import AnthropicBatchWireServer
from tests.fakes.anthropic_wire import Reply as AReply
from tests.fakes.openai_batch_wire import OpenAIBatchWireServer
from tests.fakes.openai_wire import Reply
from tests.test_durability import _free_port, _start_gateway
from thrifty.stores.keys import hash_key


def _config(
    tmp_path: Path,
    upstream_url: str,
    kind: str = "openai",
    model: str = "gpt-4o-mini",
    upstream_model: str = "gpt-4o-mini",
) -> Path:
    config = {
        "storage": {"url": "sqlite:///ledger.db"},
        "providers": {"up": {"kind": kind, "base_url": upstream_url, "api_key_env": "UP_KEY"}},
        "models": {model: {"provider": "up", "upstream": upstream_model}},
        "routes": {"later": {"model": model, "defer": {"max_batch": 2, "max_age_s": 3600}}},
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


# OpenAI's side (its label, paged list) runs the same recovery; it is tested in-process in
# test_batch.py, with a restart of the gateway, to keep the suite short.
@pytest.mark.parametrize("kind", ["anthropic"])
def test_sigkill_right_after_the_provider_accepted_a_batch_sends_it_once(tmp_path, loop_thread, kind):
    """The gateway dies the moment the provider has stored the batch, before it learns the batch's
    id. After the restart the batch is found at the provider and adopted (Anthropic: by its size
    and creation time, then its custom_ids; OpenAI: by its metadata label), never sent again."""
    upstream: Any
    if kind == "anthropic":
        upstream = AnthropicBatchWireServer(api_key=UPSTREAM_KEY)
        upstream.default_reply = AReply(input_tokens=100, output_tokens=20)
        model, upstream_model = "claude-haiku", "claude-haiku-4-5"
        # claude-haiku-4-5 at batch prices: $0.50 input, $2.50 output per 1M tokens.
        each = (100 * Decimal("0.5") + 20 * Decimal("2.5")) / Decimal(1_000_000)
    else:
        upstream = OpenAIBatchWireServer(api_key=UPSTREAM_KEY)
        upstream.default = Reply(prompt_tokens=100, completion_tokens=20)
        model, upstream_model = "gpt-4o-mini", "gpt-4o-mini"
        each = (100 * Decimal("0.075") + 20 * Decimal("0.3")) / Decimal(1_000_000)
    loop_thread.run(upstream.start())
    config = _config(tmp_path, upstream.base_url, kind, model, upstream_model)
    gateways: list[subprocess.Popen[bytes]] = []

    def kill_the_gateway(batch: Any) -> None:
        os.kill(gateways[-1].pid, signal.SIGKILL)

    upstream.on_create = kill_the_gateway
    port = _free_port()
    gateways.append(_start_gateway(config, port))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        lines = [
            {
                "custom_id": f"item-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "max_tokens": 50,
                },
            }
            for i in range(12)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = client.files.create(file=("nightly.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert gateways[-1].wait(20) == -signal.SIGKILL  # killed inside the provider's create
    finally:
        gateways[-1].kill()
        gateways[-1].wait()
    assert upstream.batch_creations == 1
    upstream.on_create = None
    port = _free_port()
    gateways.append(_start_gateway(config, port))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        done = _until(
            lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b
        )
        output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    finally:
        gateways[-1].kill()
        gateways[-1].wait()
        loop_thread.run(upstream.stop())
    assert done.status == "completed" and done.request_counts.completed == 12
    assert upstream.batch_creations == 1  # adopted, not sent again
    assert sorted(o["custom_id"] for o in output) == sorted(f"item-{i}" for i in range(12))
    rows = [r for r in ledger_rows(tmp_path / "ledger.db") if r["batch"]]
    assert len(rows) == 12 and len({r["request_id"] for r in rows}) == 12
    assert sum(Decimal(r["cost_usd"]) for r in rows) == 12 * each
