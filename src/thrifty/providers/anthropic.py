"""Adapter for Anthropic's Messages API, translated to and from OpenAI's chat completions shape.

Clients speak OpenAI's wire format to the gateway; this module is the only place that knows
Anthropic's. The translation functions are pure so they can be tested without HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from thrifty.errors import InvalidRequest, ProviderError, ProviderProtocolError
from thrifty.providers.base import StreamChunk
from thrifty.providers.http import HttpClient
from thrifty.settings import ProviderSettings
from thrifty.types import ModelTarget, UpstreamResult, Usage

# Anthropic rejects a request without max_tokens, while OpenAI lets the model run to its limit.
DEFAULT_MAX_TOKENS = 4096

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_TOOL_CHOICES = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}


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
    return Usage(
        input_tokens=fresh + read + written,
        cached_input_tokens=read,
        cache_write_tokens=written,
        output_tokens=_int(raw.get("output_tokens")),
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
    }


def _int(value: Any) -> int:
    # Anthropic sends null for cache fields on some models; a missing count is zero, not an error.
    return int(value) if isinstance(value, int | float) else 0


def openai_finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return _FINISH_REASONS.get(str(stop_reason), "stop")


# ---------------------------------------------------------------------------------------------
# Request: OpenAI chat completions -> Anthropic Messages


def to_anthropic_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI chat-completions body; raise InvalidRequest for what cannot be expressed."""
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(f"n={n} is not supported by Anthropic models; send n=1 or omit it", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")

    system_blocks, turns = _split_messages(messages)
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": turns,
        "max_tokens": _max_tokens(body),
    }
    system_blocks += _response_format_instruction(body.get("response_format"))
    system = _system_value(system_blocks)
    if system is not None:
        out["system"] = system
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    out.update(_tools(body))
    return out


def _max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequest(f"{key} must be a positive integer", param=key)
            return value
    return DEFAULT_MAX_TOKENS


def _split_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks, and user/assistant turns with same-role neighbours merged."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), f"messages[{i}]")
            continue
        role, blocks = _turn(message, i)
        if not blocks:
            continue
        # Anthropic requires user and assistant to alternate; OpenAI does not.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequest("messages must hold at least one user or assistant message", param="messages")
    return system, turns


def _turn(message: dict[str, Any], i: int) -> tuple[str, list[dict[str, Any]]]:
    role = message.get("role")
    where = f"messages[{i}]"
    if role == "user":
        return "user", _content_blocks(message.get("content"), where)
    if role == "assistant":
        blocks = _content_blocks(message.get("content"), where)
        blocks += [
            _tool_use_block(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(_calls(message))
        ]
        return "assistant", blocks
    if role == "tool":
        return "user", [_tool_result_block(message, where)]
    raise InvalidRequest(
        f"{where}.role {role!r} is not supported for Anthropic models", param=f"{where}.role"
    )


def _calls(message: dict[str, Any]) -> list[Any]:
    calls = message.get("tool_calls")
    return calls if isinstance(calls, list) else []


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Text-only content (system and tool messages)."""
    blocks = _content_blocks(content, where)
    for block in blocks:
        if block["type"] != "text":
            raise InvalidRequest(f"{where}: only text content is allowed here", param=where)
    return blocks


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        # Anthropic rejects empty text blocks; OpenAI clients send "" beside tool calls.
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        block = _part_block(part, f"{where}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _part_block(part: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{kind} must be a string", param=where)
        if not text:
            return None
        block: dict[str, Any] = {"type": "text", "text": text}
    elif kind == "image_url":
        block = _image_block(part.get("image_url"), where)
    else:
        raise InvalidRequest(
            f"{where}: content part type {kind!r} is not supported for Anthropic models", param=where
        )
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest(f"{where}.image_url.url must be a string", param=where)
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise InvalidRequest(f"{where}: data URLs must look like data:image/png;base64,...", param=where)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(f"{where}: image URL must be http(s) or a base64 data URL", param=where)


def _tool_use_block(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise InvalidRequest(f"{where} must have an id and a function name", param=where)
    arguments = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {err}", param=where) from err
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object", param=where)
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _tool_result_block(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"{where}.tool_call_id is required for a tool message", param=where)
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        block["content"] = content
    else:
        block["content"] = _text_blocks(content, where)
    return block


def _response_format_instruction(fmt: Any) -> list[dict[str, Any]]:
    """Anthropic has no JSON mode; asking in the system prompt is the closest equivalent."""
    if not isinstance(fmt, dict):
        return []
    if fmt.get("type") == "json_object":
        return [{"type": "text", "text": "Respond with a single JSON object and nothing else."}]
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        text = (
            "Respond with a single JSON object and nothing else. It must conform to this JSON schema:\n"
            + orjson.dumps(schema).decode()
        )
        return [{"type": "text", "text": text}]
    return []


def _system_value(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    if not blocks:
        return None
    # A plain string is the common case; blocks are only needed to carry cache breakpoints.
    if any("cache_control" in b for b in blocks):
        return blocks
    return "\n\n".join(b["text"] for b in blocks)


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out: dict[str, Any] = {"tools": [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(tool: Any, where: str) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"{where}: only function tools with a name are supported", param=where)
    out: dict[str, Any] = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    if "cache_control" in tool:
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {}
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return dict(_TOOL_CHOICES[choice])
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") == "function" and isinstance(name, str):
            return {"type": "tool", "name": name}
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


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


class AnthropicProvider:
    def __init__(self, name: str, settings: ProviderSettings, api_key: str | None) -> None:
        self.name = name
        headers = {"anthropic-version": settings.anthropic_version}
        if api_key:
            headers["x-api-key"] = api_key
        self._http = HttpClient(name, settings, headers)
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
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
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
