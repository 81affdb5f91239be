"""Context budgets through the real gateway, driven by the openai SDK; the provider is a wire fake.

The summary route's model is `selfhosted` (upstream `llama-3.1-8b-local`), so the fake tells summary
calls from answers by the model they name.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.gateway import Gateway
from thrifty.pipeline import Completion
from thrifty.report import build_report
from thrifty.server.run import BackgroundServer

SUMMARY_MODEL = "llama-3.1-8b-local"
# One o200k token each, also repeated: a message of 50 of them counts 54 tokens with its framing.
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "house",
    "music",
    "paper",
    "table",
    "water",
    "light",
    "night",
    "bread",
    "chair",
    "plant",
    "glass",
    "metal",
]
USER, ASSISTANT = WORDS[0::2], WORDS[1::2]


def words(n: int, word: str) -> str:
    return " ".join([word] * n)


def settings_for(tmp_path: Path, upstream: OpenAIWireServer, **route: Any) -> Any:
    context = {
        "history": {
            "budget": 300,
            "over": "compact",
            "summary_route": "cheap",
            "summary_tokens": 40,
            "turns_per_summary": 1,
        },
        "retrieved": {"budget": 60},
    }
    return base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url, "timeout_s": 5}},
        models=openai_models(),
        routes={
            "chat": {"model": "gpt-4o-mini", "context": context, **route},
            "cheap": {"model": "selfhosted"},
            "plain": {"model": "gpt-4o-mini"},
            "brief": {"model": "gpt-4o-mini", "context": {"output": {"budget": 50, "brevity": True}}},
        },
        resilience={"max_retries": 0},
    )


@pytest.fixture
def server(tmp_path: Path, openai_upstream: OpenAIWireServer) -> Iterator[BackgroundServer]:
    with BackgroundServer(settings_for(tmp_path, openai_upstream), secrets={"up": UPSTREAM_KEY}) as s:
        yield s


def client(server: BackgroundServer, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0, timeout=20)


def summary_calls(upstream: OpenAIWireServer) -> list[dict[str, Any]]:
    return [r for r in upstream.requests if r["model"] == SUMMARY_MODEL]


def answers(upstream: OpenAIWireServer) -> list[dict[str, Any]]:
    return [r for r in upstream.requests if r["model"] != SUMMARY_MODEL]


def chat(c: openai.OpenAI, messages: list[dict[str, Any]], stream: bool = False) -> None:
    if stream:
        for _ in c.chat.completions.create(model="route:chat", messages=messages, stream=True):  # type: ignore[call-overload]
            pass
    else:
        c.chat.completions.create(model="route:chat", messages=messages)  # type: ignore[call-overload]


def conversation(turns: int) -> list[list[dict[str, Any]]]:
    """The request of every turn of one chat: each user and assistant message is 54 tokens."""
    requests, history = [], []
    for t in range(turns):
        history = [*history, {"role": "user", "content": words(50, USER[t])}]
        requests.append(history)
        history = [*history, {"role": "assistant", "content": words(50, ASSISTANT[t])}]
    return requests


@pytest.mark.parametrize("stream", [False, True])
def test_history_compacted_once_and_reused_turn_after_turn(
    server: BackgroundServer, openai_upstream: OpenAIWireServer, tmp_path: Path, stream: bool
) -> None:
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="S1: the user counted", completion_tokens=7)]
    c = client(server)
    made: list[int] = []
    for request in conversation(5):
        chat(c, request, stream)
        made.append(len(summary_calls(openai_upstream)))
    # Turns 1-3 fit in 300 tokens; turn 4 ages out the oldest turns, leaving room for turn 5.
    assert made == [0, 0, 0, 1, 1]
    last = answers(openai_upstream)[-1]["messages"]
    assert last[0]["role"] == "system" and last[0]["content"].startswith("Summary of the ")
    assert "S1: the user counted" in last[0]["content"]
    assert all(USER[0] not in str(m["content"]) for m in last[1:])  # the oldest turns are gone
    assert last[-1]["content"] == words(50, USER[4])
    rows = ledger_rows(tmp_path / "ledger.db")
    assert len(rows) == 5
    fourth = rows[3]
    attempts = orjson.loads(fourth["attempts"])
    assert [a["role"] for a in attempts] == ["compaction", "answer"]
    assert attempts[0]["model"] == "selfhosted" and Decimal(attempts[0]["cost_usd"]) > 0
    assert Decimal(fourth["cost_usd"]) == sum(Decimal(a["cost_usd"]) for a in attempts)
    ctx = orjson.loads(fourth["context"])
    assert ctx["before"]["history"] == 7 * 54  # 4 user turns + 3 answers
    assert ctx["after"]["history"] <= 300 and ctx["saved"] > 0
    assert ctx["summary"]["made"] is True and ctx["actions"] == {"history": "compact"}
    later = [orjson.loads(r["context"]) for r in rows[4:]]
    assert all(c["summary"]["made"] is False for c in later)
    assert [len(orjson.loads(r["attempts"])) for r in rows[4:]] == [1]
    assert rows[0]["context"] and orjson.loads(rows[0]["context"])["saved"] == 0
    conn = sqlite3.connect(tmp_path / "ledger.db")
    (report,) = build_report(conn, "route")
    conn.close()
    assert report.context_tokens_saved == sum(orjson.loads(r["context"])["saved"] for r in rows) > 0


def test_summary_extended_with_newly_aged_turns_not_redone(
    server: BackgroundServer, openai_upstream: OpenAIWireServer
) -> None:
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="S1"), Reply(text="S2"), Reply(text="S3")]
    c = client(server)
    for request in conversation(6):
        chat(c, request)
    calls = summary_calls(openai_upstream)
    assert len(calls) == 2  # turn 4 made it, turn 5 reused it, turn 6 extended it
    second = calls[1]["messages"][1]["content"]
    assert second.startswith("Summary so far:\nS1\n")  # turn N's summary + what aged out since
    assert USER[0] not in second and ASSISTANT[0] not in second  # not re-summarised
    assert calls[1]["max_tokens"] == 40


def test_summaries_never_cross_tenants(server: BackgroundServer, openai_upstream: OpenAIWireServer) -> None:
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="acme summary"), Reply(text="globex summary")]
    request = conversation(4)[-1]
    chat(client(server, "acme"), request)
    chat(client(server, "acme"), request)
    assert len(summary_calls(openai_upstream)) == 1
    chat(client(server, "globex"), request)
    assert len(summary_calls(openai_upstream)) == 2
    assert "globex summary" in answers(openai_upstream)[-1]["messages"][0]["content"]


def test_a_failing_summary_route_falls_back_to_trim_with_a_ledger_note(
    server: BackgroundServer, openai_upstream: OpenAIWireServer, tmp_path: Path
) -> None:
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(status=500, error_message="summariser down")]
    chat(client(server), conversation(4)[-1])
    sent = answers(openai_upstream)[-1]["messages"]
    assert all(m["role"] != "system" for m in sent)  # no summary
    assert sum(len(m["content"].split()) + 4 for m in sent) <= 300  # trimmed within the budget
    row = ledger_rows(tmp_path / "ledger.db")[-1]
    assert row["status"] == "ok"
    ctx = orjson.loads(row["context"])
    assert ctx["actions"]["history"] == "trim (summary failed)"
    assert "summary route 'cheap' failed" in ctx["notes"][0] and "summariser down" in ctx["notes"][0]
    assert [a["role"] for a in orjson.loads(row["attempts"])] == ["compaction", "answer"]


def test_evidence_markup_is_removed_and_bad_markup_is_a_400(
    server: BackgroundServer, openai_upstream: OpenAIWireServer, tmp_path: Path
) -> None:
    content = (
        '<thrifty-evidence id="kb-1" score="0.9">Returns are free.</thrifty-evidence> '
        '<thrifty-evidence id="kb-2" score="0.2">'
        + words(80, "noise")
        + ".</thrifty-evidence> Can I return it?"
    )
    c = client(server)
    c.chat.completions.create(model="route:chat", messages=[{"role": "user", "content": content}])
    assert answers(openai_upstream)[-1]["messages"][0]["content"] == "Returns are free.  Can I return it?"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="route:chat", messages=[{"role": "user", "content": '<thrifty-evidence id="x">open'}]
        )
    assert "messages[0].content: evidence markup does not parse" in err.value.message
    assert len(answers(openai_upstream)) == 1
    # A route without budgets leaves the request alone.
    c.chat.completions.create(model="route:plain", messages=[{"role": "user", "content": content}])
    assert answers(openai_upstream)[-1]["messages"][0]["content"] == content
    rows = ledger_rows(tmp_path / "ledger.db")
    assert orjson.loads(rows[0]["context"])["evidence"]["kept"] == ["kb-1"]
    assert rows[1]["http_status"] == 400 and rows[2]["context"] is None


async def test_budget_reservations_cover_the_summary_and_settle_it_once(tmp_path: Path) -> None:
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    await upstream.start()
    upstream.by_model[SUMMARY_MODEL] = [Reply(text="summary", prompt_tokens=500, completion_tokens=40)]
    settings = settings_for(tmp_path, upstream, budget={"usd_per_day": "1"})
    gateway = Gateway(settings, secrets={"up": UPSTREAM_KEY})
    await gateway.start()
    try:
        ctx, result = await gateway.chat_completion(
            {"model": "route:chat", "messages": conversation(4)[-1]}, tenant="acme"
        )
        assert isinstance(result, Completion)
        assert [a.role for a in ctx.attempts] == ["compaction", "answer"]
        book = gateway.budget_book
        total = sum((a.cost_usd or Decimal(0) for a in ctx.attempts), Decimal(0))
        assert (
            total
            == Decimal(540) * Decimal("0.02") / 10**6 + (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6
        )
        assert sum(book.spent.values()) == total  # the summary counted once, not twice
        assert all(v == 0 for v in book.reserved.values())  # every hold settled
    finally:
        await gateway.close()
        await upstream.stop()


def test_output_budget_clamps_asks_for_brevity_and_records_length_cutoffs(
    server: BackgroundServer, openai_upstream: OpenAIWireServer, tmp_path: Path
) -> None:
    openai_upstream.queue(Reply(finish_reason="length"), Reply(finish_reason="stop"))
    c = client(server)
    messages = [{"role": "user", "content": "Tell me everything about tea."}]
    c.chat.completions.create(model="route:brief", messages=messages, max_tokens=4000)  # type: ignore[arg-type]
    for _ in c.chat.completions.create(model="route:brief", messages=messages, stream=True):  # type: ignore[call-overload]
        pass
    sent = answers(openai_upstream)
    assert [r["max_tokens"] for r in sent] == [50, 50]
    assert sent[0]["messages"][0]["role"] == "system" and "50 tokens" in sent[0]["messages"][0]["content"]
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [orjson.loads(r["context"])["finish_reason"] for r in rows] == ["length", "stop"]
    conn = sqlite3.connect(tmp_path / "ledger.db")
    (report,) = build_report(conn, "route")
    conn.close()
    assert report.to_json()["length_cutoff_rate"] == 0.5


def test_the_stage_is_left_out_without_context_budgets(
    tmp_path: Path, openai_upstream: OpenAIWireServer
) -> None:
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={"plain": {"model": "gpt-4o-mini"}},
    )
    assert not Gateway(settings).context.active


def test_concurrent_requests_share_one_summary_call(
    server: BackgroundServer, openai_upstream: OpenAIWireServer, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="shared", delay_s=0.5), Reply(text="second")]
    request = conversation(4)[-1]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: chat(client(server), request), range(3)))
    assert len(summary_calls(openai_upstream)) == 1
    assert all("shared" in r["messages"][0]["content"] for r in answers(openai_upstream))
    rows = ledger_rows(tmp_path / "ledger.db")
    # Only the request that made the call paid for it.
    assert sorted(len(orjson.loads(r["attempts"])) for r in rows) == [1, 1, 2]
    summaries = sorted(
        (s["made"], s["shared"]) for s in (orjson.loads(r["context"])["summary"] for r in rows)
    )
    assert summaries == [(False, True), (False, True), (True, False)]


def test_summaries_survive_a_restart(tmp_path: Path, openai_upstream: OpenAIWireServer) -> None:
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="kept across restarts"), Reply(text="again")]
    turns = conversation(5)
    settings = settings_for(tmp_path, openai_upstream)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as first:
        chat(client(first), turns[3])
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as second:
        chat(client(second), turns[4])
    assert len(summary_calls(openai_upstream)) == 1
    assert "kept across restarts" in answers(openai_upstream)[-1]["messages"][0]["content"]


def test_evidence_without_scores_is_ranked_by_the_semantic_embedder(
    tmp_path: Path, openai_upstream: OpenAIWireServer
) -> None:
    refunds = "Refunds are issued to the original card within five days of the return."
    posters = "Our money back guarantee posters are printed on recycled paper."
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={
            "rag": {
                "model": "gpt-4o-mini",
                "semantic_cache": {},
                "context": {"retrieved": {"budget": 20}},
            }
        },
    )
    content = (
        f'<thrifty-evidence id="posters">{posters}</thrifty-evidence>\n'
        f'<thrifty-evidence id="refunds">{refunds}</thrifty-evidence>\nHow do I get my money back?'
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client(server).chat.completions.create(
            model="route:rag", messages=[{"role": "user", "content": content}]
        )
    # Word overlap would pick the posters ("money back"); the embedder picks the refund policy.
    assert (
        openai_upstream.requests[-1]["messages"][0]["content"] == f"\n{refunds}\nHow do I get my money back?"
    )
    ctx = orjson.loads(ledger_rows(tmp_path / "ledger.db")[-1]["context"])
    assert ctx["evidence"]["kept"] == ["refunds"]
    assert ctx["evidence"]["ranked_by"] == "embedding similarity to the newest user turn"


def test_an_idempotent_retry_is_the_same_request_however_it_was_compacted(
    server: BackgroundServer, openai_upstream: OpenAIWireServer
) -> None:
    # The first try's summary fails (trimmed instead); the retry's succeeds: its body upstream would
    # differ, but it is the same request the client sent, so it gets the first answer, not a 422.
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(status=500), Reply(text="ok now")]
    openai_upstream.queue(Reply(text="the one answer"))
    c = client(server)
    request = conversation(4)[-1]
    first = c.chat.completions.create(
        model="route:chat",
        messages=request,
        extra_headers={"Idempotency-Key": "k1"},  # type: ignore[arg-type]
    )
    again = c.chat.completions.create(
        model="route:chat",
        messages=request,
        extra_headers={"Idempotency-Key": "k1"},  # type: ignore[arg-type]
    )
    assert first.choices[0].message.content == again.choices[0].message.content == "the one answer"
    assert len(answers(openai_upstream)) == 1


def test_an_exhausted_budget_makes_no_summary_call(tmp_path: Path, openai_upstream: OpenAIWireServer) -> None:
    settings = settings_for(tmp_path, openai_upstream, budget={"usd_per_day": "0.0000001"})
    with (
        BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server,
        pytest.raises(openai.RateLimitError),
    ):
        chat(client(server), conversation(4)[-1])
    assert openai_upstream.requests == []  # neither the summary nor the answer was paid for
    row = ledger_rows(tmp_path / "ledger.db")[-1]
    assert row["http_status"] == 429
    notes = orjson.loads(row["context"])["notes"]
    assert "the budget left cannot cover a summary call" in notes[0]


def test_compacted_requests_share_exact_cache_entries(
    tmp_path: Path, openai_upstream: OpenAIWireServer
) -> None:
    # Two chats that differ only in turns that were summarised (to the same text) are the same
    # request once compacted: the second is answered from the exact cache, keyed after compaction.
    openai_upstream.by_model[SUMMARY_MODEL] = [Reply(text="same summary"), Reply(text="same summary")]
    settings = settings_for(tmp_path, openai_upstream, cache={"ttl_s": 600})
    first = conversation(4)[-1]
    second = [{"role": "user", "content": words(50, "horse")}, *first[1:]]
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        c = client(server)
        for request in (first, second):
            raw = c.chat.completions.with_raw_response.create(
                model="route:chat",
                messages=request,
                temperature=0,  # type: ignore[arg-type]
            )
    assert len(summary_calls(openai_upstream)) == 2 and len(answers(openai_upstream)) == 1
    assert raw.headers["x-thrifty-cache"] == "exact"
