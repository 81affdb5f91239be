"""The golden-set format: one JSON object a line, checked line by line before any model is called.

    {"id": "q1", "prompt": "2+2?" | "messages": [...], "expected": "4", "scorer": "exact",
     "tags": ["arith"], "tolerance": 0.01, "schema": {...}, "model": "pkg.mod:Model",
     "callable": "pkg.mod:fn", "judge": {"model": "gpt-4o", "rubric": "..."}, "extract": "answer"}

`extract: "answer"` scores the `answer` field of the output's JSON instead of the whole output.
A ZeroEval row (`{"id", "task", "prompt", "reference", "responses": {MODEL: {"output", "correct"}}}`)
is a golden item too: `reference` is its expected answer, scored by the ZeroEval label rule for its
task, and its recorded outputs come along (`recorded`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import InvalidData
from thrifty.evals.scorers import SCORERS, resolve_object

_KNOWN_FIELDS = frozenset(
    {
        "id", "prompt", "messages", "expected", "scorer", "tags", "tolerance", "schema", "model",
        "callable", "judge", "extract", "task", "reference", "responses",
    }
)  # fmt: skip
EXTRACTORS = ("answer",)


@dataclass(frozen=True, slots=True)
class GoldenItem:
    id: str
    messages: tuple[dict[str, Any], ...]
    expected: Any
    scorer: str
    tags: tuple[str, ...] = ()
    task: str | None = None
    tolerance: float = 0.0
    schema: dict[str, Any] | None = None
    judge: dict[str, Any] = field(default_factory=dict)
    extract: str | None = None
    resolved: Any = None  # the pydantic model or Python callable, imported once at load
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)  # ZeroEval: model -> output/correct
    prompt: str | None = None  # the plain prompt, when the item was given as one

    def prompt_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.messages if m.get("role") == "user")


@dataclass(frozen=True, slots=True)
class GoldenSet:
    path: str
    items: tuple[GoldenItem, ...]
    fingerprint: str  # the same items and expectations <=> the same fingerprint

    def needs_judge(self) -> bool:
        return any(i.scorer == "judge" for i in self.items)


def _fail(where: str, message: str) -> InvalidData:
    return InvalidData(f"{where}: {message}")


def parse_item(row: Any, where: str) -> GoldenItem:
    if not isinstance(row, dict):
        raise _fail(where, "a golden item must be a JSON object")
    unknown = sorted(set(row) - _KNOWN_FIELDS)
    if unknown:
        raise _fail(
            where, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN_FIELDS))})"
        )
    item_id = row.get("id")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
        raise _fail(where, "'id' is missing (every item needs a unique string id)")
    zeroeval = "responses" in row and "reference" in row
    scorer = row.get("scorer", "zeroeval" if zeroeval else None)
    if scorer is None:
        raise _fail(where, f"item {item_id!r} has no 'scorer' (one of {', '.join(SCORERS)})")
    spec = SCORERS.get(str(scorer))
    if spec is None:
        raise _fail(where, f"item {item_id!r}: unknown scorer {scorer!r} (known: {', '.join(SCORERS)})")
    expected = row.get("expected", row.get("reference") if zeroeval else None)
    values = {**row, "expected": expected}
    missing = [f for f in spec.needs if values.get(f) is None]
    if missing:
        raise _fail(
            where, f"item {item_id!r}: scorer {spec.name!r} needs {' and '.join(repr(m) for m in missing)}"
        )
    prompt = row.get("prompt")
    messages = row.get("messages")
    if (prompt is None) == (messages is None):
        raise _fail(
            where, f"item {item_id!r} needs exactly one of 'prompt' (a string) or 'messages' (a list)"
        )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise _fail(where, f"item {item_id!r}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m for m in messages)
    ):
        raise _fail(
            where, f"item {item_id!r}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    tags = row.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _fail(where, f"item {item_id!r}: 'tags' must be a list of strings")
    tolerance = row.get("tolerance", 0)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
        raise _fail(where, f"item {item_id!r}: 'tolerance' must be a number >= 0")
    extract = row.get("extract")
    if extract is not None and extract not in EXTRACTORS:
        raise _fail(where, f"item {item_id!r}: 'extract' must be one of {', '.join(EXTRACTORS)}")
    resolved: Any = None
    if spec.name == "json_schema":
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(row["schema"])
        except jsonschema.SchemaError as err:
            raise _fail(
                where, f"item {item_id!r}: 'schema' is not a valid JSON schema ({err.message})"
            ) from err
    if spec.name in ("pydantic", "python"):
        key = "model" if spec.name == "pydantic" else "callable"
        try:
            resolved = resolve_object(str(row[key]), key)
        except ValueError as err:
            raise _fail(where, f"item {item_id!r}: {err}") from err
        if spec.name == "pydantic" and not hasattr(resolved, "model_validate"):
            raise _fail(where, f"item {item_id!r}: 'model' {row[key]!r} is not a pydantic model")
        if spec.name == "python" and not callable(resolved):
            raise _fail(where, f"item {item_id!r}: 'callable' {row[key]!r} is not callable")
    judge = row.get("judge") or {}
    if spec.name == "judge" and (not isinstance(judge, dict) or not isinstance(judge.get("model"), str)):
        raise _fail(where, f'item {item_id!r}: \'judge\' must be {{"model": NAME, "rubric": TEXT}}')
    if spec.name == "regex":
        import re

        try:
            re.compile(str(expected))
        except re.error as err:
            raise _fail(
                where, f"item {item_id!r}: 'expected' is not a valid regular expression ({err})"
            ) from err
    recorded = {}
    if zeroeval and isinstance(row["responses"], dict):
        recorded = {m: r for m, r in row["responses"].items() if isinstance(r, dict)}
    return GoldenItem(
        id=str(item_id),
        messages=tuple(messages),
        expected=expected,
        scorer=spec.name,
        tags=tuple(tags),
        task=row.get("task"),
        tolerance=float(tolerance),
        schema=row.get("schema"),
        judge=judge,
        extract=extract,
        resolved=resolved,
        recorded=recorded,
        prompt=prompt,
    )


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    # Recorded outputs are not part of what the set asks; everything else is.
    return {k: v for k, v in row.items() if k != "responses"}


def load_golden(path: Path | str, *, limit: int | None = None) -> GoldenSet:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InvalidData(f"cannot read golden set {path}: {err.strerror}") from err
    items: list[GoldenItem] = []
    seen: dict[str, int] = {}
    digest = hashlib.sha256()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            raise _fail(where, f"not JSON ({err})") from err
        item = parse_item(row, where)
        if item.id in seen:
            raise _fail(where, f"id {item.id!r} is also on line {seen[item.id]} (ids must be unique)")
        seen[item.id] = lineno
        items.append(item)
        digest.update(orjson.dumps(_identity(row), option=orjson.OPT_SORT_KEYS) + b"\n")
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InvalidData(f"golden set {path} has no items")
    return GoldenSet(str(path), tuple(items), digest.hexdigest()[:16])
