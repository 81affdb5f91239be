"""A real local HTTP server speaking Anthropic's Messages API, scriptable by tests.

It validates requests about as strictly as api.anthropic.com does (headers, unknown fields,
role alternation, tool_use/tool_result pairing), so an adapter that passes against it sends
requests the real API accepts. Replies are scripted with `Reply`; without one queued, the
server answers `default_reply`.

Usage from a pytest-asyncio fixture:

    server = AnthropicWireServer(api_key="sk-ant-test")
    base_url = await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ALLOWED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
    }
)
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any]
    id: str = field(default_factory=lambda: "toolu_" + secrets.token_hex(12))


@dataclass
class Reply:
    """What the server answers to the next request.

    `error_status` turns the reply into an HTTP error. `drop_after_events` aborts the TCP
    connection after that many SSE events; `end_after_events` ends the response cleanly but
    early (no message_stop); `stream_error` sends an `error` event after message_start.
    """

    text: str | None = "Hello! How can I help you today?"
    tool_uses: list[ToolUse] = field(default_factory=list)
    stop_reason: str | None = None  # defaults to tool_use when there are tool uses, else end_turn
    stop_sequence: str | None = None
    input_tokens: int = 12
    output_tokens: int = 9
    cache_creation_input_tokens: int = 0  # 5-minute writes
    cache_creation_1h_input_tokens: int = 0  # 1-hour writes (reported inside cache_creation)
    cache_read_input_tokens: int = 0
    model: str | None = None  # defaults to the requested model
    error_status: int | None = None
    error_type: str = "invalid_request_error"
    error_message: str = "scripted error"
    drop_after_events: int | None = None
    end_after_events: int | None = None
    stream_error: tuple[str, str] | None = None  # (error type, message), e.g. overloaded_error
    text_chunk_chars: int = 5
    json_chunk_chars: int = 7
    # Bill as the real API would: write `output_tokens` tokens, cut at the request's max_tokens.
    honest: bool = False

    @property
    def effective_stop_reason(self) -> str:
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if self.tool_uses else "end_turn"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def validate_request(body: Any) -> str | None:
    """The message Anthropic would answer a 400 with, or None when the body is acceptable."""
    if not isinstance(body, dict):
        return "body: Input should be an object"
    for key in body:
        if key not in ALLOWED_FIELDS:
            return f"{key}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required"
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 1):
        return "temperature: Input should be less than or equal to 1"
    return (
        _validate_system(body.get("system"))
        or _validate_messages(body.get("messages"))
        or _validate_tools(body.get("tools"), body.get("tool_choice"))
        or _validate_stop(body.get("stop_sequences"))
        or _validate_metadata(body.get("metadata"))
    )


def _validate_system(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list):
        return "system: Input should be a valid string or list"
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not block.get("text"):
            return f"system.{i}: system blocks must be non-empty text blocks"
    return None


def _validate_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous_role: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: Input should be an object"
        role = message.get("role")
        if role not in ("user", "assistant"):
            return (
                f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if i == 0 and role != "user":
            return 'messages: first message must use the "user" role'
        if role == previous_role:
            return (
                'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        previous_role = role
        problem = _validate_content(message.get("content"), f"messages.{i}")
        if problem:
            return problem
    return _validate_tool_pairing(messages)


def _validate_content(content: Any, where: str) -> str | None:
    if isinstance(content, str):
        return None if content else f"{where}: text content blocks must be non-empty"
    if not isinstance(content, list) or not content:
        return f"{where}: all messages must have non-empty content"
    for j, block in enumerate(content):
        problem = _validate_block(block, f"{where}.content.{j}")
        if problem:
            return problem
    return None


def _validate_block(block: Any, where: str) -> str | None:
    if not isinstance(block, dict):
        return f"{where}: Input should be an object"
    kind = block.get("type")
    if kind == "text":
        return (
            None
            if isinstance(block.get("text"), str) and block["text"]
            else f"{where}: text content blocks must be non-empty"
        )
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64" and source.get("media_type") and source.get("data"):
            return None
        if source.get("type") == "url" and source.get("url"):
            return None
        return f"{where}.source: invalid image source"
    if kind == "tool_use":
        if (
            isinstance(block.get("id"), str)
            and isinstance(block.get("name"), str)
            and isinstance(block.get("input"), dict)
        ):
            return None
        return f"{where}: tool_use blocks need id, name and an object input"
    if kind == "tool_result":
        return None if isinstance(block.get("tool_use_id"), str) else f"{where}.tool_use_id: Field required"
    return f"{where}.type: Input tag '{kind}' found does not match any of the expected tags"


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _validate_tool_pairing(messages: list[dict[str, Any]]) -> str | None:
    for i, message in enumerate(messages):
        results = [b for b in _blocks(message) if b.get("type") == "tool_result"]
        if results:
            previous = messages[i - 1] if i > 0 else {}
            offered = {b["id"] for b in _blocks(previous) if b.get("type") == "tool_use"}
            for j, block in enumerate(_blocks(message)):
                if block.get("type") == "tool_result" and block["tool_use_id"] not in offered:
                    return (
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message."
                    )
        uses = [b["id"] for b in _blocks(message) if b.get("type") == "tool_use"]
        if uses:
            following = messages[i + 1] if i + 1 < len(messages) else None
            answered = {
                b.get("tool_use_id") for b in _blocks(following or {}) if b.get("type") == "tool_result"
            }
            missing = [u for u in uses if u not in answered]
            if following is not None and missing:
                return (
                    f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message."
                )
    return None


def _validate_tools(tools: Any, tool_choice: Any) -> str | None:
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                return f"tools.{i}.name: Field required"
            if not isinstance(tool.get("input_schema"), dict):
                return f"tools.{i}.input_schema: Field required"
            extra = set(tool) - {"name", "description", "input_schema", "cache_control", "type"}
            if extra:
                return f"tools.{i}.{sorted(extra)[0]}: Extra inputs are not permitted"
    if tool_choice is not None:
        if not isinstance(tool_choice, dict) or tool_choice.get("type") not in TOOL_CHOICE_TYPES:
            return f"tool_choice: Input tag does not match any of the expected tags: {TOOL_CHOICE_TYPES}"
        if tool_choice["type"] == "tool" and not isinstance(tool_choice.get("name"), str):
            return "tool_choice.tool.name: Field required"
    return None


def _validate_stop(stop: Any) -> str | None:
    if stop is None:
        return None
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        return "stop_sequences: Input should be a list of non-empty strings"
    return None


def _validate_metadata(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata: Input should be an object"
    extra = set(metadata) - {"user_id"}
    if extra:
        return f"metadata.{sorted(extra)[0]}: Extra inputs are not permitted"
    return None


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class AnthropicWireServer:
    def __init__(self, api_key: str = "sk-ant-test", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.default_reply = Reply()
        self._replies: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("AnthropicWireServer.start() has not been awaited")
        return self._base_url

    def reply(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order; afterwards `default_reply` applies."""
        self._replies.extend(replies)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._base_url = f"http://{self.host}:{port}"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ request handling

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        reply = self._replies.popleft() if self._replies else self.default_reply
        rejection = self._check_headers(request)
        if rejection is not None:
            return rejection
        if body is None:
            return self._error(400, "invalid_request_error", "There was an error parsing the body as JSON")
        problem = validate_request(body)
        if problem is not None:
            return self._error(400, "invalid_request_error", problem)
        if reply.error_status is not None:
            return self._error(reply.error_status, reply.error_type, reply.error_message)
        if reply.honest:
            written = min(body["max_tokens"], reply.output_tokens)
            reply = dataclasses.replace(
                reply,
                text=" ".join(["word"] * written),
                output_tokens=written,
                stop_reason="max_tokens" if written == body["max_tokens"] else reply.stop_reason,
                text_chunk_chars=max(reply.text_chunk_chars, 2000),
            )
        message = self._message(reply, body["model"])
        if body.get("stream"):
            return await self._stream(request, reply, message)
        return web.json_response(message)

    def _check_headers(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key")
        if key is None:
            return self._error(401, "authentication_error", "x-api-key header is required")
        if key != self.api_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    @staticmethod
    def _error(status: int, error_type: str, message: str) -> web.Response:
        return web.json_response(error_body(error_type, message), status=status)

    @staticmethod
    def _usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": reply.input_tokens,
            # As Anthropic reports it: the total of both TTLs, and the split by TTL beside it.
            "cache_creation_input_tokens": reply.cache_creation_input_tokens
            + reply.cache_creation_1h_input_tokens,
            "cache_read_input_tokens": reply.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": reply.cache_creation_input_tokens,
                "ephemeral_1h_input_tokens": reply.cache_creation_1h_input_tokens,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _message(self, reply: Reply, requested_model: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.text is not None:
            content.append({"type": "text", "text": reply.text})
        for use in reply.tool_uses:
            content.append({"type": "tool_use", "id": use.id, "name": use.name, "input": use.input})
        return {
            "id": "msg_" + secrets.token_hex(12),
            "type": "message",
            "role": "assistant",
            "model": reply.model or requested_model,
            "content": content,
            "stop_reason": reply.effective_stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": self._usage(reply, reply.output_tokens),
        }

    # ------------------------------------------------------------------ streaming

    def _events(self, reply: Reply, message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The SSE events of a message, in the order the real API sends them."""
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = self._usage(reply, 1)
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start})
        ]
        if reply.stream_error is not None:
            error_type, text = reply.stream_error
            events.append(("error", error_body(error_type, text)))
            return events
        for index, block in enumerate(message["content"]):
            block_events = self._block_events(index, block, reply)
            if index == 0:
                # The real API sends its first ping right after the first block opens.
                block_events.insert(1, ("ping", {"type": "ping"}))
            events += block_events
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": message["stop_reason"],
                        "stop_sequence": message["stop_sequence"],
                    },
                    "usage": {"output_tokens": reply.output_tokens},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    @staticmethod
    def _block_events(index: int, block: dict[str, Any], reply: Reply) -> list[tuple[str, dict[str, Any]]]:
        first: dict[str, Any]
        if block["type"] == "text":
            first = {"type": "text", "text": ""}
            deltas = [
                {"type": "text_delta", "text": t} for t in _chunks(block["text"], reply.text_chunk_chars)
            ]
        else:
            first = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            # The real API opens every tool input with an empty partial_json.
            encoded = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": ""}]
            deltas += [
                {"type": "input_json_delta", "partial_json": p}
                for p in _chunks(encoded, reply.json_chunk_chars)
            ]
        events: list[tuple[str, dict[str, Any]]] = [
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": first})
        ]
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        ]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events

    async def _stream(
        self, request: web.Request, reply: Reply, message: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"},
        )
        await response.prepare(request)
        for count, (name, data) in enumerate(self._events(reply, message), start=1):
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            if reply.drop_after_events == count and request.transport is not None:
                # Abort mid-body, as a crashed upstream or a cut network would.
                request.transport.abort()
                return response
            if reply.end_after_events == count:
                break
        await response.write_eof()
        return response
