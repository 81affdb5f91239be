"""Shared HTTP plumbing for wire adapters: one aiohttp session (connection pool) per provider."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import aiohttp
import orjson

from thrifty.errors import (
    ProviderError,
    ProviderKeyMissing,
    ProviderTimeout,
    ProviderUnreachable,
    ThriftyError,
)
from thrifty.settings import ProviderSettings

USER_AGENT = "thrifty/0.1"


class HttpClient:
    """One pooled session per provider, created on start and reused by every request."""

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        headers: dict[str, str],
        *,
        missing_key_env: str | None = None,
    ) -> None:
        self.name = name
        # Set when the provider's key variable was unset at start: refuse before the wire, naming it,
        # rather than relay the provider's 401, which reads as if the client's own key were wrong.
        self._missing_key_env = missing_key_env
        self._settings = settings
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, sock_connect=settings.connect_timeout_s
        )
        # A stream may run long; what must not happen is a long silence between two chunks.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.timeout_s
        )

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._settings.max_connections, ttl_dns_cache=300)
            # Every header is set once on the session: per-request headers or skip_auto_headers
            # send aiohttp down a slower path that rebuilds a header multidict on each call.
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"content-type": "application/json", "user-agent": USER_AGENT, **self._headers},
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"provider {self.name!r} used before start()")
        return self._session

    def _check_key(self) -> None:
        if self._missing_key_env is not None:
            raise ProviderKeyMissing(
                f"provider {self.name!r} has no API key: {self._missing_key_env} was not set when thrifty "
                f"started (providers.{self.name}.api_key_env); set it and restart the gateway"
            )

    async def post_json(self, url: str, payload: dict[str, Any] | BinaryIO) -> dict[str, Any]:
        """POST a JSON body (a dict, or a file holding the JSON text, streamed) and read a JSON object."""
        self._check_key()
        try:
            async with self.session.post(
                url,
                data=orjson.dumps(payload) if isinstance(payload, dict) else payload,
                timeout=self._timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self.error_from(resp.status, raw, resp.headers.get("retry-after"))
        except ThriftyError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as err:
            raise ProviderTimeout(
                f"{self.name} did not answer within {self._settings.timeout_s:g}s; "
                f"retry later or raise providers.{self.name}.timeout_s"
            ) from err
        except aiohttp.ClientError as err:
            raise self.unreachable(err) from err
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise ProviderError(
                f"{self.name} returned a body that is not JSON", status=502, provider=self.name
            ) from err
        if not isinstance(body, dict):
            raise ProviderError(
                f"{self.name} returned JSON that is not an object", status=502, provider=self.name
            )
        return body

    async def post_stream(self, url: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the `data:` payloads of an SSE response, one per event, without the prefix."""
        self._check_key()
        try:
            async with self.session.post(
                url,
                data=orjson.dumps(payload),
                headers={"accept": "text/event-stream"},
                timeout=self._stream_timeout,
            ) as resp:
                if resp.status >= 400:
                    raise self.error_from(resp.status, await resp.read(), resp.headers.get("retry-after"))
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
        except ThriftyError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as err:
            raise ProviderTimeout(
                f"{self.name} went silent for more than {self._settings.timeout_s:g}s during a stream"
            ) from err
        except aiohttp.ClientPayloadError as err:
            raise ProviderUnreachable(f"{self.name} dropped the connection mid-stream: {err}") from err
        except aiohttp.ClientError as err:
            raise self.unreachable(err) from err

    def unreachable(self, err: BaseException) -> ProviderUnreachable:
        return ProviderUnreachable(
            f"cannot reach provider {self.name!r} at {self._settings.base_url} ({_reason(err)}); "
            f"check that it is up and that providers.{self.name}.base_url is right"
        )

    def error_from(self, status: int, raw: bytes, retry_after: str | None = None) -> ProviderError:
        body: Any = None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        message = None
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                message = err.get("message")
            elif isinstance(err, str):
                message = err
        if not message:
            message = raw[:500].decode(errors="replace") or f"HTTP {status}"
        return ProviderError(
            f"{self.name} answered {status}: {message}",
            status=status,
            provider=self.name,
            body=body if isinstance(body, dict) else None,
            retry_after_s=_seconds(retry_after),
        )


def _reason(err: BaseException) -> str:
    """Why a connection failed, in a few words (aiohttp's own text names ssl:default even for http)."""
    if isinstance(err, aiohttp.ClientConnectorError):
        os_error = err.os_error
        # The errno's own words ("connection refused"); asyncio's strerror is "Connect call failed (...)".
        reason = (
            os.strerror(os_error.errno) if os_error.errno else str(os_error) or type(os_error).__name__
        ).lower()
        return f"{reason} connecting to {err.host}:{err.port}"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    return str(err) or type(err).__name__


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from model APIs and is ignored)."""
    if retry_after is None:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return None
