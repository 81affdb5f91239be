"""A route's recorded traffic (for `thrifty simulate`) and the redactions applied before it is written."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict

REDACT_PRESETS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "card_number": r"\b(?:\d[ -]?){12,18}\d\b",
    "phone": r"\+?\d[\d ()-]{7,}\d",
}


class RedactRule(_Strict):
    """One redaction applied before a recording is written: exactly one of `regex` (every match in
    every string of the request and the response), `preset` (a built-in regex) or `field` (a
    request body field removed, dotted, `*` for every item of a list: `user`, `metadata.email`,
    `messages.*.name`; `user` also drops the recorded user attribution)."""

    regex: str | None = None
    preset: Literal["email", "card_number", "phone"] | None = None
    field: str | None = None
    replace: str = "[redacted]"

    @model_validator(mode="after")
    def _one(self) -> RedactRule:
        given = [k for k in ("regex", "preset", "field") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a redact rule has exactly one of regex, preset, field")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex {self.regex!r} does not compile: {err}") from err
        if self.field is not None and (not self.field.strip() or self.field.startswith(".")):
            raise ValueError(f"field {self.field!r}: name a request body field, e.g. user or metadata.email")
        return self

    @property
    def pattern(self) -> str | None:
        return REDACT_PRESETS[self.preset] if self.preset is not None else self.regex


class RecordSettings(_Strict):
    """Per route, opt-in: store a sample of its requests and answers (redacted) for replays."""

    sample: float = Field(default=1.0, ge=0, le=1)
    redact: list[RedactRule] = Field(default_factory=list)
