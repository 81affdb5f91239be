"""Each section's policy on crafted requests with known token counts.

"apple apple ..." is one o200k token per word and a message costs 4 tokens of framing and role, so
a message of `words(n)` counts n + 4 tokens in its section.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from thrifty.context.evidence import Candidate, cut_to, pack
from thrifty.context.history import Unit, plan_compaction
from thrifty.context.markup import parse
from thrifty.context.sections import CountCache, split
from thrifty.context.stage import ContextStage
from thrifty.context.tools import shorten
from thrifty.errors import InvalidRequest
from thrifty.pipeline import RequestContext
from thrifty.settings import ContextSettings, RouteSettings
from thrifty.tokens import TokenCounter
from thrifty.types import Tags

COUNTER = TokenCounter()


def words(n: int, word: str = "apple") -> str:
    return " ".join([word] * n)


def ctx_for(body: dict[str, Any], evidence: tuple[str, ...] = ()) -> RequestContext:
    return RequestContext(
        request_id="r",
        ts=time.time(),
        started=time.perf_counter(),
        tags=Tags("acme", evidence=evidence),
        body=body,
        body_bytes=len(orjson.dumps(body)),
        requested_model="route:chat",
        stream=False,
        client_wants_usage=False,
        route="chat",
    )


async def run(
    context: dict[str, Any], body: dict[str, Any], implied_output: bool = False, **kw: Any
) -> RequestContext:
    settings = ContextSettings.model_validate(context)
    stage = ContextStage({"chat": RouteSettings(model="m", context=settings)}, COUNTER)
    ctx = ctx_for(body, **kw)
    ctx.output_ceiling_implied = implied_output  # the gateway set max_tokens, the client sent none
    await stage.apply(ctx, settings)
    return ctx


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def test_sections_are_counted_by_role_and_markup() -> None:
    body = {
        "messages": [
            {"role": "system", "content": words(10)},
            {"role": "developer", "content": words(20)},
            user(words(30)),
            assistant(words(40)),
            user(words(5) + '<thrifty-evidence id="a" score="1">' + words(50) + "</thrifty-evidence>"),
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_tokens": 77,
    }
    s = split(body, CountCache(COUNTER), 77)
    tool_defs = COUNTER.count_text(orjson.dumps(body["tools"]).decode())
    assert s.counts == {
        "system": 14,
        "developer": 24,
        "history": 34 + 44 + (5 + 4),
        "retrieved": 50,
        "tools": tool_defs,
        "output": 77,
    }
    # Without markup the counts add up to the tokenizer's own count of the request.
    plain = {"messages": body["messages"][:4]}
    total = sum(split(plain, CountCache(COUNTER), None).counts.values()) + 3
    assert total == COUNTER.count_messages(plain["messages"], "gpt-4o").tokens


async def test_history_trim_keeps_the_newest_turns_that_fit() -> None:
    body = {
        "messages": [
            {"role": "system", "content": words(10)},
            user(words(100)),
            assistant(words(100)),
            user(words(50)),
            assistant(words(50)),
            user(words(20)),
        ]
    }
    ctx = await run({"history": {"budget": 140, "over": "trim"}}, body)
    # 24 for the newest turn leaves 116: the two 54-token messages fit, the 104-token ones do not.
    assert [m["content"] for m in ctx.body["messages"]] == [words(10), words(50), words(50), words(20)]
    report = ctx.context_report
    assert report is not None
    assert report["before"]["history"] == 104 * 2 + 54 * 2 + 24
    assert report["after"]["history"] == 54 * 2 + 24
    assert report["after"]["system"] == report["before"]["system"] == 14
    assert report["saved"] == 208
    assert report["actions"] == {"history": "trim"}


async def test_tool_call_and_its_results_are_never_split() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}],
    }
    body = {
        "messages": [
            user(words(10)),
            call,
            {"role": "tool", "tool_call_id": "c1", "content": words(10)},
            assistant(words(30)),
            user(words(10)),
        ]
    }
    call_tokens = split({"messages": [call]}, CountCache(COUNTER), None).counts["history"]
    # Room for the answer and the call, not for the tool result's unit as a whole split off.
    budget = 14 + 34 + call_tokens
    ctx = await run({"history": {"budget": budget}}, body)
    roles = [m["role"] for m in ctx.body["messages"]]
    assert roles == ["assistant", "tool", "assistant", "user"]  # the pair moved together
    ctx = await run({"history": {"budget": budget - 1}}, body)
    assert [m["role"] for m in ctx.body["messages"]] == ["assistant", "user"]  # both dropped, not one


async def test_budget_smaller_than_the_newest_user_turn_is_a_400_saying_so() -> None:
    body = {"messages": [user(words(10)), assistant(words(10)), user(words(100))]}
    with pytest.raises(InvalidRequest, match=r"smaller than the newest user turn \(104 tokens\)") as err:
        await run({"history": {"budget": 50}}, body)
    assert err.value.status == 400


async def test_reject_names_the_section_its_budget_and_size() -> None:
    body = {"messages": [{"role": "system", "content": words(30)}, user("hi")]}
    with pytest.raises(
        InvalidRequest, match="system section has 34 tokens, over this route's system budget of 20"
    ):
        await run({"system": {"budget": 20}}, body)
    ctx = await run({"system": {"budget": 20, "over": "warn"}}, body)
    assert ctx.body["messages"][0]["content"] == words(30)  # never rewritten
    assert ctx.context_report is not None and "over its budget of 20" in ctx.context_report["notes"][0]
    history = {"messages": [user(words(40)), assistant(words(40)), user(words(5))]}
    with pytest.raises(
        InvalidRequest, match="history section has 97 tokens, over this route's history budget of 60"
    ):
        await run({"history": {"budget": 60, "over": "reject"}}, history)


def block(eid: str, text: str, score: float | None = None) -> str:
    s = f' score="{score}"' if score is not None else ""
    return f'<thrifty-evidence id="{eid}"{s}>{text}</thrifty-evidence>'


async def test_evidence_is_packed_best_first_and_its_ids_recorded() -> None:
    a = "Returns are accepted within thirty days. Bring the receipt. Refunds go to the card."
    b = "Shipping takes three to five days."
    c = "Gift cards cannot be returned."
    content = (
        "Context:\n" + block("kb-a", a, 0.5) + "\n" + block("kb-b", b, 0.9) + "\n" + block("kb-c", c, 0.1)
    )
    body = {"messages": [user(content + "\nQuestion: can I return a gift card?")]}
    n = COUNTER.count_text
    budget = n(b) + n("Returns are accepted within thirty days. ")
    ctx = await run({"retrieved": {"budget": budget}}, body, evidence=("kb-c", "kb-x"))
    sent = ctx.body["messages"][0]["content"]
    assert "thrifty-evidence" not in sent  # markup removed before the request goes upstream
    # b (0.9) whole, a (0.5) cut at a sentence boundary, c (0.1) dropped; kept blocks stay in place.
    assert (
        sent
        == "Context:\nReturns are accepted within thirty days.\n"
        + b
        + "\n\nQuestion: can I return a gift card?"
    )
    report = ctx.context_report
    assert report is not None
    assert report["evidence"]["kept"] == ["kb-b", "kb-a"]
    assert report["evidence"]["cut"] == ["kb-a"] and report["evidence"]["dropped"] == ["kb-c"]
    assert report["after"]["retrieved"] <= budget
    # The header's ids stay unless their block was dropped; the kept blocks' ids are added.
    assert ctx.tags.evidence == ("kb-a", "kb-b", "kb-x")


def test_near_duplicates_dropped_and_no_scores_ranks_by_overlap() -> None:
    text = "The warranty covers parts and labour for two years from purchase."
    cands = [
        Candidate(0, "a", None, "Our office is in Berlin and opens at nine."),
        Candidate(1, "b", None, text),
        Candidate(2, "c", None, text + " Thanks."),
    ]
    packed = pack(cands, 1000, COUNTER.count_text, "how long does the warranty cover parts?")
    assert packed.ranked_by.startswith("overlap")
    assert packed.kept_ids == ["b", "a"] and packed.duplicates == ["c"]


def test_cut_at_sentences_never_mid_sentence() -> None:
    text = "One two three. Four five six. Seven."
    assert cut_to(text, COUNTER.count_text("One two three. Four"), COUNTER.count_text) == "One two three."
    assert cut_to(text, 2, COUNTER.count_text) is None


@pytest.mark.parametrize(
    "content, why",
    [
        ('<thrifty-evidence id="a">x', "never closed"),
        ("x</thrifty-evidence>", "never opened"),
        ('<thrifty-evidence score="1">x</thrifty-evidence>', 'needs id="..."'),
        ('<thrifty-evidence id="a" score="high">x</thrifty-evidence>', "is not a number"),
        ('<thrifty-evidence id="a" rank="1">x</thrifty-evidence>', "unknown attribute 'rank'"),
        (
            '<thrifty-evidence id="a"><thrifty-evidence id="b">x</thrifty-evidence></thrifty-evidence>',
            "cannot nest",
        ),
        ('text <thrifty-evidence id="a" more text', "not closed with '>'"),
    ],
)
def test_markup_that_does_not_parse_is_a_400_naming_it(content: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why) as err:
        parse(content, "messages[0].content")
    assert err.value.status == 400 and err.value.param == "messages[0].content"


def test_tool_results_are_shortened_structurally() -> None:
    result = orjson.dumps({"items": [{"id": i, "name": "x" * 300} for i in range(40)], "total": 40}).decode()
    short = orjson.loads(shorten(result, (5, 100)))
    assert set(short) == {"items", "total"} and short["total"] == 40  # every key kept
    assert len(short["items"]) == 6 and short["items"][-1] == "[thrifty: 35 more items cut]"
    assert short["items"][0]["name"] == "x" * 100 + "…[thrifty: 200 more characters cut]"
    text = "First line.\nSecond line is here.\n" + "z" * 1000
    assert shorten(text, (5, 10)).startswith("First line.\nSecond line is here. …[thrifty: ")


async def test_tools_trim_shortens_oldest_results_first_within_budget() -> None:
    big = orjson.dumps({"rows": list(range(300))}).decode()
    body = {
        "messages": [
            user("q"),
            {"role": "tool", "tool_call_id": "1", "content": big},
            {"role": "tool", "tool_call_id": "2", "content": big},
            user("q2"),
        ]
    }
    before = split(body, CountCache(COUNTER), None).counts["tools"]
    ctx = await run({"tools": {"budget": before // 2 + 100}}, body)
    first, second = ctx.body["messages"][1]["content"], ctx.body["messages"][2]["content"]
    assert "more items cut" in first and second == big  # the newer result untouched
    report = ctx.context_report
    assert report is not None and report["after"]["tools"] <= before // 2 + 100
    defs = {"messages": [user("q")], "tools": [{"type": "function", "function": {"name": "f" * 400}}]}
    with pytest.raises(InvalidRequest, match="tool definitions alone"):
        await run({"tools": {"budget": 10}}, defs)


async def test_output_clamped_with_a_brevity_instruction_before_the_newest_turn() -> None:
    body = {"messages": [{"role": "system", "content": "s"}, user("q")], "max_tokens": 2000}
    ctx = await run({"output": {"budget": 300, "brevity": True}}, body)
    assert ctx.body["max_tokens"] == 300
    assert [m["role"] for m in ctx.body["messages"]] == ["system", "system", "user"]
    assert "300 tokens" in ctx.body["messages"][1]["content"]
    with pytest.raises(InvalidRequest, match="output section has 2000 tokens"):
        await run({"output": {"budget": 300, "over": "reject"}}, body)
    ctx = await run({"output": {"budget": 300}}, {"messages": [user("q")]})
    assert ctx.body["max_tokens"] == 300  # set when the client left it open
    # A ceiling the gateway filled in for a client that sent none is clamped, never rejected.
    implied = {"messages": [user("q")], "max_tokens": 4096}
    ctx = await run({"output": {"budget": 300, "over": "reject"}}, implied, implied_output=True)
    assert ctx.body["max_tokens"] == 300
    both = {"messages": [user("q")], "max_tokens": 900, "max_completion_tokens": 1200}
    ctx = await run({"output": {"budget": 300}}, both)
    assert (ctx.body["max_tokens"], ctx.body["max_completion_tokens"]) == (300, 300)


async def test_within_budget_nothing_changes() -> None:
    body = {"messages": [user(words(10)), assistant(words(10)), user(words(10))], "max_tokens": 5}
    ctx = await run({"history": {"budget": 100}, "output": {"budget": 10}}, body)
    assert ctx.body is body
    assert ctx.context_report is not None and ctx.context_report["saved"] == 0


async def test_markup_cannot_take_a_system_prompt_out_of_its_budget() -> None:
    hidden = '<thrifty-evidence id="x">' + words(30) + "</thrifty-evidence>"
    body = {"messages": [{"role": "system", "content": hidden}, user("hi")]}
    with pytest.raises(InvalidRequest, match="system section has 34 tokens"):
        await run({"system": {"budget": 20}}, body)
    # With a retrieved budget, evidence is its own section (and packed within it).
    ctx = await run({"system": {"budget": 20}, "retrieved": {"budget": 100}}, body)
    assert ctx.body["messages"][0]["content"] == words(30)


@pytest.mark.parametrize(
    "context, why",
    [
        ({"system": {"budget": 10, "over": "trim"}}, "system.over must be one of reject, warn"),
        ({"history": {"budget": 100, "over": "compact"}}, "needs history.summary_route"),
        ({"retrieved": {"budget": 100, "over": "compact"}}, "retrieved.over must be one of reject, trim"),
        ({"history": {"budget": 500, "over": "compact", "summary_route": "nope"}}, "unknown route 'nope'"),
        (
            {"history": {"budget": 100, "over": "compact", "summary_route": "chat", "summary_tokens": 100}},
            "summary_tokens must be smaller",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_at_start(context: dict[str, Any], why: str) -> None:
    from thrifty.errors import ConfigError
    from thrifty.settings import settings_from_mapping

    with pytest.raises(ConfigError, match=why):
        settings_from_mapping(
            {
                "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                "models": {"m": {"provider": "p"}},
                "routes": {"chat": {"model": "m", "context": context}},
            }
        )


def test_a_new_summary_leaves_headroom_for_the_turns_to_come() -> None:
    units = [Unit((), 100, 0) for _ in range(10)]
    # budget 1,000, summary 200, tail 100: room 700; half of it (350) may stay verbatim: 3 units.
    assert plan_compaction(units, 100, 1000, 200, {}, 0.5, headroom=0).boundary == 7
    # Four turns of 150 tokens must fit before the next summary: only 100 tokens stay verbatim.
    assert plan_compaction(units, 100, 1000, 200, {}, 0.5, headroom=600).boundary == 9
    # Turns too long for the headroom: nothing stays verbatim but the newest turn (the tail).
    assert plan_compaction(units, 100, 1000, 200, {}, 0.5, headroom=5000).boundary == 10
    # A stored summary that still fits is reused whatever the headroom.
    step = plan_compaction(units, 100, 1000, 200, {8: 150}, 0.5, headroom=5000)
    assert (step.covered, step.boundary) == (8, 8)
