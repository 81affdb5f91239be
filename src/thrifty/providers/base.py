"""The provider port: what the gateway needs from any model provider."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from thrifty.types import ModelTarget, UpstreamResult, Usage


@dataclass(slots=True)
class StreamChunk:
    """One `chat.completion.chunk`, in OpenAI's shape.

    `raw` holds the provider's own bytes when the chunk is relayed unchanged, so the gateway
    does not serialise it again. `usage` is set on the chunk that carries the final usage.
    """

    data: dict[str, Any]
    raw: bytes | None = None
    usage: Usage | None = None


class Provider(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def complete(self, target: ModelTarget, body: dict[str, Any]) -> UpstreamResult: ...

    def stream(self, target: ModelTarget, body: dict[str, Any]) -> AsyncIterator[StreamChunk]: ...


async def close_stream(chunks: AsyncIterator[Any]) -> None:
    """Close an async iterator early (releasing its connection) when it is a generator."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def relay_and_keep(
    chunks: AsyncIterator[StreamChunk], on_end: Callable[[list[StreamChunk] | None], None]
) -> AsyncIterator[StreamChunk]:
    """Relay a stream while keeping its chunks; `on_end` gets them if it finished, else None."""
    kept: list[StreamChunk] = []
    finished = False
    try:
        async for chunk in chunks:
            kept.append(chunk)
            yield chunk
        finished = True
    finally:
        await close_stream(chunks)
        on_end(kept if finished else None)


def chunk_text(data: dict[str, Any]) -> str:
    """The generated text a chunk adds (content and tool-call arguments), for local counting."""
    parts: list[str] = []
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            parts.append(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            if fn.get("name"):
                parts.append(fn["name"])
            if fn.get("arguments"):
                parts.append(fn["arguments"])
    return "".join(parts)


def chunk_finishes(data: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") for choice in data.get("choices") or ())
