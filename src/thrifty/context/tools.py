"""Shortening tool results structurally, so what is left still reads as the tool's answer.

A JSON result keeps every key; arrays longer than the level's limit keep their first items and end
with a marker string saying how many were cut; long strings are cut with a marker saying how many
characters went. Text that is not JSON is cut at the last line or sentence end within the level's
length, with the same kind of marker. Levels get stricter one by one, applied to the oldest results
first, until the section fits; tool definitions are never rewritten (they are the model's contract).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# (items kept per array, characters kept per string), from lenient to strict.
LEVELS: tuple[tuple[int, int], ...] = ((20, 2000), (10, 600), (5, 200), (2, 80), (1, 40))
_BREAK = re.compile(r"(?<=[.!?])\s+|\n")


def _items_marker(n: int) -> str:
    return f"[thrifty: {n} more item{'s' if n != 1 else ''} cut]"


def _chars_marker(n: int) -> str:
    return f"[thrifty: {n} more characters cut]"


def shorten_json(value: Any, max_items: int, max_chars: int) -> Any:
    if isinstance(value, dict):
        return {k: shorten_json(v, max_items, max_chars) for k, v in value.items()}
    if isinstance(value, list):
        kept = [shorten_json(v, max_items, max_chars) for v in value[:max_items]]
        if len(value) > max_items:
            kept.append(_items_marker(len(value) - max_items))
        return kept
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "…" + _chars_marker(len(value) - max_chars)
    return value


def shorten_text(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    end = max_chars
    breaks = [m.end() for m in _BREAK.finditer(text, 0, max_chars)]
    if breaks and breaks[-1] > max_chars // 2:
        end = breaks[-1]
    return text[:end].rstrip() + " …" + _chars_marker(len(text) - end)


def shorten(content: str, level: tuple[int, int]) -> str:
    """One tool result at one level; JSON stays valid JSON."""
    max_items, max_chars = level
    stripped = content.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            parsed = None
        if parsed is not None:
            short = orjson.dumps(shorten_json(parsed, max_items, max_chars)).decode()
            return short if len(short) < len(content) else content
    return shorten_text(content, max_chars * 4)
