"""Converting between a chat completion and its stream of chunks, for answers replayed later."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from thrifty.providers.base import StreamChunk


def last_user_message_text(messages: Any) -> str | None:
    """The text of the latest user message (text parts joined), wherever it is in the conversation."""
    for message in reversed(messages or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return None


async def stream_from(chunks: list[StreamChunk]) -> AsyncIterator[StreamChunk]:
    for chunk in chunks:
        yield chunk


def as_chunks(body: dict[str, Any], *, with_usage: bool = False) -> list[StreamChunk]:
    """A stored completion replayed to a streaming client as one content chunk and a finish, and,
    for a client that asked for usage (`stream_options.include_usage`), the body's usage last."""
    base = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    out = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        out.append(
            StreamChunk(
                {
                    **base,
                    "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}],
                }
            )
        )
        out.append(
            StreamChunk(
                {
                    **base,
                    "choices": [
                        {
                            "index": choice.get("index", 0),
                            "delta": {},
                            "finish_reason": choice.get("finish_reason"),
                        }
                    ],
                }
            )
        )
    if with_usage and isinstance(body.get("usage"), dict):
        out.append(StreamChunk({**base, "choices": [], "usage": body["usage"]}))
    return out


def as_completion(chunks: list[StreamChunk]) -> dict[str, Any]:
    """A stored stream replayed to a non-streaming client: the chunks folded into one completion."""
    first = chunks[0].data if chunks else {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if chunk.data.get("usage"):
            usage = chunk.data["usage"]
        for choice in chunk.data.get("choices") or ():
            index = choice.get("index", 0)
            slot = choices.setdefault(
                index,
                {"index": index, "message": {"role": "assistant", "content": None}, "finish_reason": None},
            )
            delta = choice.get("delta") or {}
            if delta.get("content"):
                slot["message"]["content"] = (slot["message"]["content"] or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                calls = slot["message"].setdefault("tool_calls", [])
                while len(calls) <= call.get("index", 0):
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                target = calls[call.get("index", 0)]
                target["id"] = call.get("id") or target["id"]
                fn = call.get("function") or {}
                target["function"]["name"] += fn.get("name") or ""
                target["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]
    body: dict[str, Any] = {
        "id": first.get("id"),
        "object": "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if usage is not None:
        body["usage"] = usage
    return body
