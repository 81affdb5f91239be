"""Adapter for Anthropic's Messages API, translated to and from OpenAI's chat completions shape.

Clients speak OpenAI's wire format to the gateway; this module is the only place that knows
Anthropic's. The translation functions are pure so they can be tested without HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from thrifty.errors import ProviderError, ProviderProtocolError
from thrifty.providers.anthropic_request import DEFAULT_MAX_TOKENS, to_anthropic_request
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.providers.http import HttpClient
from thrifty.settings import ProviderSettings
from thrifty.types import ModelTarget, UpstreamResult, Usage

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


# ---------------------------------------------------------------------------------------------
# Usage


def usage_from_anthropic(raw: dict[str, Any]) -> Usage:
    """Anthropic's usage block -> Usage.

    Anthropic reports cache reads and writes *beside* `input_tokens`; thrifty (like OpenAI)
    counts the whole prompt as input, so they are added in.
    """
    fresh = _int(raw.get("input_tokens"))
    read = _int(raw.get("cache_read_input_tokens"))
    written = _int(raw.get("cache_creation_input_tokens"))
    # `cache_creation` splits the writes by TTL; 1-hour writes cost more than 5-minute ones.
    by_ttl = raw.get("cache_creation")
    written_1h = _int(by_ttl.get("ephemeral_1h_input_tokens")) if isinstance(by_ttl, dict) else 0
    if isinstance(by_ttl, dict) and not written:
        written = written_1h + _int(by_ttl.get("ephemeral_5m_input_tokens"))
    return Usage(
        input_tokens=fresh + read + written,
        cached_input_tokens=read,
        cache_write_tokens=written,
        output_tokens=_int(raw.get("output_tokens")),
        cache_write_1h_tokens=min(written_1h, written),
    )


def openai_usage(usage: Usage) -> dict[str, Any]:
    """A Usage in OpenAI's usage shape, plus Anthropic's cache numbers for clients that want them."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write_tokens - usage.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": usage.cache_write_1h_tokens,
        },
    }


def _int(value: Any) -> int:
    # Anthropic sends null for cache fields on some models; a missing count is zero, not an error.
    return int(value) if isinstance(value, int | float) else 0


def openai_finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return _FINISH_REASONS.get(str(stop_reason), "stop")


# ---------------------------------------------------------------------------------------------
# Response: Anthropic message -> OpenAI chat.completion


