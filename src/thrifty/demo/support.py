"""Demo phase: customer-support traffic on the semantic cache, with real Banking77 queries.

First askers (training queries) are answered upstream and cached; later askers (test queries,
other wordings) are answered from the cache when the decision rule is confident. The upstream
answer of each query is a canned reply for its intent, tagged with the intent, so the demo can
tell a correct hit from a wrong one: the queries are real, the answers are stand-ins. A RAG app
sends the ids of the articles it retrieved in `x-thrifty-evidence`; here, the intent's article.
"""

from __future__ import annotations

import asyncio
import csv
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from thrifty.settings import Settings

DEFAULT_DATA = Path("../shared/data/cache/banking77")
ROUTE = "support"
MODEL, UPSTREAM = "gpt-4o-mini", "gpt-4o-mini-2024-07-18"
# Live verification: a sampled share of paraphrase hits is asked upstream again after the cached
# answer went out, and the fresh answer compared as text (the stand-in answers name their intent).
ROUTE_SETTINGS: dict[str, Any] = {
    "model": MODEL,
    # max_rate: a short demo verifies a fifth of its hits while learning (the default is a tenth).
    "semantic_cache": {"ttl_s": 86400, "verify": {"compare": "text", "max_rate": 0.2}},
}
SYSTEM = "You are the support assistant of Acme Bank. Answer from the help-centre articles."

# Stand-in support questions by intent, first of each the one cached (also the simulate workload's).
SYNTHETIC_QUESTIONS = {
    "card_arrival": [
        "When will my new card arrive?",
        "My card still hasn't come",
        "How long does card delivery take?",
    ],
    "lost_card": ["I lost my card", "My card is missing, what do I do?", "Help, I can't find my bank card"],
    "change_pin": ["How do I change my PIN?", "I want a new PIN number", "Can I reset the PIN of my card?"],
    "exchange_rate": [
        "What exchange rate do you use?",
        "How are currency rates calculated?",
        "Is the FX rate fair?",
    ],
    "top_up_failed": [
        "My top-up failed",
        "Why did adding money to my account fail?",
        "Top up didn't go through",
    ],
    "refund_status": [
        "Where is my refund?",
        "I'm still waiting on a refund",
        "When will the refund show up?",
    ],
}


@dataclass(frozen=True, slots=True)
class Query:
    text: str
    intent: str


@dataclass
class SupportWorkload:
    seeds: list[Query]
    lookups: list[Query]
    synthetic: bool
    source: str


@dataclass
class SupportStats:
    lookups: int = 0
    hits: int = 0
    correct_hits: int = 0


def _read(path: Path) -> list[Query]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [Query(row["text"], row["category"]) for row in csv.DictReader(fh)]


def load_support(data: Path | None, seeds: int, lookups: int, seed: int = 5) -> SupportWorkload:
    rng = random.Random(seed)
    if data is not None and (data / "train.csv").exists() and (data / "test.csv").exists():
        train, test = _read(data / "train.csv"), _read(data / "test.csv")
        rng.shuffle(train)
        rng.shuffle(test)
        return SupportWorkload(train[:seeds], test[:lookups], False, str(data))
    pairs = [Query(text, intent) for intent, texts in SYNTHETIC_QUESTIONS.items() for text in texts]
    firsts = [q for q in pairs if q.text == SYNTHETIC_QUESTIONS[q.intent][0]]
    # The same questions again in other case and punctuation: repeats, answered however small the cache.
    repeats = [Query(q.text.lower().rstrip("?") + " ??", q.intent) for q in firsts]
    later = [q for q in pairs if q not in firsts] + repeats
    return SupportWorkload(firsts, later, True, "built-in synthetic FAQ")


def canned_answer(intent: str) -> str:
    return f"[{intent}] Please see our help-centre article on {intent.replace('_', ' ')}."


def write_recordings(workload: SupportWorkload, path: Path) -> None:
    """What the upstream model 'answers' to each query the demo will send: its intent's reply."""
    with path.open("wb") as fh:
        for q in {q.text: q for q in [*workload.seeds, *workload.lookups]}.values():
            row = {"prompt": q.text, "responses": {UPSTREAM: {"output": canned_answer(q.intent)}}}
            fh.write(orjson.dumps(row) + b"\n")


