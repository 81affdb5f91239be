"""A local HTTP server speaking OpenAI's chat-completions wire format (JSON and SSE).

Tests script the next replies; the server records every request it receives. It stands in
for the hosted API at the wire, so the gateway's own code runs unpatched.

A reply with `honest=True` bills as the real API would: the prompt tokens of the messages it
received, and for each of the `n` choices it writes `completion_tokens` tokens, cut at the cap
the request carries (the larger of max_tokens and max_completion_tokens, the reading that costs
most). Without a cap it writes them all, past any ceiling the gateway assumed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from thrifty.tokens import TokenCounter


@dataclass
class Reply:
    text: str = "Hello from the fake OpenAI server."
    prompt_tokens: int = 42
    cached_tokens: int = 0
    completion_tokens: int = 9
    reasoning_tokens: int = 0
    status: int = 200
    error_message: str = "fake upstream error"
    error_type: str = "server_error"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before answering (a hang when larger than the gateway's timeout)
    chunk_delay_s: float = 0.0  # between stream chunks
    stream_usage: bool = True  # send the usage chunk when asked for it
    drop_after_chunks: int | None = None  # close the connection mid-stream after N chunks
    chunk_chars: int = 5
    finish_reason: str = "stop"
    logprobs: list[float] | None = None  # per-token logprobs, returned when the request asks for them
    honest: bool = False  # bill real prompt counts and write up to the cap per choice (see above)
    samples: list[str] | None = None  # with n: choice i says samples[i] (cycled); else every choice says text


def _usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens, "audio_tokens": 0},
    }


def _logprobs(reply: Reply) -> dict[str, Any] | None:
    if reply.logprobs is None:
        return None
    return {
        "content": [
            {"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": []}
            for i, lp in enumerate(reply.logprobs)
        ]
    }


class OpenAIWireServer:
    def __init__(self, api_key: str = "sk-fake-upstream") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.peers: list[tuple[str, int]] = []  # client (host, port) per request: reveals connection reuse
        self.replies: list[Reply] = []
        self.by_model: dict[str, list[Reply]] = {}  # scripted per upstream model, before the shared queue
        self.default = Reply()
        self._counter = TokenCounter()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def _next(self, model: str | None = None) -> Reply:
        scripted = self.by_model.get(model or "")
        if scripted:
            return scripted.pop(0)
        return self.replies.pop(0) if self.replies else self.default

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername")[:2])
        reply = self._next(body.get("model"))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return web.json_response(
                {
                    "error": {
                        "message": reply.error_message,
                        "type": reply.error_type,
                        "param": None,
                        "code": None,
                    }
                },
                status=reply.status,
                headers=reply.headers,
            )
        model = body.get("model", "gpt-4o-mini")
        n = body.get("n") or 1
        if reply.honest:
            reply = self._honest(reply, body, n)
        if body.get("stream"):
            return await self._stream(request, body, reply, model, n)
        return web.json_response(
            {
                "id": "chatcmpl-fake123",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": reply.samples[i % len(reply.samples)] if reply.samples else reply.text,
                            "refusal": None,
                        },
                        "logprobs": _logprobs(reply) if body.get("logprobs") else None,
                        "finish_reason": reply.finish_reason,
                    }
                    for i in range(n)
                ],
                "usage": _usage(reply),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    def _honest(self, reply: Reply, body: dict[str, Any], n: int) -> Reply:
        prompt = self._counter.count_messages(body["messages"], body["model"], tools=body.get("tools"))
        caps = [body[k] for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int)]
        per_choice = min(max(caps), reply.completion_tokens) if caps else reply.completion_tokens
        return dataclasses.replace(
            reply,
            text=" ".join(["word"] * per_choice),
            prompt_tokens=prompt.tokens,
            completion_tokens=n * per_choice,
            finish_reason="length" if caps and per_choice == max(caps) else reply.finish_reason,
            chunk_chars=max(reply.chunk_chars, 2000),
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply, model: str, n: int = 1
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": "chatcmpl-fake123",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        pieces = [reply.text[i : i + reply.chunk_chars] for i in range(0, len(reply.text), reply.chunk_chars)]
        events: list[bytes] = []
        for i in range(n):
            events.append(
                event(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
            events += [
                event([{"index": i, "delta": {"content": p}, "logprobs": None, "finish_reason": None}])
                for p in pieces
            ]
            events.append(
                event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason}])
            )
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if wants_usage and reply.stream_usage:
            events.append(event([], usage=_usage(reply)))
        for i, data in enumerate(events):
            if reply.drop_after_chunks is not None and i >= reply.drop_after_chunks:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(data)
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