def from_anthropic_message(msg: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """Translate a non-streaming Anthropic `message` into an OpenAI `chat.completion`."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in msg.get("content") or ():
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    out: dict[str, Any] = {
        "id": msg.get("id"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": msg.get("model"),
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": openai_finish_reason(msg.get("stop_reason")) or "stop",
            }
        ],
    }
    usage = msg.get("usage")
    if isinstance(usage, dict):
        out["usage"] = openai_usage(usage_from_anthropic(usage))
    return out


# ---------------------------------------------------------------------------------------------
# Stream: Anthropic SSE events -> OpenAI chat.completion.chunk


class StreamTranslator:
    """Turns Anthropic stream events, fed one at a time, into OpenAI chunks."""

    def __init__(self, provider: str, *, created: int | None = None) -> None:
        self._provider = provider
        self._created = int(time.time()) if created is None else created
        self._id: str | None = None
        self._model: str | None = None
        self._usage: dict[str, Any] = {}
        # Anthropic numbers content blocks across text and tools; OpenAI numbers tool calls alone.
        self._tool_index: dict[int, int] = {}
        self.finished = False

    def feed(self, event: dict[str, Any]) -> list[StreamChunk]:
        kind = event.get("type")
        if kind == "message_start":
            return self._message_start(event.get("message") or {})
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            self.finished = True
            usage = usage_from_anthropic(self._usage)
            data = {**self._envelope(), "choices": [], "usage": openai_usage(usage)}
            return [StreamChunk(data, usage=usage)]
        if kind == "error":
            raise self._error(event)
        # ping, content_block_stop, and event types newer than this adapter carry nothing to relay.
        return []

    def _message_start(self, message: dict[str, Any]) -> list[StreamChunk]:
        self._id = message.get("id")
        self._model = message.get("model")
        self._usage = dict(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, event: dict[str, Any]) -> list[StreamChunk]:
        block = event.get("content_block") or {}
        if block.get("type") == "text":
            return [self._chunk({"content": block["text"]})] if block.get("text") else []
        if block.get("type") != "tool_use":
            return []
        index = len(self._tool_index)
        self._tool_index[int(event.get("index", -1))] = index
        call = {
            "index": index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, event: dict[str, Any]) -> list[StreamChunk]:
        delta = event.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            index = self._tool_index.get(int(event.get("index", -1)))
            if index is None:
                raise ProviderProtocolError(f"{self._provider} sent tool input for a block it never started")
            call = {"index": index, "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _message_delta(self, event: dict[str, Any]) -> list[StreamChunk]:
        # Counts in message_delta are cumulative, so the latest value replaces the earlier one.
        self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        reason = openai_finish_reason((event.get("delta") or {}).get("stop_reason"))
        return [self._chunk({}, finish_reason=reason)] if reason else []

    def _error(self, event: dict[str, Any]) -> ProviderError:
        err = event.get("error") or {}
        message = err.get("message") if isinstance(err, dict) else None
        return ProviderError(
            f"{self._provider} failed mid-stream: {message or 'unknown error'}",
            status=502,
            provider=self._provider,
            body=event,
        )

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
        }

    def _chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None) -> StreamChunk:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return StreamChunk({**self._envelope(), "choices": [choice]})


# ---------------------------------------------------------------------------------------------
# I/O


def auth_headers(settings: ProviderSettings, api_key: str | None) -> dict[str, str]:
    """The headers every call to Anthropic's API carries (messages and message batches alike)."""
    headers = {"anthropic-version": settings.anthropic_version}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


class AnthropicProvider:
    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        api_key: str | None,
        *,
        missing_key_env: str | None = None,
    ) -> None:
        self.name = name
        self._http = HttpClient(
            name, settings, auth_headers(settings, api_key), missing_key_env=missing_key_env
        )
        assert settings.base_url is not None
        self._url = settings.base_url.rstrip("/") + "/v1/messages"

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    async def complete(self, target: ModelTarget, body: dict[str, Any]) -> UpstreamResult:
        payload = to_anthropic_request(body, target.upstream_model)
        resp = await self._http.post_json(self._url, payload)
        if resp.get("type") != "message":
            raise ProviderProtocolError(
                f"{self.name} answered with {resp.get('type')!r} instead of a message"
            )
        usage = resp.get("usage")
        return UpstreamResult(
            body=from_anthropic_message(resp),
            usage=usage_from_anthropic(usage) if isinstance(usage, dict) else None,
        )

    async def stream(self, target: ModelTarget, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        payload = to_anthropic_request(body, target.upstream_model)
        payload["stream"] = True
        translator = StreamTranslator(self.name)
        events = self._http.post_stream(self._url, payload)
        try:
            async for data in events:
                for chunk in translator.feed(self._parse_event(data)):
                    yield chunk
                if translator.finished:
                    return
        finally:
            # Release the pooled connection now, not when the inner generator is collected.
            await close_stream(events)
        # Ending without message_stop means the stream was cut; the gateway estimates usage then.

    def _parse_event(self, data: bytes) -> dict[str, Any]:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            raise ProviderProtocolError(
                f"{self.name} sent an SSE event that is not JSON: {data[:200]!r}"
            ) from err
        if not isinstance(event, dict):
            raise ProviderProtocolError(f"{self.name} sent an SSE event that is not a JSON object")
        return event


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AnthropicProvider",
    "StreamTranslator",
    "from_anthropic_message",
    "to_anthropic_request",
    "usage_from_anthropic",
]
