"""Scorers: whether one model output passes one golden item. Pure, except the LLM judge (the
runner calls it through the gateway, so its cost is priced and recorded as the eval's).

Each scorer states which item fields it needs, so a golden set is checked line by line before any
model is called (`golden.py`).
"""

from __future__ import annotations

import importlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema
import pydantic

from thrifty.routing.answers import equivalent
from thrifty.routing.train.extract import extract_answer, first_json_object, normalise


@dataclass(frozen=True, slots=True)
class ScorerSpec:
    name: str
    needs: tuple[str, ...]  # item fields that must be present (and not null)
    help: str


SCORERS: dict[str, ScorerSpec] = {
    s.name: s
    for s in (
        ScorerSpec("exact", ("expected",), "the output equals `expected`"),
        ScorerSpec("normalised", ("expected",), "equal after case, whitespace and punctuation folding"),
        ScorerSpec("numeric", ("expected",), "the output's number is within `tolerance` of `expected`"),
        ScorerSpec("regex", ("expected",), "the regular expression `expected` matches the output"),
        ScorerSpec("contains", ("expected",), "the output contains `expected` (case-insensitive)"),
        ScorerSpec("maths", ("expected",), "the same maths answer: 1/2, 0.5, \\frac{1}{2}, \\boxed{...}"),
        ScorerSpec("json_schema", ("schema",), "the output is JSON valid against `schema`"),
        ScorerSpec("pydantic", ("model",), "the output's JSON validates as the pydantic `model`"),
        ScorerSpec("python", ("callable",), "`callable(output, item) -> bool` says it passes"),
        ScorerSpec("judge", ("judge",), "an LLM judge (`judge: {model, rubric}`) answers PASS"),
        ScorerSpec("zeroeval", ("expected",), "the ZeroEval label rule for the item's `task`"),
    )
}

_WORDS = re.compile(r"[^\w]+", re.UNICODE)
_FIRST_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def fold(text: str) -> str:
    """Case, accents, punctuation and whitespace folded away: 'The  Answer: Paris.' -> 'the answer paris'."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _WORDS.sub(" ", text.casefold()).strip()


def first_number(text: str) -> Decimal | None:
    match = _FIRST_NUMBER.search(text.replace(",", "").replace("$", ""))
    if match is None:
        return None
    try:
        return Decimal(match.group(0))
    except InvalidOperation:
        return None


def resolve_object(path: str, what: str) -> Any:
    """`module:attr` (or `module.attr`) imported; a ValueError naming the problem otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not 'module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {path!r}: cannot import {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"{what} {path!r}: {module_name!r} has no {attr!r}") from err


def _json_of(output: str) -> Any:
    try:
        return json.loads(output)
    except ValueError:
        return first_json_object(output)


def score_output(item: Any, output: str) -> bool:
    """Whether `output` passes `item` for every scorer but the judge (see `judge_prompt`)."""
    scorer = item.scorer
    expected = item.expected
    if item.extract == "answer" and scorer != "zeroeval":
        output = extract_answer(output) or ""
    if scorer == "exact":
        return output.strip() == str(expected).strip()
    if scorer == "normalised":
        return fold(output) == fold(str(expected))
    if scorer == "numeric":
        got, want = first_number(output), first_number(str(expected))
        return got is not None and want is not None and abs(got - want) <= Decimal(str(item.tolerance))
    if scorer == "regex":
        return re.search(str(expected), output, re.DOTALL) is not None
    if scorer == "contains":
        return str(expected).casefold() in output.casefold()
    if scorer == "maths":
        return equivalent(output, str(expected))
    if scorer == "zeroeval":
        # A recorded label is the ground truth for the output it was made for (the rule below
        # differs from the labels on 13 of 12,000 crux outputs, e.g. '"Done!"' vs "'Done!'").
        for rec in item.recorded.values():
            if rec.get("output") == output and rec.get("correct") in (0, 1):
                return bool(rec["correct"])
        key = normalise(extract_answer(output), item.task or "")
        return key is not None and key == normalise(str(expected), item.task or "")
    if scorer == "json_schema":
        value = _json_of(output)
        if value is None:
            return False
        return not any(True for _ in jsonschema.Draft202012Validator(item.schema).iter_errors(value))
    if scorer == "pydantic":
        model = item.resolved
        value = _json_of(output)
        try:
            model.model_validate(value)
        except pydantic.ValidationError:
            return False
        return value is not None
    if scorer == "python":
        fn: Callable[[str, Any], object] = item.resolved
        return bool(fn(output, item))
    raise ValueError(f"scorer {scorer!r} is not scored locally")


JUDGE_SYSTEM = (
    "You grade an answer against a rubric. Reply with exactly one word on the first line: PASS or FAIL."
)


def judge_messages(item: Any, output: str) -> list[dict[str, str]]:
    rubric = str(item.judge.get("rubric", "Is the answer correct and complete?"))
    parts = [f"Rubric: {rubric}", f"Task:\n{item.prompt_text()}"]
    if item.expected is not None:
        parts.append(f"Reference answer:\n{item.expected}")
    parts.append(f"Answer to grade:\n{output}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def judge_verdict(reply: str) -> bool:
    """PASS only when the judge's first word says so; anything else (FAIL, prose, empty) fails."""
    words = reply.strip().split()
    return bool(words) and words[0].strip("*.:").upper() == "PASS"
