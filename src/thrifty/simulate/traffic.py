"""The traffic format: one recorded request a line (JSONL), what `thrifty simulate` reads and
`thrifty recordings export` writes. Users can feed their own logs in it too.

    {"ts": 1796083200.0,                      # required: epoch seconds or ISO 8601 ("2026-12-01T00:00:00Z")
     "tenant": "acme",                         # required
     "request": {"model": "gpt-4o-mini", "messages": [...], ...},   # required: the OpenAI body sent
     "route": "support", "feature": "faq", "prompt_version": "v3", "user": "u-1",
     "idempotency_key": "k-1", "task": "gsm",  # optional attribution, as the x-thrifty-* headers
     "response": {...},                        # optional: the chat completion that answered it
     "model": "gpt-4o-mini-2024-07-18",        # optional: the upstream model that wrote `response`
     "label": "card_arrival",                  # optional: the answer's class (requests with the same
                                               # label may share an answer): scores cache hits
     "outcome": "ok",                          # optional: how it ended, ok (the default) | deferred
                                               # (sent to a batch; `response` is the batch's answer)
                                               # | error (it failed; `error` says how)
     "error": {"type": "upstream_error", "code": null, "status": 503, "message": "..."}}
                                               # with outcome error: the failure, replayed as one

A malformed line is named by file and line; nothing is skipped silently.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT_VERSION = 1
REQUIRED = ("ts", "tenant", "request")
OPTIONAL_TEXT = ("route", "feature", "prompt_version", "user", "idempotency_key", "task", "model", "label")
# Written by `recordings export` for people reading the file; simulate does not need them.
INFORMATIONAL = ("request_id", "cache", "status", "thrifty_traffic")
KNOWN = frozenset(REQUIRED + OPTIONAL_TEXT + INFORMATIONAL + ("response", "outcome", "error"))
OUTCOMES = ("ok", "deferred", "error")


@dataclass(frozen=True, slots=True)
class TrafficLine:
    """One request of recorded traffic. `request` is kept as JSON bytes: 100,000 chats as dicts
    would cost several times the memory, and the gateway parses bytes anyway."""

    where: str  # FILE:LINE
    ts: float
    tenant: str
    request: bytes
    route: str | None = None
    feature: str | None = None
    prompt_version: str | None = None
    user: str | None = None
    idempotency_key: str | None = None
    task: str | None = None
    response: dict[str, Any] | None = None
    model: str | None = None
    label: str | None = None
    outcome: str = "ok"  # one of OUTCOMES
    error: dict[str, Any] | None = None  # with outcome error: {type, code, status, message}

    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.request)
        return parsed


@dataclass(frozen=True, slots=True)
class BadLine:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class TrafficRead:
    lines: list[TrafficLine] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


def parse_ts(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("'ts' must be epoch seconds or an ISO 8601 time")
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ValueError(f"'ts' {value!r} is not an ISO 8601 time") from err
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp()
    return float(value)


def parse_line(raw: bytes, where: str) -> TrafficLine:
    """One line of the traffic format, or ValueError saying what is wrong with it."""
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from err
    if not isinstance(row, dict):
        raise ValueError("a traffic line must be a JSON object")
    unknown = sorted(set(row) - KNOWN)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN))})")
    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        raise ValueError(f"missing required field(s): {', '.join(missing)}")
    ts = parse_ts(row["ts"])
    tenant = row["tenant"]
    if not isinstance(tenant, str) or not tenant:
        raise ValueError("'tenant' must be a non-empty string")
    request = row["request"]
    if not isinstance(request, dict):
        raise ValueError("'request' must be the OpenAI request body (a JSON object)")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'request.messages' must be a non-empty array")
    if not isinstance(request.get("model"), str) and not row.get("route"):
        raise ValueError("'request.model' is required unless the line names a 'route'")
    text: dict[str, str | None] = {}
    for key in OPTIONAL_TEXT:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string")
        text[key] = value
    response = row.get("response")
    if response is not None and not (
        isinstance(response, dict) and isinstance(response.get("choices"), list)
    ):
        raise ValueError("'response' must be a chat completion (an object with 'choices')")
    outcome = row.get("outcome") or "ok"
    if outcome not in OUTCOMES:
        raise ValueError(f"'outcome' must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    error = row.get("error")
    if error is not None and not isinstance(error, dict):
        raise ValueError("'error' must be an object ({type, code, status, message})")
    if outcome == "error" and error is None:
        raise ValueError("a line with outcome 'error' needs its 'error' ({type, code, status, message})")
    if outcome == "error" and response is not None:
        raise ValueError("a line with outcome 'error' has no 'response'")
    return TrafficLine(
        where=where,
        ts=ts,
        tenant=tenant,
        request=orjson.dumps(request),
        response=response,
        outcome=outcome,
        error=error,
        **text,  # the OPTIONAL_TEXT fields, each str | None
    )


def iter_traffic(path: Path) -> Iterator[TrafficLine | BadLine]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield parse_line(raw, where)
            except ValueError as err:
                yield BadLine(where, str(err))


def read_traffic(paths: Iterable[Path]) -> TrafficRead:
    """Every line of the files, in time order (stable for equal times); bad lines listed apart."""
    read = TrafficRead()
    for path in paths:
        for item in iter_traffic(path):
            if isinstance(item, BadLine):
                read.bad.append(item)
            else:
                read.lines.append(item)
    read.lines.sort(key=lambda line: line.ts)
    return read


def to_json(line: TrafficLine) -> dict[str, Any]:
    """The line as the format writes it (None fields left out)."""
    row: dict[str, Any] = {"ts": line.ts, "tenant": line.tenant}
    for key in OPTIONAL_TEXT:
        value = getattr(line, key)
        if value is not None:
            row[key] = value
    row["request"] = orjson.loads(line.request)
    if line.response is not None:
        row["response"] = line.response
    if line.outcome != "ok":
        row["outcome"] = line.outcome
    if line.error is not None:
        row["error"] = line.error
    return row


__all__ = [
    "OUTCOMES",
    "BadLine",
    "TrafficLine",
    "TrafficRead",
    "iter_traffic",
    "parse_line",
    "read_traffic",
    "to_json",
]
