"""The router's online step API, its artifact, and the benchmark replaying through it."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest

from thrifty.bench.route import evaluate_router, replay_row, run_policy_router
from thrifty.routing.train.data import Call, Row
from thrifty.routing.train.fit import train
from thrifty.routing.train.gate import Logistic, parse, prompt_features, stage_features
from thrifty.routing.train.metrics import summarise
from thrifty.routing.train.policy import run_single
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router, accept_score
from thrifty.routing.train.step import Accept, CallModel, Draft, replay

MINI, GPT4O, HAIKU = "gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "claude-3-haiku-20240307"
SONNET, FLASH, GPT35 = "claude-3-5-sonnet-20240620", "gemini-1.5-flash", "gpt-3.5-turbo-0125"

ALL = (MINI, GPT4O, HAIKU, SONNET, FLASH, GPT35)
PROMPT = "What is 2 + 2?"


def reply(answer: str) -> str:
    return json.dumps({"reasoning": "Add the numbers.", "answer": answer})


def constant(p: float, dim: int) -> Logistic:
    """A gate that says P(right) = p whatever the drafts."""
    return Logistic((0.0,) * dim, (1.0,) * dim, (0.0,) * dim, math.log(p / (1 - p)))


def dims() -> tuple[int, int, int]:
    d = parse(reply("4"), "t")
    return len(stage_features([d], PROMPT)), len(stage_features([d, d], PROMPT)), len(prompt_features(PROMPT))


def hand_router(first_p: float = 0.5) -> Router:
    """Known task "t": trust a lone mini draft if P >= 0.9 (never, at P = 0.5), accept any
    agreement, never a disagreement. Unknown tasks: agreement with P >= 0.9 only."""
    d1, d2, dp = dims()
    return Router(
        reference=GPT4O,
        target_quality=0.99,
        ladder=(MINI, FLASH),
        strong=GPT4O,
        first_gate=constant(first_p, d1),
        agree_gate=constant(0.95, d2),
        split_gate=constant(0.05, d2),
        prompt_gate=constant(0.8, dp),
        gates={"t": Gate(0.9, AGREE_BONUS, 0.7, cost_aware=False)},
        fallback=Gate(NEVER, AGREE_BONUS + 0.99, NEVER, cost_aware=False),
    )


def test_step_accepts_agreement_and_escalates_disagreement() -> None:
    r = hand_router()
    assert r.models() == {MINI, FLASH, GPT4O}
    first = r.next_step("t", PROMPT, [])
    assert first == CallModel(MINI, "first tier (task t)")
    mini = Draft(MINI, reply("4"))
    second = r.next_step("t", PROMPT, [mini])
    assert isinstance(second, CallModel) and second.model == FLASH  # P = 0.5 < 0.9
    agreed = r.next_step("t", PROMPT, [mini, Draft(FLASH, reply("4"))])
    assert isinstance(agreed, Accept) and agreed.index == 0 and "agree" in agreed.reason
    split = r.next_step("t", PROMPT, [mini, Draft(FLASH, reply("5"))])
    assert isinstance(split, CallModel) and split.model == GPT4O and "disagree" in split.reason
    final = r.next_step("t", PROMPT, [mini, Draft(FLASH, reply("5")), Draft(GPT4O, reply("4"))])
    assert final == Accept(2, "escalated: 4o answers")


def test_step_trusts_a_confident_lone_draft_on_a_known_task_only() -> None:
    r = hand_router(first_p=0.95)
    mini = [Draft(MINI, reply("4"))]
    assert isinstance(r.next_step("t", PROMPT, mini), Accept)
    # Unknown (or missing) task: never a lone draft, and agreement needs P >= 0.99 (> 0.95).
    for task in ("new", None):
        step = r.next_step(task, PROMPT, mini)
        assert isinstance(step, CallModel) and step.model == FLASH
        both = [*mini, Draft(FLASH, reply("4"))]
        step = r.next_step(task, PROMPT, both)
        assert isinstance(step, CallModel) and step.model == GPT4O and "unknown task" in step.reason


def test_strong_reply_without_answer_keeps_a_cheap_draft() -> None:
    r = hand_router()
    drafts = [Draft(MINI, reply("4")), Draft(FLASH, reply("5")), Draft(GPT4O, "I cannot answer.")]
    assert r.next_step("t", PROMPT, drafts).index == 0  # type: ignore[union-attr]


def test_classifier_strategy_picks_a_tier_before_any_call() -> None:
    r = hand_router().with_strategy("classifier")
    assert r.next_step("t", PROMPT, []) == CallModel(MINI, "classifier: P(mini right)=0.800 (task t)")
    assert isinstance(r.next_step("new", PROMPT, []), CallModel)
    assert r.next_step("new", PROMPT, []).model == GPT4O  # type: ignore[union-attr]
    assert r.next_step("t", PROMPT, [Draft(MINI, reply("4"))]) == Accept(
        0, "classifier sent the prompt to mini"
    )
    with pytest.raises(ValueError):
        r.with_strategy("magic")


def test_replay_loop_and_its_call_limit() -> None:
    r = hand_router()
    answers = {MINI: "4", FLASH: "5", GPT4O: "4"}
    trace = replay(r.next_step, "t", PROMPT, lambda m: reply(answers[m]))
    assert [d.model for d in trace.drafts] == [MINI, FLASH, GPT4O] and trace.accepted == 2
    with pytest.raises(RuntimeError):
        replay(r.next_step, "t", PROMPT, lambda m: reply(answers[m]), max_calls=2)


def test_cost_aware_score_prefers_accepting_where_escalation_is_dear() -> None:
    cheap = accept_score(0.9, 100, 100, cost_aware=True)
    dear = accept_score(0.9, 10_000, 10_000, cost_aware=True)
    assert dear > cheap
    assert accept_score(0.9, 1, 1, cost_aware=False) == 0.9


def _row(rid: str, task: str, answers: dict[str, str], truth: str) -> Row:
    # Cheap models cost 1, strong ones 10.
    calls = {}
    for m in ALL:
        a = answers.get(m, truth)
        unit = Decimal(10 if m in (GPT4O, SONNET) else 1)
        calls[m] = Call(answer=a, correct=a == truth, cost=unit, output_tokens=10, output=reply(a))
    return Row(rid, task, PROMPT, calls)


def tiny() -> list[Row]:
    return [
        _row("1", "t", {}, "4"),  # cheap agree, right: 2
        _row("2", "t", {MINI: "5", FLASH: "6"}, "4"),  # split -> 4o right: 12
        _row("3", "t", {MINI: "5", FLASH: "5"}, "4"),  # agree on a wrong answer: 2
        _row("4", "t", {GPT4O: "7", FLASH: "9"}, "4"),  # split -> 4o wrong: 12
    ]


def test_bench_replays_through_the_step_api_with_exact_numbers() -> None:
    rows = tiny()
    r = hand_router()
    out = run_policy_router(r, rows)
    assert [(o.correct, o.cost, o.escalated, o.calls) for o in out] == [
        (True, Decimal(2), False, 2),
        (True, Decimal(12), True, 3),
        (False, Decimal(2), False, 2),
        (False, Decimal(12), True, 3),
    ]
    s = summarise("ours", out, run_single(rows, GPT4O))
    assert s.accuracy == Decimal("0.5")
    assert s.cost_usd == Decimal(28)
    assert s.rel_quality == Decimal(2) / Decimal(3)  # 4o gets rows 1-3 right
    assert s.rel_cost == Decimal(28) / Decimal(40)
    assert s.escalation_rate == Decimal("0.5")
    # The same rows as an unknown task: agreement needs P >= 0.99, so everything escalates.
    unknown = [replay_row(r, row, None) for row in rows]
    assert sum(o.cost for o in unknown) == Decimal(48) and all(o.escalated for o in unknown)
    results, _ = evaluate_router(r, rows, GPT4O)
    by_name = {x.strategy: x for x in results}
    assert by_name["thrifty-cascade"].cost_usd == Decimal(28)
    # Classifier: P(mini right) = 0.8 >= 0.7, so every prompt goes to mini alone (cost 1 each).
    assert by_name["thrifty-classifier"].cost_usd == Decimal(4)
    assert by_name["thrifty-classifier"].accuracy == Decimal("0.5")


def _synthetic(n: int, task: str, wrong_every: int) -> list[Row]:
    rows = []
    for i in range(n):
        if i % wrong_every == 0:
            rows.append(_row(f"{task}{i}", task, {MINI: "5", FLASH: "6"}, "4"))
        else:
            rows.append(_row(f"{task}{i}", task, {}, "4"))
    return rows


def test_artifact_round_trip(tmp_path: Path) -> None:
    router = train(_synthetic(60, "a", 3) + _synthetic(60, "b", 4), folds=3, ladder=(MINI, FLASH))
    path = tmp_path / "router.json"
    router.save(path)
    loaded = Router.load(path)
    assert loaded == router
    obj = json.loads(path.read_text())
    assert obj["format"] == "thrifty-router" and obj["version"] == 2
    assert obj["fallback"]["first"] is None  # NEVER is stored as null
    for row in _synthetic(10, "a", 2) + _synthetic(10, "zzz", 2):
        assert replay_row(loaded, row, row.task) == replay_row(router, row, row.task)
    with pytest.raises(ValueError):
        Router.from_json({**obj, "version": 1})


def test_training_trusts_agreement_on_seen_tasks_and_is_cautious_on_unseen() -> None:
    # Agreement is always right and a split always means mini is wrong.
    router = train(_synthetic(80, "a", 3) + _synthetic(80, "b", 5), folds=4, ladder=(MINI, FLASH))
    assert set(router.gates) == {"a", "b"}
    assert router.fallback.first == NEVER and router.fallback.second >= AGREE_BONUS
    assert not router.fallback.cost_aware
    test = _synthetic(12, "a", 3)
    seen = run_policy_router(router, test)
    assert all(o.correct for o in seen)
    assert sum(o.escalated for o in seen) == 4  # exactly the splits
    unseen = [replay_row(router, r, "never-seen") for r in test]
    assert all(o.correct for o in unseen)
    assert all(o.calls >= 2 for o in unseen)  # never a lone cheap draft


def test_gate_that_trusts_no_cheap_draft_goes_straight_to_the_strong_model() -> None:
    r = hand_router()
    r = Router(
        **{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "fallback": Gate(NEVER, NEVER, NEVER)}
    )
    step = r.next_step("new", PROMPT, [])
    assert isinstance(step, CallModel) and step.model == GPT4O
    assert r.next_step("new", PROMPT, [Draft(GPT4O, reply("4"))]) == Accept(0, "escalated: 4o answers")
