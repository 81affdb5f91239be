"""Redaction of a recording before it is written: pure, and applied to copies."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from thrifty.settings import RedactRule


class Redactor:
    def __init__(self, rules: Sequence[RedactRule]) -> None:
        self._patterns = [(re.compile(r.pattern), r.replace) for r in rules if r.pattern is not None]
        self._fields = [r.field.split(".") for r in rules if r.field is not None]
        self.drops_user = any(path == ["user"] for path in self._fields)

    def _text(self, text: str) -> str:
        for pattern, replace in self._patterns:
            text = pattern.sub(replace, text)
        return text

    def _walk(self, value: Any) -> Any:
        """A copy of a JSON value with every string redacted (keys are left as they are)."""
        if isinstance(value, str):
            return self._text(value) if self._patterns else value
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v) for v in value]
        return value

    def _drop(self, value: Any, path: list[str]) -> None:
        head, rest = path[0], path[1:]
        if head == "*":
            items = (
                value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            )
            for item in items:
                if rest:
                    self._drop(item, rest)
            return
        if isinstance(value, dict) and head in value:
            if rest:
                self._drop(value[head], rest)
            else:
                del value[head]

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        copy: dict[str, Any] = self._walk(body)
        for path in self._fields:
            self._drop(copy, path)
        return copy

    def response(self, body: dict[str, Any]) -> dict[str, Any]:
        copy: dict[str, Any] = self._walk(body)
        return copy

    def text(self, value: str | None) -> str | None:
        """An attribution value (user, feature) passes the regexes too."""
        return None if value is None else self._text(value)


__all__ = ["Redactor"]
