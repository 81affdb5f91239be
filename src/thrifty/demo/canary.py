"""Demo phase: a canary with feedback. `route:answers` sends 20% of its users (sticky by user) to
gpt-4o-mini and the rest to gpt-4o; every reply is scored against the prompt's reference answer
and the score goes back as feedback (`POST /v1/thrifty/feedback`), so the per-arm numbers join
quality to cost, and the stop rule says whether the canary is shown worse."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thrifty.demo.cascade import CHEAP, STRONG, Prompt, correct

ROUTE = "answers"
FEATURE = "canary"
ROUTE_SETTINGS: dict[str, Any] = {
    "model": STRONG,
    "experiment": {
        "baseline": "control",
        "variants": {"control": {"weight": 80}, "canary": {"weight": 20, "model": CHEAP}},
        "stop": {"min_requests": 20},
    },
}


async def drive_canary(
    base_url: str, key: str, prompts: list[Prompt], progress: Callable[[], None], concurrency: int = 8
) -> int:
    """Each prompt from its own user; feedback `correct` from the reference answer. Requests sent."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    http = httpx.AsyncClient(base_url=base_url, headers={"authorization": f"Bearer {key}"}, timeout=30)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: Prompt) -> None:
        async with semaphore:
            raw = await client.chat.completions.with_raw_response.create(
                model=f"route:{ROUTE}",
                messages=[{"role": "user", "content": prompt.text}],
                temperature=0,
                extra_headers={"x-thrifty-user": f"student-{i}", "x-thrifty-feature": FEATURE},
            )
            ok = correct(raw.parse().choices[0].message.content or "", prompt)
            await http.post(
                "/thrifty/feedback", json={"request_id": raw.headers["x-thrifty-request-id"], "correct": ok}
            )
        progress()

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    await client.close()
    await http.aclose()
    return len(prompts)


def summary(settings: Any, db_path: Path) -> list[str]:
    from thrifty.experiments import actions
    from thrifty.stores.factory import open_experiment_store

    store = open_experiment_store(settings)
    try:
        found = actions.report(settings, store, ROUTE)
    finally:
        store.close()
    lines = [
        f"canary on route:{ROUTE} (20% of users on {CHEAP}, sticky by user; feedback from the references):"
    ]
    for name, s in found.stats.items():
        cps = s.cost_per_success
        model = CHEAP if name == "canary" else STRONG
        lines.append(
            f"  {name} ({model}): {s.requests} requests, success {s.success_rate or 0:.1%}, "
            f"cost per success ${cps:.6f}"
            if cps is not None
            else f"  {name} ({model}): {s.requests} requests"
        )
    decision = found.decisions.get("canary")
    if decision is not None:
        lines.append(f"  stop rule: {'STOP — ' if decision.stop else ''}{decision.reason}")
    return lines
