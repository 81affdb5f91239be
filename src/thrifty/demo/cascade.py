"""Demo phase: cascades on real recorded outputs, against always calling the strong model.

Every prompt goes to three places: `route:math` (a hand-made cascade: gpt-4o-mini drafts,
gemini-1.5-flash is asked the same question, gpt-4o answers when their `answer` fields differ),
`route:math-learned` (the same three models, driven by a router trained on recorded prompts the
demo does not send), and straight to gpt-4o. Every reply is scored against the prompt's reference
answer, and the ledger says what each cost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from thrifty.routing.train.extract import answer_key, normalise

CHEAP, STRONG, VOTER = "gpt-4o-mini", "gpt-4o", "gemini-1.5-flash"
UPSTREAM = {CHEAP: "gpt-4o-mini-2024-07-18", STRONG: "gpt-4o-2024-08-06", VOTER: "gemini-1.5-flash"}
ROUTE, LEARNED_ROUTE = "math", "math-learned"
ROUTE_SETTINGS: dict[str, Any] = {
    "model": CHEAP,
    "strategy": "cascade",
    "tiers": [CHEAP, STRONG],
    "gates": [{"kind": "agreement", "field": "answer", "voters": [VOTER]}],
}
FEATURE_CASCADE, FEATURE_LEARNED, FEATURE_BASELINE = "cascade", "learned-cascade", "always-gpt-4o"


def learned_route_settings(router_path: Path) -> dict[str, Any]:
    models = {upstream: alias for alias, upstream in UPSTREAM.items()}
    return {"model": CHEAP, "strategy": "cascade", "router": {"path": str(router_path), "models": models}}


def train_router(files: list[str], held_out: list[Prompt], out: Path) -> int:
    """Train on every recorded prompt except those the demo will send; the rows it learned from."""
    from thrifty.routing.train.data import Row, load_rows
    from thrifty.routing.train.fit import train

    sent = {p.text for p in held_out}
    pool = set(UPSTREAM.values())  # the ladder is learned over the models this gateway has
    rows = [
        Row(r.id, r.task, r.prompt, {m: c for m, c in r.calls.items() if m in pool})
        for r in load_rows(files)
        if r.prompt not in sent and pool <= set(r.calls)
    ]
    train(rows).save(out)
    return len(rows)


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    task: str
    reference: str


@dataclass
class Tally:
    correct: int = 0
    usd: Decimal = Decimal(0)
    escalated: int = 0


@dataclass
class CascadeStats:
    prompts: int = 0
    by_route: dict[str, Tally] = field(default_factory=dict)

    def tally(self, name: str) -> Tally:
        return self.by_route.setdefault(name, Tally())


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
    base_url: str,
    key: str,
    prompts: list[Prompt],
    progress: Callable[[], None],
    *,
    learned: bool,
    concurrency: int = 8,
) -> CascadeStats:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    stats = CascadeStats()
    semaphore = asyncio.Semaphore(concurrency)
    targets = [(f"route:{ROUTE}", FEATURE_CASCADE), (STRONG, FEATURE_BASELINE)]
    if learned:
        targets.insert(1, (f"route:{LEARNED_ROUTE}", FEATURE_LEARNED))

    async def ask(model: str, feature: str, prompt: Prompt) -> None:
        async with semaphore:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": prompt.text}],
                temperature=0,
                # The app knows what kind of work it asks for; routes calibrated per task use it.
                extra_headers={"x-thrifty-feature": feature, "x-thrifty-task": prompt.task},
            )
        tally = stats.tally(feature)
        tally.correct += correct(raw.parse().choices[0].message.content or "", prompt)
        tally.usd += Decimal(raw.headers["x-thrifty-cost-usd"])
        tally.escalated += raw.headers.get("x-thrifty-model") == STRONG and model != STRONG

    async def one(prompt: Prompt) -> None:
        await asyncio.gather(*(ask(model, feature, prompt) for model, feature in targets))
        stats.prompts += 1
        progress()

    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return stats


def summary(stats: CascadeStats, trained_on: int | None) -> list[str]:
    base = stats.by_route.get(FEATURE_BASELINE)
    if not stats.prompts or base is None or not base.correct or not base.usd:
        return ["cascade: no prompts answered"]
    lines = [
        f"cascades on {stats.prompts} prompts, scored against their reference answers "
        f"(always-{STRONG}: accuracy {base.correct / stats.prompts:.1%}, ${base.usd:.4f}):"
    ]
    names = {
        FEATURE_CASCADE: f"{CHEAP} → {STRONG} when {VOTER} disagrees",
        FEATURE_LEARNED: f"trained router ({trained_on} other recorded prompts)",
    }
    for feature, label in names.items():
        t = stats.by_route.get(feature)
        if t is None:
            continue
        lines.append(
            f"  {label}: accuracy {t.correct / stats.prompts:.1%} ({t.correct / base.correct:.1%} of "
            f"{STRONG}'s quality) at ${t.usd:.4f} ({t.usd / base.usd:.1%} of its cost), "
            f"escalated {t.escalated / stats.prompts:.1%}"
        )
    return lines
