"""Is a fresh answer the same answer as the cached one? The check a route chooses for verification.

* ``evidence``: the request names the sources its answer rests on (``x-thrifty-evidence``): the cached
  answer is right when it rests on the same ones. Needs no upstream call at all.
* ``text``: the answers' text, lower-cased with punctuation and spacing dropped, must be equal (for
  short, deterministic answers: a label, a yes/no, a template).
* ``json_field``: both answers are JSON objects and a field (a dotted path) holds the same value (for
  structured answers: ``{"intent": ..., "reply": ...}`` compared by ``intent``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

_MISSING = object()


def answer_text(response: Mapping[str, Any]) -> str:
    """The first choice's message content (tool calls as their JSON), as a client would read it."""
    choices = response.get("choices") or ()
    message = (choices[0].get("message") or {}) if choices and isinstance(choices[0], dict) else {}
    content = message.get("content")
    if isinstance(content, str) and content:
        return content
    calls = message.get("tool_calls")
    return orjson.dumps(calls).decode() if calls else ""


def normalised_text(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def same_text(cached: Mapping[str, Any], fresh: Mapping[str, Any]) -> bool:
    return normalised_text(answer_text(cached)) == normalised_text(answer_text(fresh))


def field_of(text: str, path: str) -> object:
    """The value at dotted ``path`` in the JSON object ``text`` (fenced ```json blocks accepted)."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        value: object = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return _MISSING
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def same_field(cached: Mapping[str, Any], fresh: Mapping[str, Any], path: str) -> bool:
    """Equal values at ``path``; an answer without the field (or not JSON) is never the same."""
    a = field_of(answer_text(cached), path)
    b = field_of(answer_text(fresh), path)
    return a is not _MISSING and b is not _MISSING and a == b


def same_evidence(cached: Sequence[str], asked: Sequence[str]) -> bool:
    return bool(asked) and sorted(set(cached)) == sorted(set(asked))


def same_answer(
    method: str, cached: Mapping[str, Any], fresh: Mapping[str, Any], json_field: str | None = None
) -> bool:
    """The verdict of ``text`` or ``json_field`` on two chat completion bodies."""
    if method == "json_field":
        assert json_field is not None
        return same_field(cached, fresh, json_field)
    return same_text(cached, fresh)


__all__ = ["answer_text", "field_of", "normalised_text", "same_answer", "same_evidence", "same_text"]
