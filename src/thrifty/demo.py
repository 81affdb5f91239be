"""`thrifty demo`: the gateway on loopback, real SDK traffic from two tenants, and the report.

With the shared ZeroEval data (real outputs of real models) the replay provider answers; without
it, a small built-in workload is written to a temporary file and the output says "synthetic".
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from thrifty.settings import Settings, settings_from_mapping

DEFAULT_DATA = Path("../shared/data/routing/zeroeval")
TENANTS = ("acme", "globex")
FEATURES = ("homework-help", "code-tutor", "grading")
MODELS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}


_REPEATS = "SELECT count(*) FROM ledger WHERE saved_usd IS NOT NULL AND cache = 'miss'"


@dataclass
class DemoWorkload:
    data_paths: list[str]
    prompts: list[str]
    synthetic: bool
    source: str


def _synthetic_rows() -> list[dict[str, Any]]:
    rng = random.Random(7)
    rows = []
    for i in range(60):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        prompt = f"What is {a} plus {b}? Answer in JSON with fields reasoning and answer."
        outputs = {
            model: {"output": f'{{"reasoning": "{a} + {b} = {a + b}", "answer": "{a + b}"}}', "correct": 1}
            for model in MODELS.values()
        }
        rows.append(
            {
                "id": f"synthetic-{i}",
                "task": "synthetic",
                "prompt": prompt,
                "reference": str(a + b),
                "responses": outputs,
            }
        )
    return rows


def load_workload(data: Path | None, workdir: Path) -> DemoWorkload:
    if data is not None and data.exists():
        files = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
        prompts = []
        for file in files:
            with file.open("rb") as fh:
                for line in fh:
                    row = orjson.loads(line)
                    if all(m in row.get("responses", {}) for m in MODELS.values()):
                        prompts.append(row["prompt"])
        return DemoWorkload([str(f) for f in files], prompts, False, str(data))
    path = workdir / "synthetic.jsonl"
    rows = _synthetic_rows()
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return DemoWorkload([str(path)], [r["prompt"] for r in rows], True, "built-in synthetic workload")


def demo_settings(workload: DemoWorkload, db_path: Path) -> Settings:
    return settings_from_mapping(
        {
            "storage": {"url": f"sqlite:///{db_path}"},
            "providers": {"replay": {"kind": "replay", "data": workload.data_paths}},
            "models": {
                alias: {"provider": "replay", "upstream": upstream, "context_window": 128000}
                for alias, upstream in MODELS.items()
            },
            # The tutor route caches exact repeats: popular questions are asked again and again.
            "routes": {"tutor": {"model": "gpt-4o-mini", "max_input_tokens": 4000, "cache": {"ttl_s": 3600}}},
            # globex's small daily budget shows worst-case reservations turning requests away (429).
            "tenants": {"acme": {}, "globex": {"budget": {"usd_per_day": "0.03"}}},
        },
        source="demo settings",
    )


@dataclass
class DemoStats:
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    idempotent_repeats: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    header_costs: list[str] = field(default_factory=list)


async def drive(
    base_url: str,
    keys: dict[str, str],
    prompts: list[str],
    n: int,
    progress: Callable[[], None],
    concurrency: int = 16,
    seed: int = 1,
) -> DemoStats:
    """Send `n` requests with the official OpenAI SDK, as the two tenants' apps would."""
    import openai

    rng = random.Random(seed)
    clients = {t: openai.AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0) for t, k in keys.items()}
    stats = DemoStats()
    semaphore = asyncio.Semaphore(concurrency)
    plan: list[tuple[str, str, str, str, bool, str]] = []
    for i in range(n):
        tenant = TENANTS[i % 2]
        feature = FEATURES[rng.randrange(3)]
        model = rng.choice(["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "route:tutor"])
        # A third of the tutor traffic is the same few popular questions (answered from the cache).
        prompt = (
            rng.choice(prompts[:8]) if model == "route:tutor" and rng.random() < 0.35 else rng.choice(prompts)
        )
        if i % 97 == 13:
            prompt = "A question nobody recorded an answer to."  # shows a clean 404 in the ledger
        if i % 10 in (8, 9):
            # A client retrying its request of two steps before (same tenant) with the same
            # Idempotency-Key: answered from that generation, no new call, no charge.
            plan.append(plan[i - 2])
            continue
        plan.append((tenant, feature, model, prompt, i % 2 == 1, f"demo-{i}"))

    async def one(tenant: str, feature: str, model: str, prompt: str, stream: bool, key: str) -> None:
        client = clients[tenant]
        headers = {"x-thrifty-feature": feature, "x-thrifty-prompt-version": "v1", "Idempotency-Key": key}
        async with semaphore:
            started = time.perf_counter()
            try:
                if stream:
                    events = await client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": prompt}],
                        stream=True,
                        max_tokens=600,
                        temperature=0,
                        extra_headers=headers,
                    )
                    async for _ in events:
                        pass
                else:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=model,
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=600,
                        temperature=0,
                        extra_headers=headers,
                    )
                    raw.parse()
                    stats.header_costs.append(raw.headers.get("x-thrifty-cost-usd", ""))
                stats.ok += 1
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            except openai.APIError as err:
                key = f"{getattr(err, 'status_code', 'stream')} {type(err).__name__}"
                stats.errors[key] = stats.errors.get(key, 0) + 1
            finally:
                stats.sent += 1
                progress()

    await asyncio.gather(*(one(*p) for p in plan))
    for client in clients.values():
        await client.close()
    return stats


