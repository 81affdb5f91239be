"""Cascades through the real gateway: escalation order and limits, gate verdicts and the cost of
every attempt in the ledger, streaming, pinned tasks and the worst-case reservation."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MINI_ID, BIG_ID, LOCAL_ID = "gpt-4o-mini", "gpt-4o-2024-08-06", "llama-3.1-8b-local"
# The fake reports 42 prompt and 9 completion tokens; list prices per million tokens.
MINI = (42 * Decimal("0.15") + 9 * Decimal("0.6")) / 10**6
BIG = (42 * Decimal("2.5") + 9 * Decimal("10")) / 10**6
LOCAL = 51 * Decimal("0.02") / 10**6
ANSWER_SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}


def _settings(tmp_path: Path, upstream: Any, **route_extra: Any):
    return base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=openai_models(),
        routes={
            "math": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "tiers": ["gpt-4o-mini", "gpt-4o"],
                "gates": [
                    {"kind": "json_schema", "json_schema": ANSWER_SCHEMA},
                    {"kind": "agreement", "field": "answer", "voters": ["selfhosted"]},
                ],
            },
            "three": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "tiers": ["gpt-4o-mini", "selfhosted", "gpt-4o"],
                "gates": [{"kind": "json_schema", "json_schema": ANSWER_SCHEMA}],
                **route_extra,
            },
            "confident": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "tiers": ["gpt-4o-mini", "gpt-4o"],
                "gates": [{"kind": "logprob", "threshold": 0.8}],
            },
            "desk": {"model": "gpt-4o-mini", "pin": {"legal": "gpt-4o"}},
        },
        resilience={"max_retries": 0},
    )


@pytest.fixture
def server(tmp_path: Path, openai_upstream):
    with BackgroundServer(_settings(tmp_path, openai_upstream), secrets={"up": UPSTREAM_KEY}) as s:
        yield s


def _ask(server: BackgroundServer, route: str = "math", headers: dict[str, str] | None = None, **kw: Any):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    body = {"model": f"route:{route}", "messages": [{"role": "user", "content": "What is 6 x 7?"}]}
    body.update(kw)
    return client.chat.completions.with_raw_response.create(**body, extra_headers=headers or {})


def _script(upstream: Any, **replies: list[str]) -> None:
    ids = {"mini": MINI_ID, "big": BIG_ID, "local": LOCAL_ID}
    for name, texts in replies.items():
        upstream.by_model[ids[name]] = [Reply(text=t) for t in texts]


def _attempts(row: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(row["attempts"])


def test_a_draft_that_passes_its_gates_is_returned_and_costs_draft_plus_voter(
    server, openai_upstream, tmp_path
):
    _script(openai_upstream, mini=['{"answer": 42}'], local=['{"answer": "42"}'])
    resp = _ask(server)
    assert resp.parse().choices[0].message.content == '{"answer": 42}'
    assert resp.headers["x-thrifty-model"] == "gpt-4o-mini" and resp.headers["x-thrifty-route"] == "math"
    assert Decimal(resp.headers["x-thrifty-cost-usd"]) == MINI + LOCAL
    assert [r["model"] for r in openai_upstream.requests] == [MINI_ID, LOCAL_ID]
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["escalated"] == 0 and row["retries"] == 0 and row["model"] == "gpt-4o-mini"
    assert Decimal(row["cost_usd"]) == MINI + LOCAL and row["retry_cost_usd"] is None
    draft, voter = _attempts(row)
    assert (draft["model"], draft["role"], Decimal(draft["cost_usd"])) == ("gpt-4o-mini", "answer", MINI)
    assert draft["gate"].startswith("pass: json_schema: valid; agreement: 1/1")
    assert (voter["model"], voter["role"], Decimal(voter["cost_usd"])) == ("selfhosted", "voter", LOCAL)


def test_a_failed_gate_escalates_and_every_attempt_is_priced(server, openai_upstream, tmp_path):
    _script(openai_upstream, mini=['{"answer": 42}'], local=['{"answer": 41}'], big=['{"answer": 42}'])
    resp = _ask(server)
    assert resp.headers["x-thrifty-model"] == "gpt-4o"
    assert Decimal(resp.headers["x-thrifty-cost-usd"]) == MINI + LOCAL + BIG
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["escalated"] == 1 and row["model"] == "gpt-4o" and row["retries"] == 0
    assert Decimal(row["cost_usd"]) == MINI + LOCAL + BIG
    draft, voter, answer = _attempts(row)
    assert (draft["role"], voter["role"], answer["role"]) == ("draft", "voter", "answer")
    assert draft["gate"] == "fail: agreement: 0/1 voters agree on '42'"
    assert answer["model"] == "gpt-4o" and Decimal(answer["cost_usd"]) == BIG and answer["gate"] is None
    # A draft that is not even valid JSON fails the first gate: the voter is never asked.
    _script(openai_upstream, mini=["forty-two"], big=['{"answer": 42}'])
    _ask(server)
    row = ledger_rows(tmp_path / "ledger.db")[-1]
    assert [a["model"] for a in _attempts(row)] == ["gpt-4o-mini", "gpt-4o"]
    assert _attempts(row)[0]["gate"] == "fail: json_schema: the reply is not JSON"
    from thrifty.report import build_report
    from thrifty.stores.sqlite_db import open_database

    (route,) = build_report(open_database(tmp_path / "ledger.db"), "route")
    assert (route.group, route.requests, route.escalated) == ("math", 2, 2)
    assert route.cost_usd == MINI + LOCAL + BIG + MINI + BIG and route.retry_cost_usd == 0


def test_escalation_order_and_limit(tmp_path, openai_upstream):
    _script(openai_upstream, mini=["bad"], local=["also bad"], big=['{"answer": 42}'])
    with BackgroundServer(_settings(tmp_path, openai_upstream), secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, "three").parse().choices[0].message.content == '{"answer": 42}'
    assert [r["model"] for r in openai_upstream.requests] == [MINI_ID, LOCAL_ID, BIG_ID]
    openai_upstream.requests.clear()
    _script(openai_upstream, mini=["bad"], local=["also bad"], big=['{"answer": 42}'])
    limited = _settings(tmp_path, openai_upstream, max_escalations=1)
    with BackgroundServer(limited, secrets={"up": UPSTREAM_KEY}) as server:
        resp = _ask(server, "three")
    # One escalation allowed: the second tier's answer is final, whatever the gate would say.
    assert (
        resp.parse().choices[0].message.content == "also bad"
        and resp.headers["x-thrifty-model"] == "selfhosted"
    )
    assert [r["model"] for r in openai_upstream.requests] == [MINI_ID, LOCAL_ID]


def test_the_escalated_call_can_carry_the_rejected_draft(tmp_path, openai_upstream):
    _script(openai_upstream, mini=["forty-two"], local=['{"answer": 42}'])
    settings = _settings(tmp_path, openai_upstream, include_rejected_draft=True)
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        _ask(server, "three")
    escalated = openai_upstream.requests[1]["messages"]
    assert escalated[0] == {"role": "user", "content": "What is 6 x 7?"}
    assert escalated[1] == {"role": "assistant", "content": "forty-two"}
    assert "json_schema: the reply is not JSON" in escalated[2]["content"]


def test_a_tier_that_is_down_escalates(server, openai_upstream, tmp_path):
    openai_upstream.by_model[MINI_ID] = [Reply(status=503, error_message="overloaded")]
    _script(openai_upstream, big=['{"answer": 42}'])
    resp = _ask(server)
    assert resp.headers["x-thrifty-model"] == "gpt-4o"
    (row,) = ledger_rows(tmp_path / "ledger.db")
    failed, answer = _attempts(row)
    assert (failed["status"], failed["role"], Decimal(failed["cost_usd"])) == (503, "draft", 0)
    assert answer["status"] == 200 and row["escalated"] == 1 and Decimal(row["cost_usd"]) == BIG


def test_route_fallbacks_stand_in_for_the_answering_call_only(tmp_path, openai_upstream):
    # A draft tier that is down is a failed draft: the cascade moves on to its next tier, and
    # the route's fallback (here gpt-4o-mini) is not called in the draft's place.
    settings = _settings(tmp_path, openai_upstream, fallbacks=["gpt-4o-mini"])
    openai_upstream.by_model[MINI_ID] = [Reply(status=503, error_message="overloaded")]
    _script(openai_upstream, local=['{"answer": 42}'])
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, "three").headers["x-thrifty-model"] == "selfhosted"
        assert [r["model"] for r in openai_upstream.requests] == [MINI_ID, LOCAL_ID]
        # The last tier, which answers whatever it says, still has the route's fallbacks.
        openai_upstream.requests.clear()
        _script(openai_upstream, mini=["bad", '{"answer": 42}'], local=["also bad"])
        openai_upstream.by_model[BIG_ID] = [Reply(status=503, error_message="overloaded")]
        resp = _ask(server, "three")
    assert [r["model"] for r in openai_upstream.requests] == [MINI_ID, LOCAL_ID, BIG_ID, MINI_ID]
    assert resp.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert resp.parse().choices[0].message.content == '{"answer": 42}'
    row = ledger_rows(tmp_path / "ledger.db")[-1]
    assert [(a["model"], a["role"], a["status"]) for a in _attempts(row)] == [
        ("gpt-4o-mini", "draft", 200),
        ("selfhosted", "draft", 200),
        ("gpt-4o", "answer", 503),
        ("gpt-4o-mini", "answer", 200),
    ]
    assert Decimal(row["cost_usd"]) == MINI + LOCAL + MINI


def test_streaming_replays_an_accepted_draft_and_streams_the_top_tier_live(server, openai_upstream, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)

    def stream() -> tuple[str, dict[str, Any]]:
        text, last = "", None
        for chunk in client.chat.completions.create(
            model="route:math", messages=[{"role": "user", "content": "What is 6 x 7?"}], stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            last = chunk
        assert last is not None
        return text, last.model_extra["thrifty"]

    _script(openai_upstream, mini=['{"answer": 42}'], local=['{"answer": 42}'])
    text, trailer = stream()
    assert text == '{"answer": 42}' and trailer["model"] == "gpt-4o-mini"
    assert Decimal(trailer["cost_usd"]) == MINI + LOCAL
    assert [bool(r.get("stream")) for r in openai_upstream.requests] == [False, False]  # buffered
    _script(openai_upstream, mini=['{"answer": 42}'], local=['{"answer": 40}'], big=['{"answer": 42}'])
    text, trailer = stream()
    assert text == '{"answer": 42}' and trailer["model"] == "gpt-4o"
    assert Decimal(trailer["cost_usd"]) == MINI + LOCAL + BIG
    assert openai_upstream.requests[-1]["stream"] is True  # the final tier streams live
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [(r["escalated"], r["stream"]) for r in rows] == [(0, 1), (1, 1)]


def test_logprob_gate_asks_for_logprobs_and_hides_them_from_a_client_that_did_not(server, openai_upstream):
    openai_upstream.by_model[MINI_ID] = [Reply(text="42", logprobs=[-0.01, -0.02])]
    resp = _ask(server, "confident")
    assert (
        resp.headers["x-thrifty-model"] == "gpt-4o-mini" and openai_upstream.requests[0]["logprobs"] is True
    )
    assert resp.parse().choices[0].logprobs is None
    openai_upstream.by_model[MINI_ID] = [Reply(text="41?", logprobs=[-1.2, -2.0])]
    assert _ask(server, "confident").headers["x-thrifty-model"] == "gpt-4o"


def test_a_pinned_task_always_goes_to_its_model(server, openai_upstream):
    assert _ask(server, "desk").headers["x-thrifty-model"] == "gpt-4o-mini"
    resp = _ask(server, "desk", headers={"x-thrifty-task": "legal"})
    assert resp.headers["x-thrifty-model"] == "gpt-4o" and openai_upstream.requests[-1]["model"] == BIG_ID


def test_the_reservation_covers_every_call_a_cascade_may_make(tmp_path, openai_upstream):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={
            "cheap-only": {"model": "gpt-4o-mini", "max_cost_per_request_usd": "0.001"},
            "cascade": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "tiers": ["gpt-4o-mini", "gpt-4o"],
                "gates": [{"kind": "json_schema", "json_schema": ANSWER_SCHEMA}],
                "max_cost_per_request_usd": "0.001",
            },
        },
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        assert _ask(server, "cheap-only", max_tokens=100).headers["x-thrifty-model"] == "gpt-4o-mini"
        with pytest.raises(openai.BadRequestError) as info:
            _ask(server, "cascade", max_tokens=100)  # gpt-4o's 100 output tokens alone cost $0.001
    message = str(info.value)
    assert "every call cascade route 'cascade' may make (gpt-4o-mini, gpt-4o)" in message
    # Reserved: the prompt and 100 output tokens on gpt-4o-mini *and* on gpt-4o.
    assert "cap of $0.001 per request" in message


# --- routes driven by a trained router artifact ---------------------------------------------

ROUTER_MINI, ROUTER_FLASH, ROUTER_4O = "gpt-4o-mini-2024-07-18", "gemini-1.5-flash", "gpt-4o-2024-08-06"
FLASH_ID = "gemini-1.5-flash"
# gemini-1.5-flash at the README's list prices, 0.075 / 0.30 USD per million tokens.
FLASH = (42 * Decimal("0.075") + 9 * Decimal("0.3")) / 10**6


def _hand_router(path: Path) -> None:
    """Known task "t": a lone gpt-4o-mini draft is never trusted (P = 0.5 < 0.9), agreement with
    flash is accepted, a disagreement escalates; unknown tasks need P >= 0.99 on agreement (never
    met: P = 0.95). The classifier sends known-task prompts to gpt-4o-mini (P = 0.8 >= 0.7)."""
    import math

    from thrifty.routing.train.gate import Logistic, parse, prompt_features, stage_features
    from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router

    def constant(p: float, dim: int) -> Logistic:
        return Logistic((0.0,) * dim, (1.0,) * dim, (0.0,) * dim, math.log(p / (1 - p)))

    d = parse('{"answer": "4"}', "t")
    one, two, prompt = (
        len(stage_features([d], "q")),
        len(stage_features([d, d], "q")),
        len(prompt_features("q")),
    )
    Router(
        reference=ROUTER_4O,
        target_quality=0.99,
        ladder=(ROUTER_MINI, ROUTER_FLASH),
        strong=ROUTER_4O,
        first_gate=constant(0.5, one),
        agree_gate=constant(0.95, two),
        split_gate=constant(0.05, two),
        prompt_gate=constant(0.8, prompt),
        gates={"t": Gate(0.9, AGREE_BONUS, 0.7, cost_aware=False)},
        fallback=Gate(NEVER, AGREE_BONUS + 0.99, NEVER, cost_aware=False),
    ).save(path)


@pytest.fixture
def learned(tmp_path: Path, openai_upstream):
    artifact = tmp_path / "router.json"
    _hand_router(artifact)
    models = {
        **openai_models(),
        "flash": {
            "provider": "up",
            "upstream": FLASH_ID,
            "price": {"input_per_mtok": "0.075", "output_per_mtok": "0.3"},
        },
    }
    router = {
        "path": str(artifact),
        "models": {ROUTER_MINI: "gpt-4o-mini", ROUTER_FLASH: "flash", ROUTER_4O: "gpt-4o"},
    }
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=models,
        routes={
            "learned": {"model": "gpt-4o-mini", "strategy": "cascade", "router": router},
            "picked": {"model": "gpt-4o-mini", "strategy": "classifier", "router": router},
        },
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        yield server


def test_a_trained_router_accepts_agreement_and_records_each_step(learned, openai_upstream, tmp_path):
    openai_upstream.by_model[MINI_ID] = [Reply(text='{"answer": "4"}')]
    openai_upstream.by_model[FLASH_ID] = [Reply(text='{"reasoning": "2+2", "answer": 4}')]
    resp = _ask(learned, "learned", headers={"x-thrifty-task": "t"})
    assert resp.parse().choices[0].message.content == '{"answer": "4"}'
    assert resp.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert Decimal(resp.headers["x-thrifty-cost-usd"]) == MINI + FLASH
    (row,) = ledger_rows(tmp_path / "ledger.db")
    mini, flash = _attempts(row)
    assert (mini["model"], mini["role"]) == ("gpt-4o-mini", "answer") and mini["gate"].startswith(
        "pass: mini and flash agree"
    )
    assert (flash["model"], flash["role"], Decimal(flash["cost_usd"])) == ("flash", "draft", FLASH)
    assert row["escalated"] == 0 and row["model"] == "gpt-4o-mini"


def test_a_trained_router_escalates_on_disagreement_and_on_an_unknown_task(
    learned, openai_upstream, tmp_path
):
    openai_upstream.by_model[MINI_ID] = [Reply(text='{"answer": "4"}'), Reply(text='{"answer": "4"}')]
    openai_upstream.by_model[FLASH_ID] = [Reply(text='{"answer": "5"}'), Reply(text='{"answer": "4"}')]
    openai_upstream.by_model[BIG_ID] = [Reply(text='{"answer": "4"}'), Reply(text='{"answer": "4"}')]
    disagree = _ask(learned, "learned", headers={"x-thrifty-task": "t"})
    unknown = _ask(learned, "learned")  # no task: agreement is not enough for the cautious fallback
    for resp in (disagree, unknown):
        assert resp.headers["x-thrifty-model"] == "gpt-4o"
        assert Decimal(resp.headers["x-thrifty-cost-usd"]) == MINI + FLASH + BIG
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [r["escalated"] for r in rows] == [1, 1]
    mini, flash, big = _attempts(rows[0])
    assert mini["gate"].startswith("fail: mini unsure") and flash["gate"].startswith(
        "fail: mini and flash disagree"
    )
    assert (big["role"], big["gate"]) == ("answer", "pass: escalated: 4o answers")
    assert "unknown task" in _attempts(rows[1])[1]["gate"]


def test_a_trained_classifier_picks_the_tier_before_the_call_and_streams_it_live(
    learned, openai_upstream, tmp_path
):
    client = openai.OpenAI(base_url=learned.base_url, api_key=KEYS["acme"], max_retries=0)
    openai_upstream.by_model[MINI_ID] = [Reply(text='{"answer": "4"}')]
    text = ""
    for chunk in client.chat.completions.create(
        model="route:picked",
        messages=[{"role": "user", "content": "2+2?"}],
        stream=True,
        extra_headers={"x-thrifty-task": "t"},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == '{"answer": "4"}' and openai_upstream.requests[-1]["stream"] is True
    assert _ask(learned, "picked").headers["x-thrifty-model"] == "gpt-4o"  # unknown task: the strong tier
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [(r["model"], r["escalated"]) for r in rows] == [("gpt-4o-mini", 0), ("gpt-4o", 1)]
    assert _attempts(rows[0])[0]["gate"].startswith("classifier: P(mini right)=0.800")


def test_a_router_naming_unmapped_models_is_refused_at_start(tmp_path, openai_upstream):
    from thrifty.errors import ConfigError
    from thrifty.gateway import Gateway

    artifact = tmp_path / "router.json"
    _hand_router(artifact)
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={
            "learned": {"model": "gpt-4o-mini", "strategy": "cascade", "router": {"path": str(artifact)}}
        },
    )
    with pytest.raises(ConfigError, match=r"map them in routes\.learned\.router\.models"):
        Gateway(settings)


def test_a_learned_answer_scorer_gates_a_hand_made_cascade(tmp_path, openai_upstream):
    artifact = tmp_path / "router.json"
    _hand_router(artifact)  # its first-tier scorer says P(right) = 0.5 for any draft

    def settings(threshold: float):
        route = {
            "model": "gpt-4o-mini",
            "strategy": "cascade",
            "tiers": ["gpt-4o-mini", "gpt-4o"],
            "gates": [{"kind": "router_scorer", "threshold": threshold}],
            "router": {"path": str(artifact), "task": "t"},
        }
        return base_settings(
            tmp_path,
            providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
            models=openai_models(),
            routes={"scored": route},
        )

    for threshold, answered_by in ((0.4, "gpt-4o-mini"), (0.6, "gpt-4o")):
        with BackgroundServer(settings(threshold), secrets={"up": UPSTREAM_KEY}) as server:
            assert _ask(server, "scored").headers["x-thrifty-model"] == answered_by
    first, second = ledger_rows(tmp_path / "ledger.db")
    assert _attempts(first)[0]["gate"] == "pass: router_scorer: P(right) 0.500 vs 0.4"
    assert _attempts(second)[0]["gate"] == "fail: router_scorer: P(right) 0.500 vs 0.6"
    import pydantic

    from thrifty.settings import RouteSettings

    with pytest.raises(pydantic.ValidationError, match="router_scorer gate needs router"):
        RouteSettings.model_validate(
            {"model": "m", "strategy": "cascade", "tiers": ["a", "b"], "gates": [{"kind": "router_scorer"}]}
        )
