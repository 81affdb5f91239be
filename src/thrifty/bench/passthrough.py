"""The bare pass-through: the ceiling for a Python gateway on this server stack.

The same stack as `thrifty serve` (uvicorn with uvloop and httptools, one shared aiohttp
session) with nothing else: no auth, parsing, pricing, token counting or ledger. The distance
between it and thrifty in `thrifty bench overhead` is what thrifty's own work costs.

    python -m thrifty.bench.passthrough --port 8100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

from thrifty.server.run import server_options

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class PassThrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            # One pooled session for the process, opened inside the server's loop.
            session = self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        assert self.session is not None
        async with self.session.post(
            self.upstream + scope["path"], data=body, headers={"content-type": "application/json"}
        ) as resp:
            data = await resp.read()
            headers = [(b"content-type", resp.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a bare pass-through ASGI proxy (bench ceiling)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000", help="scheme://host:port")
    args = parser.parse_args(argv)
    uvicorn.run(
        PassThrough(args.upstream),
        host=args.host,
        port=args.port,
        **server_options(),  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
