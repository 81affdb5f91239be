"""Demo phase: a cascade on real recorded outputs, against always calling the strong model.

Every prompt goes to `route:math` (gpt-4o-mini drafts, gemini-1.5-flash is asked the same question,
and gpt-4o answers when their `answer` fields differ) and, for comparison, straight to gpt-4o.
Both replies are scored against the prompt's reference answer, and the ledger says what each cost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from thrifty.routing.train.extract import answer_key, normalise

CHEAP, STRONG, VOTER = "gpt-4o-mini", "gpt-4o", "gemini-1.5-flash"
UPSTREAM = {CHEAP: "gpt-4o-mini-2024-07-18", STRONG: "gpt-4o-2024-08-06", VOTER: "gemini-1.5-flash"}
ROUTE = "math"
ROUTE_SETTINGS: dict[str, Any] = {
    "model": CHEAP,
    "strategy": "cascade",
    "tiers": [CHEAP, STRONG],
    "gates": [{"kind": "agreement", "field": "answer", "voters": [VOTER]}],
}
FEATURE_CASCADE, FEATURE_BASELINE = "cascade", "always-gpt-4o"


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    task: str
    reference: str


@dataclass
class CascadeStats:
    prompts: int = 0
    cascade_correct: int = 0
    baseline_correct: int = 0
    escalated: int = 0
    cascade_usd: Decimal = Decimal(0)
    baseline_usd: Decimal = Decimal(0)


def load_prompts(files: list[str], n: int, seed: int = 11) -> list[Prompt]:
    """`n` random recorded prompts that have outputs of all three models."""
    out: list[Prompt] = []
    for file in files:
        for line in Path(file).read_bytes().splitlines():
            row = orjson.loads(line)
            if all(m in row.get("responses", {}) for m in UPSTREAM.values()):
                out.append(Prompt(row["prompt"], row.get("task", ""), str(row.get("reference", ""))))
    random.Random(seed).shuffle(out)
    return out[:n]


def correct(reply: str, prompt: Prompt) -> bool:
    expected = normalise(prompt.reference, prompt.task)
    return expected is not None and answer_key(reply, prompt.task) == expected


async def drive_cascade(
    base_url: str, key: str, prompts: list[Prompt], progress: Callable[[], None], concurrency: int = 8
) -> CascadeStats:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    stats = CascadeStats()
    semaphore = asyncio.Semaphore(concurrency)

    async def ask(model: str, feature: str, prompt: Prompt) -> tuple[bool, Decimal, bool]:
        async with semaphore:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": prompt.text}],
                temperature=0,
                extra_headers={"x-thrifty-feature": feature},
            )
        reply = raw.parse().choices[0].message.content or ""
        escalated = raw.headers.get("x-thrifty-model") == STRONG and model != STRONG
        return correct(reply, prompt), Decimal(raw.headers["x-thrifty-cost-usd"]), escalated

    async def one(prompt: Prompt) -> None:
        (c_ok, c_usd, escalated), (b_ok, b_usd, _) = await asyncio.gather(
            ask(f"route:{ROUTE}", FEATURE_CASCADE, prompt), ask(STRONG, FEATURE_BASELINE, prompt)
        )
        stats.prompts += 1
        stats.cascade_correct += c_ok
        stats.baseline_correct += b_ok
        stats.escalated += escalated
        stats.cascade_usd += c_usd
        stats.baseline_usd += b_usd
        progress()

    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return stats


def summary(stats: CascadeStats) -> str:
    if not stats.prompts or not stats.baseline_correct or not stats.baseline_usd:
        return "cascade: no prompts answered"
    return (
        f"cascade {CHEAP} → {STRONG} (gate: {VOTER} agrees on the answer), {stats.prompts} recorded prompts: "
        f"accuracy {stats.cascade_correct / stats.prompts:.1%} vs always-{STRONG} "
        f"{stats.baseline_correct / stats.prompts:.1%} "
        f"({stats.cascade_correct / stats.baseline_correct:.1%} of its quality) at "
        f"${stats.cascade_usd:.4f} vs ${stats.baseline_usd:.4f} "
        f"({stats.cascade_usd / stats.baseline_usd:.1%} of its cost); "
        f"escalated {stats.escalated / stats.prompts:.1%}"
    )
