"""`thrifty bench batch`: a large OpenAI batch job through a real `thrifty serve` to a batch stub.

The stub speaks OpenAI's files + batches API (a batch completes on its first poll, its output file
is streamed as it is written). Measured on the gateway process alone (from /proc): CPU per item,
peak resident memory over its idle size, time to submit (upload until the provider has the batch)
and to collect (provider done until every item is in the ledger), and the cost of the items against
the same items at real-time prices. Two job sizes show whether memory grows with the job.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from thrifty.bench.loadgen import BenchError
from thrifty.stores.keys import hash_key
from thrifty.types import decimal_text

MAX_CPU_US_PER_ITEM = 500.0
UPSTREAM_KEY = "sk-bench-batch"
PROMPT_TOKENS, COMPLETION_TOKENS = 60, 20


class BatchStub:
    """OpenAI's Batch API, minimal and fast: every line answered with the same short completion."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created_at: float | None = None
        self.completed_at: float | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_get("/v1/files/{id}/content", self._content)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        file_id = "file-" + secrets.token_hex(8)
        self.files[file_id] = upload.file.read()
        return web.json_response({"id": file_id, "object": "file", "purpose": "batch"})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        batch_id = "batch_" + secrets.token_hex(8)
        self.batches[batch_id] = {
            "id": batch_id,
            "input_file_id": body["input_file_id"],
            "status": "in_progress",
        }
        self.created_at = time.monotonic()
        return web.json_response(self.batches[batch_id])

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches[request.match_info["id"]]
        if batch["status"] == "in_progress":
            batch.update(status="completed", output_file_id="out-" + batch["input_file_id"])
            self.completed_at = time.monotonic()
        return web.json_response(batch)

    async def _content(self, request: web.Request) -> web.StreamResponse:
        input_id = request.match_info["id"].removeprefix("out-")
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await resp.prepare(request)
        chunk: list[bytes] = []
        for raw in self.files[input_id].splitlines():
            line = orjson.loads(raw)
            chunk.append(orjson.dumps(_output_line(line)) + b"\n")
            if len(chunk) >= 500:
                await resp.write(b"".join(chunk))
                chunk = []
        await resp.write(b"".join(chunk))
        await resp.write_eof()
        return resp


def _output_line(line: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "batch_req_" + line["custom_id"][-12:],
        "custom_id": line["custom_id"],
        "response": {
            "status_code": 200,
            "request_id": "r",
            "body": {
                "id": "chatcmpl-b",
                "object": "chat.completion",
                "created": 0,
                "model": line["body"]["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Paris."},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            },
        },
        "error": None,
    }


def _input(lines: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "Classify the support ticket in one word."},
                        {"role": "user", "content": f"Ticket {i}: my card was charged twice for one order."},
                    ],
                    "max_tokens": 16,
                },
            }
        )
        + b"\n"
        for i in range(lines)
    )


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def _gateway(workdir: Path, stub_url: str) -> tuple[subprocess.Popen[bytes], str, str]:
    import httpx

    key = "thr-bench-" + secrets.token_hex(8)
    config = {
        "storage": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "providers": {"up": {"kind": "openai", "base_url": stub_url, "api_key_env": "BENCH_UP_KEY"}},
        "models": {"gpt-4o-mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
        "tenants": {"bench": {"key_hashes": [hash_key(key)]}},
        "batch": {"poll_interval_s": 0.2},
    }
    path = workdir / "thrifty.yaml"
    path.write_text(yaml.safe_dump(config))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "thrifty", "serve", "--config", str(path), "--port", str(port)],
        env={**os.environ, "BENCH_UP_KEY": UPSTREAM_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base + "/v1", key
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise BenchError("thrifty serve did not start within 60 s")


def run_one(lines: int) -> dict[str, Any]:
    import openai

    stub = BatchStub()
    stub_url = stub.start()
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-batch-") as tmp:
        workdir = Path(tmp)
        proc, base_url, key = _gateway(workdir, stub_url)
        try:
            time.sleep(0.5)  # settle after start-up
            cpu0, rss0 = _proc_cpu_s(proc.pid), _proc_kb(proc.pid, "VmRSS")
            client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
            data = _input(lines)
            started = time.monotonic()
            uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while True:
                batch = client.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    break
                time.sleep(0.05)
            finished = time.monotonic()
            cpu = _proc_cpu_s(proc.pid) - cpu0
            peak = _proc_kb(proc.pid, "VmHWM")
            output = client.files.content(batch.output_file_id).content if batch.output_file_id else b""
        finally:
            proc.terminate()
            proc.wait(30)
            stub.stop()
        conn = sqlite3.connect(workdir / "ledger.db")
        rows = conn.execute("SELECT cost_usd, saved_usd FROM ledger WHERE batch = 1").fetchall()
        conn.close()
    if batch.status != "completed" or output.count(b"\n") != lines or len(rows) != lines:
        raise BenchError(f"the {lines}-line batch ended {batch.status} with {len(rows)} ledger rows")
    cost = sum((Decimal(c) for c, _ in rows), Decimal(0))
    realtime = cost + sum((Decimal(s) for _, s in rows), Decimal(0))
    assert stub.created_at is not None and stub.completed_at is not None
    return {
        "lines": lines,
        "submit_s": round(stub.created_at - started, 3),
        "collect_s": round(finished - stub.completed_at, 3),
        "total_s": round(finished - started, 3),
        "gateway_cpu_us_per_item": round(cpu / lines * 1e6, 1),
        "gateway_peak_rss_growth_mb": round(max(0, peak - rss0) / 1024, 1),
        "gateway_idle_rss_mb": round(rss0 / 1024, 1),
        "batch_cost_usd": decimal_text(cost),
        "realtime_cost_usd": decimal_text(realtime),
        "cost_ratio": decimal_text(cost / realtime) if realtime else None,
    }


def run_batch_bench(sizes: list[int], json_out: Path | None, console: Any) -> dict[str, Any]:
    from rich.table import Table

    results = [run_one(n) for n in sizes]
    table = Table(title="thrifty bench batch: one OpenAI batch job through thrifty serve to a batch stub")
    for name in (
        "lines",
        "submit s",
        "collect s",
        "CPU µs/item",
        "peak RSS +MB",
        "batch $",
        "real-time $",
        "ratio",
    ):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            f"{r['lines']:,}",
            f"{r['submit_s']:.2f}",
            f"{r['collect_s']:.2f}",
            f"{r['gateway_cpu_us_per_item']:.0f}",
            f"{r['gateway_peak_rss_growth_mb']:.1f}",
            r["batch_cost_usd"],
            r["realtime_cost_usd"],
            r["cost_ratio"] or "-",
        )
    console.print(table)
    worst = max(r["gateway_cpu_us_per_item"] for r in results)
    mark = "✓" if worst <= MAX_CPU_US_PER_ITEM else "✗"
    console.print(
        f"gateway CPU per item: at most {worst:.0f} µs (target ≤ {MAX_CPU_US_PER_ITEM:.0f} µs) {mark}"
    )
    if len(results) > 1:
        small, large = results[0], results[-1]
        console.print(
            f"peak memory over idle: {small['gateway_peak_rss_growth_mb']} MB at {small['lines']:,} lines, "
            f"{large['gateway_peak_rss_growth_mb']} MB at {large['lines']:,} lines"
        )
    report = {
        "results": results,
        "cpu_target_us": MAX_CPU_US_PER_ITEM,
        "cpu_ok": worst <= MAX_CPU_US_PER_ITEM,
    }
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report
