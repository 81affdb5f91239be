"""Pull the final answer out of a model's reply and normalise it so that answers can be compared.

The rules mirror how the recorded `correct` labels were made (see the data README): the `answer`
field of the first complete JSON object, else a regex on `"answer": ...`; numbers for maths tasks
compare by their first number with `$` and `,` removed, everything else as a string with the
outer quotes stripped. Comparing *normalised* answers is what makes cheap-model agreement a signal.
"""

from __future__ import annotations

import json
import re

from thrifty.routing.answers import canonical

_DECODER = json.JSONDecoder(strict=False)  # models put raw newlines inside JSON strings
_ANSWER_RE = re.compile(r'"answer"\s*:\s*(.+)')
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
# Tasks whose answers compare as numbers (their first number, as gsm is graded). Not competition
# maths: "\frac{1}{2}" and "\frac{1}{3}" share a first number, and a false agreement is accepted
# without escalation; maths tasks and unseen ones ("" here) compare by answer equivalence
# (thrifty.routing.answers: numbers, fractions, LaTeX, units, choice letters). Any other named
# task compares strings with the outer quotes stripped, as its labels were made.
NUMERIC_TASKS = frozenset({"gsm", "gsm8k"})
EQUIVALENCE_TASKS = frozenset({"", "math", "competition_math", "math500", "aime", "mmlu", "gpqa"})


def first_json_object(text: str) -> dict[str, object] | None:
    """The first complete JSON object in `text` (models wrap it in prose and code fences)."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def _as_text(value: object) -> str:
    # str() renders True/None/lists the way Python prints them, which is what crux references use.
    return value if isinstance(value, str) else str(value)


_UNPARSED: dict[str, object] = {}  # a sentinel: "not parsed yet", distinct from None ("no object")


def extract_answer(output: str, obj: dict[str, object] | None = _UNPARSED) -> str | None:
    """The raw `answer` field of a reply, or None when the reply has none. `obj` is the reply's
    first JSON object when the caller has already parsed it."""
    if obj is _UNPARSED:
        obj = first_json_object(output)
    if obj is not None and "answer" in obj:
        return _as_text(obj["answer"])
    match = _ANSWER_RE.search(output)
    if match is None:
        return None
    raw = match.group(1).strip().rstrip(",}").strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    return raw


def _strip_quotes(text: str) -> str:
    # Whitespace is kept: a Python string literal's padding is part of the answer ('  7  ').
    return text.strip("'\"")


def normalise(answer: str | None, task: str) -> str | None:
    """A canonical form of an answer for comparison; None when nothing comparable is left."""
    if answer is None:
        return None
    if task in NUMERIC_TASKS:
        match = _NUMBER_RE.search(answer.replace("$", "").replace(",", ""))
        if match is None:
            return None
        value = float(match.group(0))
        return str(int(value)) if value.is_integer() else repr(value)
    if task in EQUIVALENCE_TASKS:
        return canonical(answer)
    # An empty string is a real answer here (a function may return ''), so it is not None.
    return _strip_quotes(answer)


def answer_key(output: str, task: str) -> str | None:
    """Extract and normalise in one step."""
    return normalise(extract_answer(output), task)