async def drive_support(
    base_url: str, key: str, workload: SupportWorkload, progress: Callable[[], None], concurrency: int = 8
) -> SupportStats:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    stats = SupportStats()
    semaphore = asyncio.Semaphore(concurrency)

    async def ask(query: Query) -> tuple[str, str]:
        async with semaphore:
            raw = await client.chat.completions.with_raw_response.create(
                model=f"route:{ROUTE}",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": query.text}],
                temperature=0,
                extra_headers={"x-thrifty-feature": "support", "x-thrifty-evidence": f"kb-{query.intent}"},
            )
        progress()
        return raw.headers["x-thrifty-cache"], raw.parse().choices[0].message.content or ""

    await asyncio.gather(*(ask(q) for q in workload.seeds))
    for query, (cache, reply) in zip(
        workload.lookups, await asyncio.gather(*(ask(q) for q in workload.lookups)), strict=True
    ):
        stats.lookups += 1
        if cache == "semantic":
            stats.hits += 1
            stats.correct_hits += reply.startswith(f"[{query.intent}]")
    await client.close()
    return stats


def summary(stats: SupportStats, seeds: int, saved_usd: Decimal, min_entries: int) -> str:
    if not stats.lookups:
        return "semantic cache: no lookups"
    precision = stats.correct_hits / stats.hits if stats.hits else 1.0
    line = (
        f"semantic cache: {seeds} first askers answered upstream and cached; of {stats.lookups} later "
        f"askers in other words, {stats.hits / stats.lookups:.1%} answered from the cache at "
        f"{precision:.2%} precision ({stats.hits - stats.correct_hits} wrong), saving ${saved_usd:.6f}"
    )
    if seeds < min_entries:
        line += (
            f" (a cache this small, below min_entries {min_entries}, answers only repeats of a cached "
            "question: in a sparse cache the nearest entry is often a neighbouring question)"
        )
    return line


def verification_summary(conn: sqlite3.Connection, settings: Settings) -> str | None:
    """What verification did on the support route, from the ledger and the partition state the
    gateway wrote at shutdown (what `thrifty cache stats` reads)."""
    from thrifty.cache.semantic.stage import load_params
    from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
    from thrifty.cache.semantic.stats import partition_stats

    semantic = settings.routes[ROUTE].semantic_cache
    if semantic is None or semantic.verify is None:
        return None
    states = SqlitePartitionStateStore(conn).rows(route=ROUTE)
    counts = dict(
        conn.execute("SELECT partition, count(*) FROM semantic_cache GROUP BY partition").fetchall()
    )
    rows = partition_stats(
        [(p, st) for p, st, _ in states], {ROUTE: semantic.verify}, {ROUTE: load_params(semantic)}, counts
    )
    parts = [r for r in rows if r.partition != "all"]
    if not sum(r.paraphrase_hits for r in parts):
        return None  # below min_entries only repeats are answered, and repeats are not verified
    ledger_rows, cost = conn.execute(
        "SELECT count(*), group_concat(cost_usd, ' ') FROM ledger "
        "WHERE route = ? AND request_id LIKE '%.verify'",
        (ROUTE,),
    ).fetchone()
    verify_cost = sum((Decimal(c) for c in (cost or "").split()), Decimal(0))
    top = max(parts, key=lambda r: r.lookups)
    shown = "paraphrases off" if top.threshold is None else f"threshold {top.threshold:.4f}"
    verified = sum(r.verifications for r in parts)
    wrong = sum(r.verified_wrong for r in parts)
    hits = sum(r.paraphrase_hits for r in parts)
    line = (
        f"semantic verification: {verified} of the route's {hits} paraphrase hits (first askers' "
        "included) asked upstream again after the "
        f"cached answer was sent (off the response path; {ledger_rows} ledger rows <id>.verify, role "
        f"verify, ${verify_cost:.6f}), {wrong} found wrong; the partition is {top.status} at {shown}"
    )
    if top.sample_rate is not None:
        line += f", verifying {top.sample_rate:.0%} of hits"
    return line + f"; saving net of verification ${sum((r.net_saved_usd for r in parts), Decimal(0)):.6f}"
