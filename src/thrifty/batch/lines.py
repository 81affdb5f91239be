"""One line of an OpenAI batch input file -> a chat request, or an error naming the line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass
from typing import Any

import orjson

from thrifty.errors import InvalidRequest
from thrifty.gateway import parse_chat_body

CHAT_ENDPOINT = "/v1/chat/completions"
ENDPOINTS = frozenset({CHAT_ENDPOINT})
MAX_CUSTOM_ID = 512


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) from chunks of a file, holding at most one line and one chunk."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


@dataclass(frozen=True, slots=True)
class InputLine:
    line_no: int  # 1-based, as editors count
    custom_id: str
    body: dict[str, Any]


class LineError(Exception):
    """A line that cannot be sent; it becomes a line of the batch's error file."""

    def __init__(self, line_no: int, custom_id: str | None, code: str, message: str) -> None:
        super().__init__(message)
        self.line_no = line_no
        self.custom_id = custom_id
        self.code = code
        self.message = f"line {line_no}: {message}"


def parse_line(raw: bytes, line_no: int, endpoint: str, seen: Set[str], route: str | None) -> InputLine:
    """Check a line as OpenAI does (JSON object, custom_id, method, url) and its body as thrifty does."""
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise LineError(line_no, None, "invalid_json", f"not valid JSON ({err})") from err
    if not isinstance(row, dict):
        raise LineError(line_no, None, "invalid_line", "a line must be a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise LineError(
            line_no,
            None,
            "invalid_custom_id",
            f"'custom_id' must be a string of 1-{MAX_CUSTOM_ID} characters",
        )
    if custom_id in seen:
        raise LineError(
            line_no, custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line"
        )
    if row.get("method") != "POST":
        raise LineError(line_no, custom_id, "invalid_method", "'method' must be \"POST\"")
    if row.get("url") != endpoint:
        raise LineError(
            line_no,
            custom_id,
            "mismatched_endpoint",
            f"'url' is {row.get('url')!r}; this batch is for {endpoint}",
        )
    body = row.get("body")
    if not isinstance(body, dict):
        raise LineError(line_no, custom_id, "invalid_body", "'body' must be a JSON object (the request)")
    if body.get("stream"):
        raise LineError(
            line_no, custom_id, "invalid_body", "'stream' is not possible in a batch; leave it out"
        )
    try:
        parsed = parse_chat_body(orjson.dumps(body), route)
    except InvalidRequest as err:
        raise LineError(line_no, custom_id, "invalid_body", err.message) from err
    return InputLine(line_no, custom_id, parsed)
