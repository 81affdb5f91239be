"""A lean Redis client for the request path: Lua scripts over one pipelined connection.

Every plain request runs one script before its call (rate admission and budget reservation) and
one after (the settle). Through redis-py each of those cost ~300 us of client CPU (measured,
one process, 2026-12-02: a connection checked out of the pool and back, retry and observability
wrappers, the command packed in Python), more than the loopback round trip itself. This client
does only what those calls need: commands packed and replies parsed by hiredis (C), written to
one connection that every request shares (Redis answers in order, so replies are matched to a
FIFO of futures: concurrent requests pipeline on it with no pool and no lock), a per-call
timeout, and EVALSHA with a fallback to EVAL when the server does not know the script yet.
Everything else (start-up rebuild, breaker board, idempotency records) stays on redis-py.

Failures are the builtin `ConnectionError` / `TimeoutError` (both `OSError`s, which
`RedisState.call` turns into `SharedStateUnavailable`); a timed-out call closes the connection,
failing the calls queued behind it, and the next call connects afresh. Error replies raise
`RedisReplyError`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from thrifty.errors import ConfigError

Arg = str | bytes | int | float


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


class Script:
    """A Lua script known by its SHA1 (what EVALSHA sends), with its body for the first EVAL."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: Any = None  # an asyncio.Transport (uvloop's are not its subclasses)
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as err:  # a reply no call waits for: out of sync
            self.transport.abort()
            self.connection_lost(ConnectionError(f"Redis protocol error: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"Redis connection lost: {self.lost}"))


class RespClient:
    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self._unix: str | None = None
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme in ("redis", "rediss"):
            self._host = parts.hostname or "127.0.0.1"
            self._port = parts.port or 6379
            self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
            db = parts.path.strip("/") or "0"
        elif parts.scheme == "unix":
            self._unix, self._host, self._port = parts.path, "", 0
            db = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("db", "0")
        else:
            raise ConfigError(f"shared_state.url must be redis://, rediss:// or unix://, not {url!r}")
        if not db.isdigit():
            raise ConfigError(f"shared_state.url: the database must be a number, not {db!r}")
        self._db = int(db)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one its connection belongs to

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a library user's second asyncio.run)
            self._loop, self._protocol, self._connecting = loop, None, None
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            if self._unix is not None:
                connect = loop.create_unix_connection(_Protocol, self._unix)
            else:
                connect = loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl)
            try:
                _, protocol = await asyncio.wait_for(connect, self._timeout_s)
            except TimeoutError as err:
                raise TimeoutError(f"connecting to Redis took over {self._timeout_s} s") from err
            self._protocol = protocol
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                await self._send(protocol, ("AUTH", *auth))
            if self._db:
                await self._send(protocol, ("SELECT", self._db))
            return protocol

    async def execute(self, *args: Arg) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or self._loop is not asyncio.get_running_loop():
            protocol = await self._connect()
        return await self._send(protocol, args)

    async def _send(self, protocol: _Protocol, args: Sequence[Arg]) -> Any:
        transport = protocol.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        transport.write(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]  # its stub: a 1-tuple
        timer = loop.call_later(self._timeout_s, self._expire, protocol, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def _expire(self, protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        future.set_exception(TimeoutError(f"Redis did not answer within {self._timeout_s} s"))
        # Its reply may still come and would answer the next call: start over on a new connection.
        if protocol.transport is not None:
            protocol.transport.abort()

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """EVALSHA, or EVAL once when the server has not seen the script (it caches it then)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as err:
            if not str(err).startswith("NOSCRIPT"):
                raise
            return await self.execute("EVAL", script.body, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


__all__ = ["RedisReplyError", "RespClient", "Script"]
