"""The ledger never loses a request whose response reached the client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, ledger_rows
from tests.fakes.openai_wire import Reply
from thrifty.stores.keys import hash_key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(tmp_path: Path, upstream_url: str, synchronous: str = "normal") -> Path:
    config = {
        "storage": {"url": "sqlite:///ledger.db", "synchronous": synchronous},
        "providers": {"up": {"kind": "openai", "base_url": upstream_url, "api_key_env": "UP_KEY"}},
        "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
        "tenants": {"acme": {"key_hashes": [hash_key(KEYS["acme"])]}},
    }
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_gateway(config: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "UP_KEY": UPSTREAM_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "thrifty", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"gateway did not start: {proc.stdout.read() if proc.stdout else ''!r}")


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_sigkill_right_after_responses_loses_no_completed_request(tmp_path, openai_upstream, synchronous):
    openai_upstream.default = Reply(delay_s=0.01)
    port = _free_port()
    proc = _start_gateway(_write_config(tmp_path, openai_upstream.base_url, synchronous), port)
    received: list[str] = []
    lock = threading.Lock()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def call(stream: bool) -> None:
        with httpx.Client(timeout=10) as http:
            try:
                resp = http.post(
                    url, json={**body, "stream": stream}, headers={"authorization": f"Bearer {KEYS['acme']}"}
                )
                resp.read()
            except httpx.TransportError:
                return  # killed before answering: not received, so not owed to the ledger
            if resp.status_code == 200 and (not stream or b"[DONE]" in resp.content):
                with lock:
                    received.append(resp.headers["x-thrifty-request-id"])

    try:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(call, i % 2 == 0) for i in range(400)]
            # Kill the gateway as soon as responses start arriving, with many still in flight.
            wait(futures, return_when=FIRST_COMPLETED)
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            wait(futures)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert received, "no response arrived before the kill"
    recorded = {row["request_id"] for row in ledger_rows(tmp_path / "ledger.db")}
    missing = set(received) - recorded
    assert not missing, f"{len(missing)} of {len(received)} answered requests are not in the ledger"
    assert len(received) < 400, "the kill came too late to test anything"


def test_client_disconnect_mid_stream_records_generated_tokens(client, openai_upstream, ledger):
    text = "".join(f"token{i} " for i in range(200))
    openai_upstream.queue(Reply(text=text, chunk_chars=8, chunk_delay_s=0.01, completion_tokens=400))
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}], stream=True
    )
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen == 5:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while not ledger() and time.monotonic() < deadline:
        time.sleep(0.05)
    (row,) = ledger()
    assert row["status"] == "client_disconnected" and row["http_status"] == 499
    # Some, not all, of the answer was generated before the client left; it is counted locally.
    assert 0 < row["output_tokens"] < 400 and row["usage_estimated"] == 1
    assert row["input_tokens"] > 0 and row["cost_usd"] is not None
