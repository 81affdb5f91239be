"""A fast OpenAI-compatible upstream stub: the "direct" column of `thrifty bench overhead`.

It answers POST /v1/chat/completions (and /chat/completions) with a fixed, realistic
`chat.completion` (or SSE chunks when the request says `"stream": true`) and does nothing else,
so that what the bench measures is the gateway in front of it, not the upstream. It is a raw
asyncio Protocol on uvloop with httptools' C parser: no framework and no per-request task, which
keeps it several times faster than anything it sits behind.

    python -m thrifty.bench.stub --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from typing import Any, cast

import httptools
import orjson
import uvloop

CHAT_PATHS = frozenset({b"/v1/chat/completions", b"/chat/completions"})
# A short, plausible answer; its size is what a typical small completion returns.
CONTENT = (
    "The capital of France is Paris. It has been the country's political and cultural centre "
    "since the Middle Ages and is home to about two million people."
)
COMPLETION_TOKENS = 32
STREAM_PIECES = 8

_ids = itertools.count(1)


def _usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": prompt_tokens + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body(model: str, prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-stub{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": CONTENT, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(prompt_tokens),
            "service_tier": "default",
            "system_fingerprint": "fp_stub",
        }
    )


def stream_events(model: str, prompt_tokens: int) -> list[bytes]:
    """The SSE events of a streamed answer: role, content pieces, finish, usage, [DONE]."""
    base = {
        "id": f"chatcmpl-stub{next(_ids)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_stub",
    }
    step = -(-len(CONTENT) // STREAM_PIECES)
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": CONTENT[i : i + step]} for i in range(0, len(CONTENT), step)]
    chunks = [
        {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
        for d in deltas
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    # Sent whether or not the client asked (stream_options.include_usage): the gateway asks anyway.
    chunks.append({**base, "choices": [], "usage": _usage(prompt_tokens)})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _response(status: bytes, content_type: bytes, body: bytes, keep_alive: bool) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 ",
            status,
            b"\r\ncontent-type: ",
            content_type,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n" if keep_alive else b"\r\nconnection: close\r\n",
            b"\r\n",
            body,
        )
    )


def _chunked(events: list[bytes], keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    head += b"transfer-encoding: chunked\r\n" + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    # One HTTP chunk per SSE event, as a real upstream sends them; all written at once.
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _error(status: bytes, message: str, keep_alive: bool) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": None}})
    return _response(status, b"application/json", body, keep_alive)


def answer(method: bytes, path: bytes, body: bytes, keep_alive: bool) -> bytes:
    path = path.split(b"?", 1)[0]
    if method == b"GET" and path in (b"/health", b"/healthz"):
        return _response(b"200 OK", b"application/json", b'{"status":"ok"}', keep_alive)
    if path not in CHAT_PATHS:
        return _error(b"404 Not Found", f"no route {path.decode('latin-1')}", keep_alive)
    if method != b"POST":
        return _error(b"405 Method Not Allowed", "POST only", keep_alive)
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(b"400 Bad Request", "the body is not JSON", keep_alive)
    if not isinstance(request, dict):
        return _error(b"400 Bad Request", "the body must be a JSON object", keep_alive)
    model = request.get("model")
    model = model if isinstance(model, str) else "gpt-4o-mini"
    # About four bytes per token: close enough for a price, and costs nothing to compute.
    prompt_tokens = max(1, len(body) // 4)
    if request.get("stream") is True:
        return _chunked(stream_events(model, prompt_tokens), keep_alive)
    return _response(b"200 OK", b"application/json", completion_body(model, prompt_tokens), keep_alive)


class StubProtocol(asyncio.Protocol):
    """One connection: parse with httptools, answer each request as soon as it is complete."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_error(b"400 Bad Request", "malformed HTTP", False))
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        self._transport.write(answer(method, self._url, b"".join(self._body), keep_alive))
        if not keep_alive:
            self._transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"stub listening on http://{bound[0]}:{bound[1]}/v1", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a fast OpenAI-compatible upstream stub")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
