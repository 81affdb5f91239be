"""`thrifty bench batch`: a large batch job through a real `thrifty serve` to the wire fakes of
OpenAI's Batch API and Anthropic's Message Batches, one job per provider and size.

The fakes are the suite's own (tests/fakes: the providers' state machines, request validation and
result formats; so the bench runs from a source checkout). They run on a thread of this process;
what is measured is the gateway process alone (from /proc): CPU per item, peak resident memory
over its idle size, time to submit (upload until the provider has the batch) and to collect (the
provider's batch ended until the job is completed, every item in the ledger), and the cost of the
items against the same items at real-time prices, which must be exactly the configured discount.
Two job sizes show whether memory grows with the job (it must not: files and results stream).
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml

from thrifty.bench.loadgen import BenchError
from thrifty.stores.keys import hash_key
from thrifty.types import decimal_text

MAX_CPU_US_PER_ITEM = 500.0
UPSTREAM_KEY = "sk-bench-batch"
PROMPT_TOKENS, COMPLETION_TOKENS = 60, 20
DISCOUNT = Decimal("0.5")  # providers.*.batch_discount in the bench's settings
T = TypeVar("T")


@dataclass(frozen=True)
class Side:
    """One provider as the bench drives it."""

    provider: str
    kind: str
    model: str  # the alias the job's lines name
    upstream: str
    basis: str  # where its batch price comes from


SIDES = {
    # genai-prices has gpt-4o-mini's batch price (half its real-time price).
    "openai": Side("oa", "openai", "gpt-4o-mini", "gpt-4o-mini", "genai-prices batch price"),
    # genai-prices has no batch price for claude-3-5-haiku: the configured batch_discount applies.
    "anthropic": Side("an", "anthropic", "claude-haiku", "claude-3-5-haiku-latest", "batch_discount 0.5"),
}


def _fakes() -> Any:
    """The suite's wire fakes (tests/fakes beside src/ in a source checkout)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "tests" / "fakes" / "openai_batch_wire.py").is_file():
        raise BenchError(
            "thrifty bench batch drives the wire fakes in tests/fakes: run it from a source checkout "
            "(pip install -e .)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # By name: they are test code, outside the package (and its type checking).
    return tuple(
        importlib.import_module(f"tests.fakes.{name}")
        for name in ("openai_batch_wire", "openai_wire", "anthropic_batch_wire", "anthropic_wire")
    )


class Fakes:
    """Both providers' batch fakes on a loop thread, answering every request with a fixed usage."""

    def __init__(self) -> None:
        openai_fake, openai_wire, anthropic_fake, anthropic_wire = _fakes()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.openai = openai_fake.OpenAIBatchWireServer(api_key=UPSTREAM_KEY)
        self.openai.default = openai_wire.Reply(
            text="Billing.", prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS
        )
        self.anthropic = anthropic_fake.AnthropicBatchWireServer(api_key=UPSTREAM_KEY)
        self.anthropic.default_reply = anthropic_wire.Reply(
            text="Billing.", input_tokens=PROMPT_TOKENS, output_tokens=COMPLETION_TOKENS
        )
        self.created_at: float | None = None
        for fake in (self.openai, self.anthropic):
            fake.on_create = self._created
            self._run(fake.start())

    def _created(self, batch: Any) -> None:
        self.created_at = time.monotonic()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def url(self, side: Side) -> str:
        return str(self.openai.base_url if side.kind == "openai" else self.anthropic.base_url)

    def ended(self, side: Side) -> bool:
        """Whether the provider has ended the job's batch (read from the fake's state)."""
        if side.kind == "openai":
            return any(b.status == "completed" for b in list(self.openai.batches.values()))
        return any(b.status == "ended" for b in list(self.anthropic.batches.values()))

    def reset(self) -> None:
        self.created_at = None
        for fake in (self.openai, self.anthropic):
            fake.batches.clear()
            fake.requests.clear()
        self.openai.files.clear()

    def stop(self) -> None:
        for fake in (self.openai, self.anthropic):
            self._run(fake.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _input(lines: int, model: str) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
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


def _gateway(workdir: Path, fakes: Fakes) -> tuple[subprocess.Popen[bytes], str, str]:
    import httpx

    key = "thr-bench-" + secrets.token_hex(8)
    config = {
        "storage": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "providers": {
            side.provider: {
                "kind": side.kind,
                "base_url": fakes.url(side),
                "api_key_env": "BENCH_UP_KEY",
                "batch_discount": str(DISCOUNT),
            }
            for side in SIDES.values()
        },
        "models": {
            side.model: {"provider": side.provider, "upstream": side.upstream} for side in SIDES.values()
        },
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


def run_one(fakes: Fakes, side: Side, lines: int) -> dict[str, Any]:
    import openai

    fakes.reset()
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-batch-") as tmp:
        workdir = Path(tmp)
        proc, base_url, key = _gateway(workdir, fakes)
        try:
            time.sleep(0.5)  # settle after start-up
            cpu0, rss0 = _proc_cpu_s(proc.pid), _proc_kb(proc.pid, "VmRSS")
            client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
            data = _input(lines, side.model)
            started = time.monotonic()
            uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            provider_ended: float | None = None
            while True:
                if provider_ended is None and fakes.ended(side):
                    provider_ended = time.monotonic()
                batch = client.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    break
                time.sleep(0.1)  # a client polling faster would be measured as the gateway's CPU
            finished = time.monotonic()
            cpu = _proc_cpu_s(proc.pid) - cpu0
            peak = _proc_kb(proc.pid, "VmHWM")
            answered = 0
            if batch.output_file_id:
                answered = client.files.content(batch.output_file_id).content.count(b"\n")
        finally:
            proc.terminate()
            proc.wait(30)
        conn = sqlite3.connect(workdir / "ledger.db")
        rows = conn.execute("SELECT cost_usd, saved_usd FROM ledger WHERE batch = 1").fetchall()
        conn.close()
    if batch.status != "completed" or answered != lines or len(rows) != lines:
        raise BenchError(
            f"the {lines}-line {side.kind} batch ended {batch.status} with {answered} answers and "
            f"{len(rows)} ledger rows"
        )
    if fakes.created_at is None or provider_ended is None:
        raise BenchError(f"the {side.kind} fake never received (or never ended) the batch")
    cost = sum((Decimal(c) for c, _ in rows), Decimal(0))
    realtime = cost + sum((Decimal(s) for _, s in rows), Decimal(0))
    ratio = cost / realtime if realtime else None
    return {
        "provider": side.kind,
        "model": side.upstream,
        "price_basis": side.basis,
        "lines": lines,
        "submit_s": round(fakes.created_at - started, 3),
        "collect_s": round(finished - provider_ended, 3),
        "total_s": round(finished - started, 3),
        "gateway_cpu_us_per_item": round(cpu / lines * 1e6, 1),
        "gateway_peak_rss_growth_mb": round(max(0, peak - rss0) / 1024, 1),
        "gateway_idle_rss_mb": round(rss0 / 1024, 1),
        "batch_cost_usd": decimal_text(cost),
        "realtime_cost_usd": decimal_text(realtime),
        "cost_ratio": decimal_text(ratio) if ratio is not None else None,
        "expected_ratio": decimal_text(1 - DISCOUNT),
        "ratio_exact": ratio == 1 - DISCOUNT,
    }


def run_batch_bench(
    sizes: list[int], json_out: Path | None, console: Any, providers: list[str] | None = None
) -> dict[str, Any]:
    from rich.table import Table

    sides = [SIDES[name] for name in providers or list(SIDES)]
    fakes = Fakes()
    try:
        results = [run_one(fakes, side, n) for side in sides for n in sizes]
    finally:
        fakes.stop()
    table = Table(
        title="thrifty bench batch: one batch job through thrifty serve to each provider's wire fake"
    )
    for name in (
        "provider",
        "lines",
        "submit s",
        "collect s",
        "CPU µs/item",
        "peak RSS +MB",
        "batch $",
        "real-time $",
        "ratio",
    ):
        table.add_column(name, justify="left" if name == "provider" else "right")
    for r in results:
        table.add_row(
            r["provider"],
            f"{r['lines']:,}",
            f"{r['submit_s']:.2f}",
            f"{r['collect_s']:.2f}",
            f"{r['gateway_cpu_us_per_item']:.0f}",
            f"{r['gateway_peak_rss_growth_mb']:.1f}",
            r["batch_cost_usd"],
            r["realtime_cost_usd"],
            (r["cost_ratio"] or "-") + (" ✓" if r["ratio_exact"] else " ✗"),
        )
    console.print(table)
    worst = max(r["gateway_cpu_us_per_item"] for r in results)
    mark = "✓" if worst <= MAX_CPU_US_PER_ITEM else "✗"
    console.print(
        f"gateway CPU per item: at most {worst:.0f} µs (target ≤ {MAX_CPU_US_PER_ITEM:.0f} µs) {mark}"
    )
    exact = all(r["ratio_exact"] for r in results)
    console.print(
        f"cost vs the same items in real time: {'exactly' if exact else 'NOT'} "
        f"{decimal_text(1 - DISCOUNT)} (batch_discount {DISCOUNT}; genai-prices' batch price for OpenAI)"
    )
    for side in sides:
        mine = [r for r in results if r["provider"] == side.kind]
        if len(mine) > 1:
            console.print(
                f"{side.kind} peak memory over idle: "
                + ", ".join(f"{r['gateway_peak_rss_growth_mb']} MB at {r['lines']:,} lines" for r in mine)
            )
    report = {
        "results": results,
        "cpu_target_us": MAX_CPU_US_PER_ITEM,
        "cpu_ok": worst <= MAX_CPU_US_PER_ITEM,
        "cost_ratio_exact": exact,
    }
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report
