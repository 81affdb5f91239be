"""Quality gates on crafted good and bad answers."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from thrifty.errors import ConfigError
from thrifty.routing.gates import (
    AgreementGate,
    Draft,
    JsonSchemaGate,
    LogprobGate,
    PydanticGate,
    PythonGate,
    SelfConfidenceGate,
    judge_all,
    normalised_answer,
    reply_json,
)
from thrifty.settings import GateSettings


class Invoice(pydantic.BaseModel):
    total: float
    currency: str


def total_is_positive(request: dict[str, Any], response: dict[str, Any]) -> tuple[bool, str]:
    parsed = reply_json(response["choices"][0]["message"]["content"])
    ok = isinstance(parsed, dict) and float(parsed.get("total", 0)) > 0
    return ok, "total > 0" if ok else "total missing or not positive"


def _draft(text: str, logprobs: list[float] | None = None, model: str = "cheap") -> Draft:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "x", "logprob": lp} for lp in logprobs]}
    return Draft(model, {"messages": [{"role": "user", "content": "q"}]}, {"choices": [choice]})


async def _no_voters(model: str) -> Draft | None:
    raise AssertionError("this gate must not ask anyone")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"answer": 42}', {"answer": 42}),
        ('```json\n{"answer": "7"}\n```', {"answer": "7"}),
        ('Sure! Here it is: {"answer": "x", "n": [1, 2]} -- done', {"answer": "x", "n": [1, 2]}),
        ("no json at all", None),
    ],
)
def test_reply_json_finds_the_json_in_a_reply(text, value):
    assert reply_json(text) == value


def test_answers_compare_as_a_reader_would():
    assert normalised_answer("$1,234.00") == normalised_answer(1234) == normalised_answer(" 1234 ")
    assert normalised_answer("Paris.") == normalised_answer("paris")
    assert normalised_answer("42") != normalised_answer("43")


async def test_json_schema_gate():
    gate = JsonSchemaGate(
        {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    )
    assert (await gate.judge(_draft('{"answer": 3}'), _no_voters)).passed
    bad = await gate.judge(_draft('{"answer": "three"}'), _no_voters)
    assert not bad.passed and "answer" in bad.reason and "integer" in bad.reason
    missing = await gate.judge(_draft('{"other": 1}'), _no_voters)
    assert not missing.passed and "'answer' is a required property" in missing.reason
    assert not (await gate.judge(_draft("three"), _no_voters)).passed
    with pytest.raises(ConfigError, match="schema is invalid"):
        JsonSchemaGate({"type": "no-such-type"})


async def test_pydantic_gate():
    gate = PydanticGate(f"{__name__}:Invoice")
    assert (await gate.judge(_draft('{"total": 12.5, "currency": "EUR"}'), _no_voters)).passed
    bad = await gate.judge(_draft('{"total": "lots"}'), _no_voters)
    assert not bad.passed and bad.reason.startswith("pydantic Invoice: total")
    with pytest.raises(ConfigError, match="not a pydantic model"):
        PydanticGate(f"{__name__}:total_is_positive")
    with pytest.raises(ConfigError, match="cannot load"):
        PydanticGate("no_such_module_x:Model")


async def test_agreement_gate_asks_only_as_many_voters_as_it_needs():
    asked: list[str] = []
    answers = {"v1": '{"answer": "42.0"}', "v2": '{"answer": 41}', "v3": '{"answer": "$42"}'}

    async def ask(model: str) -> Draft | None:
        asked.append(model)
        return _draft(answers[model], model=model)

    two_of_three = AgreementGate(["v1", "v2", "v3"], "answer", min_agree=2)
    verdict = await two_of_three.judge(_draft('{"answer": 42}'), ask)
    assert verdict.passed and asked == ["v1", "v2", "v3"] and "2/2" in verdict.reason
    asked.clear()
    all_three = AgreementGate(["v1", "v2", "v3"], "answer", min_agree=None)
    verdict = await all_three.judge(_draft('{"answer": 42}'), ask)
    assert not verdict.passed and asked == ["v1", "v2"]  # v2 disagreed: v3 can no longer make it
    asked.clear()
    one = AgreementGate(["v2", "v1"], "answer", min_agree=1)
    assert (await one.judge(_draft('{"answer": 42}'), ask)).passed and asked == ["v2", "v1"]
    asked.clear()
    assert not (await one.judge(_draft("no answer field"), ask)).passed and asked == []

    async def down(model: str) -> Draft | None:
        return None  # a voter that failed counts as disagreeing

    assert not (await AgreementGate(["v1"], "answer", None).judge(_draft('{"answer": 1}'), down)).passed
    with pytest.raises(ConfigError):
        AgreementGate(["v1"], "answer", min_agree=2)


async def test_logprob_gate():
    gate = LogprobGate(0.8)
    assert (await gate.judge(_draft("x", [-0.01, -0.05, -0.1]), _no_voters)).passed  # mean p ~0.95
    low = await gate.judge(_draft("x", [-0.1, -2.0, -1.5]), _no_voters)
    assert not low.passed and "0.3" in low.reason
    assert not (await gate.judge(_draft("x"), _no_voters)).passed  # no logprobs: cannot vouch for it


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ('{"answer": 1, "confidence": 0.93}', True),
        ('{"answer": 1, "confidence": 85}', False),  # 85% < 90%
        ('{"answer": 1, "confidence": 95}', True),
        ('{"answer": 1, "confidence": "high"}', False),
        ('{"answer": 1}', False),
    ],
)
async def test_self_confidence_gate(text, passed):
    assert (await SelfConfidenceGate("confidence", 0.9).judge(_draft(text), _no_voters)).passed is passed


async def test_python_gate_and_all_gates_in_order():
    gate = PythonGate(f"{__name__}:total_is_positive")
    assert (await gate.judge(_draft('{"total": 3}'), _no_voters)).passed
    verdict = await gate.judge(_draft('{"total": -3}'), _no_voters)
    assert not verdict.passed and "not positive" in verdict.reason
    schema = JsonSchemaGate({"type": "object", "required": ["total"]})
    first_fails = await judge_all([schema, gate], _draft('{"currency": "EUR"}'), _no_voters)
    assert not first_fails.passed and first_fails.reason.startswith("json_schema")
    both = await judge_all([schema, gate], _draft('{"total": 9}'), _no_voters)
    assert both.passed and "json_schema: valid" in both.reason and "total > 0" in both.reason


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "json_schema"}, "needs json_schema"),
        ({"kind": "agreement"}, "needs voters"),
        ({"kind": "logprob"}, "needs threshold"),
        ({"kind": "self_confidence", "threshold": 0.9}, "needs field"),
        ({"kind": "python"}, "needs target"),
    ],
)
def test_incomplete_gate_settings_are_refused(settings, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        GateSettings.model_validate(settings)
