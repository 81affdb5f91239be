"""Demo phase: mixed traffic from two tenants' apps (models, a cached route, streams, retries,
budgets), answered by the replay provider from real recorded outputs, or from a small built-in
workload written to a temporary file (then the output says "synthetic")."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

TENANTS = ("acme", "globex")
FEATURES = ("homework-help", "code-tutor", "grading")
MODELS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}
# The synthetic rows also answer for the cascade's voter.
_SYNTHETIC_MODELS = (*MODELS.values(), "gemini-1.5-flash")


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
        # gpt-4o-mini slips on every sixth sum, so the cascade's voter disagrees and it escalates.
        outputs = {}
        for model in _SYNTHETIC_MODELS:
            slip = int(model.startswith("gpt-4o-mini") and i % 6 == 0)
            answer = f'{{"reasoning": "{a} + {b}", "answer": "{a + b + slip}"}}'
            outputs[model] = {"output": answer, "correct": 1 - slip}
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
