"""Golden-set lines are checked before any call, and each scorer passes and fails on crafted cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from thrifty.errors import InvalidData
from thrifty.evals.golden import load_golden, parse_item
from thrifty.evals.scorers import judge_verdict, score_output

HELPERS = "tests.evals_helpers:"
INVOICE, ENDS = HELPERS + "Invoice", HELPERS + "ends_with_expected"
DROP = object()  # a field left out of the row
ZEROEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "zeroeval"


def item(**row: Any) -> Any:
    return parse_item({"id": "x", "prompt": "q?", **row}, "set.jsonl:1")


@pytest.mark.parametrize(
    ("row", "output", "passes"),
    [
        ({"scorer": "exact", "expected": "Paris"}, " Paris\n", True),
        ({"scorer": "exact", "expected": "Paris"}, "paris", False),
        ({"scorer": "normalised", "expected": "Paris."}, "  PARIS ", True),
        ({"scorer": "normalised", "expected": "São Paulo"}, "sao paulo!", True),
        ({"scorer": "normalised", "expected": "Paris"}, "Paris, France", False),
        ({"scorer": "numeric", "expected": "3.14", "tolerance": 0.01}, "about 3.1415", True),
        ({"scorer": "numeric", "expected": "3.14", "tolerance": 0.001}, "about 3.1415", False),
        ({"scorer": "numeric", "expected": 1200}, "$1,200 in total", True),
        ({"scorer": "numeric", "expected": 5}, "no number here", False),
        ({"scorer": "regex", "expected": r"^\d{3}-\d{4}$"}, "555-1234", True),
        ({"scorer": "regex", "expected": r"^\d{3}-\d{4}$"}, "call 555-1234", False),
        ({"scorer": "contains", "expected": "refund"}, "Your REFUND is on its way", True),
        ({"scorer": "contains", "expected": "refund"}, "no money back", False),
        ({"scorer": "maths", "expected": "\\frac{1}{2}"}, "0.5", True),
        ({"scorer": "maths", "expected": "0.5"}, "$\\boxed{\\dfrac12}$", True),
        ({"scorer": "maths", "expected": "1/2"}, "\\frac{1}{2}", True),
        ({"scorer": "maths", "expected": "\\frac{1}{2}"}, "\\frac{1}{3}", False),
        ({"scorer": "maths", "expected": "0.5"}, "1/3", False),
        ({"scorer": "maths", "expected": "1/2", "extract": "answer"}, '{"answer": "0.50"}', True),
        ({"scorer": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '{"a": 1}', True),
        ({"scorer": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', False),
        ({"scorer": "json_schema", "schema": {"type": "object"}}, "not json", False),
        ({"scorer": "pydantic", "model": INVOICE}, 'x {"total": 9.5, "currency": "EUR"}', True),
        ({"scorer": "pydantic", "model": INVOICE}, '{"total": "lots"}', False),
        ({"scorer": "python", "callable": ENDS, "expected": "42"}, "it is 42", True),
        ({"scorer": "python", "callable": ENDS, "expected": "42"}, "42 it is", False),
        ({"scorer": "zeroeval", "task": "gsm", "expected": "# 3"}, '{"why": "..", "answer": "3.0"}', True),
        ({"scorer": "zeroeval", "task": "gsm", "expected": "# 3"}, '{"answer": "4"}', False),
    ],
)  # fmt: skip
def test_each_scorer(row: dict[str, Any], output: str, passes: bool):
    assert score_output(item(**row), output) is passes


def test_the_judge_passes_only_on_a_first_word_of_pass():
    assert judge_verdict("PASS\nthe answer is right")
    assert judge_verdict("**Pass**.")
    assert not judge_verdict("FAIL")
    assert not judge_verdict("The answer would PASS")
    assert not judge_verdict("")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"scorer": "exact"}, "item 'a': scorer 'exact' needs 'expected'"),
        ({"scorer": "fuzzy", "expected": "x"}, "unknown scorer 'fuzzy'"),
        ({"expected": "x"}, "item 'a' has no 'scorer'"),
        ({"id": DROP, "scorer": "exact", "expected": "x"}, "'id' is missing"),
        ({"prompt": DROP, "scorer": "exact", "expected": "x"}, "exactly one of 'prompt'"),
        ({"scorer": "exact", "expected": "x", "expect": 1}, "unknown field(s) expect"),
        ({"scorer": "regex", "expected": "("}, "not a valid regular expression"),
        ({"scorer": "python", "callable": HELPERS + "nope"}, "has no 'nope'"),
        ({"scorer": "pydantic", "model": "nowhere.mod:M"}, "cannot import 'nowhere.mod'"),
        ({"scorer": "json_schema", "schema": {"type": 5}}, "not a valid JSON schema"),
        ({"scorer": "judge", "judge": {"rubric": "r"}}, "'judge' must be"),
    ],
)  # fmt: skip
def test_a_bad_line_is_a_clear_error_naming_the_line(tmp_path: Path, row: dict[str, Any], message: str):
    good = {"id": "ok", "prompt": "q", "scorer": "exact", "expected": "x"}
    row = {k: v for k, v in {"id": "a", "prompt": "q", **row}.items() if v is not DROP}
    path = tmp_path / "set.jsonl"
    path.write_bytes(orjson.dumps(good) + b"\n\n" + orjson.dumps(row) + b"\n")
    with pytest.raises(InvalidData) as err:
        load_golden(path)
    assert err.value.message.startswith(f"{path}:3: ")
    assert message in err.value.message


def test_duplicate_ids_and_bad_json_name_their_lines(tmp_path: Path):
    path = tmp_path / "set.jsonl"
    line = orjson.dumps({"id": "a", "prompt": "q", "scorer": "exact", "expected": "x"})
    path.write_bytes(line + b"\n" + line + b"\n")
    with pytest.raises(InvalidData, match=r"set.jsonl:2: id 'a' is also on line 1"):
        load_golden(path)
    path.write_bytes(line + b"\n{not json\n")
    with pytest.raises(InvalidData, match=r"set.jsonl:2: not JSON"):
        load_golden(path)


def test_the_fingerprint_follows_what_is_asked_not_the_recorded_outputs(tmp_path: Path):
    row = {
        "id": "a",
        "task": "gsm",
        "prompt": "q",
        "reference": "1",
        "responses": {"m": {"output": "1", "correct": 1}},
    }
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_bytes(orjson.dumps(row) + b"\n")
    b.write_bytes(orjson.dumps({**row, "responses": {}}) + b"\n")
    c.write_bytes(orjson.dumps({**row, "reference": "2"}) + b"\n")
    assert load_golden(a).fingerprint == load_golden(b).fingerprint != load_golden(c).fingerprint


@pytest.mark.skipif(not ZEROEVAL.is_dir(), reason="the shared ZeroEval data is not here")
def test_zeroeval_rows_are_a_golden_set_whose_scorer_reproduces_every_recorded_label():
    for name in ("gsm.jsonl", "crux.jsonl"):
        golden = load_golden(ZEROEVAL / name)
        assert all(i.scorer == "zeroeval" and i.recorded for i in golden.items)
        wrong = [
            (i.id, model)
            for i in golden.items
            for model, rec in i.recorded.items()
            if score_output(i, rec["output"]) is not bool(rec["correct"])
        ]
        assert wrong == []
        # Without the recorded labels the rule alone: exact on gsm, 5 quote-style cases on crux.
        by_rule = sum(
            score_output(dataclasses.replace(i, recorded={}), rec["output"]) is not bool(rec["correct"])
            for i in golden.items
            for rec in i.recorded.values()
        )
        assert by_rule == {"gsm.jsonl": 0, "crux.jsonl": 5}[name]