def run_demo(data: Path | None, requests: int, db: Path | None, print_fn: Callable[[Any], None]) -> int:
    from rich.progress import Progress

    from thrifty.report import build_report, render_table, totals
    from thrifty.server.run import BackgroundServer
    from thrifty.stores.keys import SqliteKeyStore
    from thrifty.stores.sqlite_db import open_database

    with tempfile.TemporaryDirectory(prefix="thrifty-demo-") as tmp:
        workdir = Path(tmp)
        db_path = db or workdir / "demo.db"
        workload = load_workload(data, workdir)
        label = (
            "SYNTHETIC (built-in workload; real data not found)"
            if workload.synthetic
            else "real recorded outputs"
        )
        print_fn(
            f"[bold]thrifty demo[/bold] — data: {workload.source} ({label}), {len(workload.prompts)} prompts"
        )
        settings = demo_settings(workload, db_path)
        conn = open_database(db_path)
        keystore = SqliteKeyStore(conn)
        keys = {t: keystore.create(t, label="demo") for t in TENANTS}
        started = time.perf_counter()
        with BackgroundServer(settings) as server:
            print_fn(f"gateway on {server.base_url} (embedded SQLite ledger {db_path})")
            with Progress(transient=True) as progress:
                task = progress.add_task("requests", total=requests)
                stats = asyncio.run(
                    drive(server.base_url, keys, workload.prompts, requests, lambda: progress.advance(task))
                )
        elapsed = time.perf_counter() - started
        print_fn(
            f"sent {stats.sent} requests in {elapsed:.1f}s: {stats.ok} ok, errors "
            f"{stats.errors or 'none'}; client-side latency p50 "
            f"{statistics.median(stats.latencies_ms):.1f} ms"
        )
        for by in ("tenant", "feature", "route", "model"):
            print_fn(render_table(build_report(conn, by), by, title=f"spend by {by}"))
        total = totals(build_report(conn, "tenant"))
        print_fn(
            f"budgets: {total.rejected_budget} requests refused with 429 before any spend (globex's "
            f"${settings.tenants['globex'].budget.usd_per_day}/day, reserved at worst case: prompt + "  # type: ignore[union-attr]
            f"max_tokens=600); answered without an upstream call: "
            f"{total.cache_hits} from the exact cache and "
            f"{conn.execute(_REPEATS).fetchone()[0]} idempotent repeats, saving ${total.saved_usd:.6f}"
        )
        for (message,) in conn.execute("SELECT message FROM alerts ORDER BY ts"):
            print_fn(f"alert: {message}")
        (ledger_rows,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
        conn.close()
        print_fn(f"ledger rows: {ledger_rows} (one per request that passed authentication)")
        return 0 if stats.ok > 0 and ledger_rows == stats.sent else 1
