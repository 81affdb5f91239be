"""Anthropic Message Batches: `requests: [{custom_id, params}]`, results JSONL from results_url."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson

from thrifty.batch.adapters.base import Outbound, Outcome, RemoteState
from thrifty.errors import ProviderProtocolError, ThriftyError
from thrifty.providers.anthropic import auth_headers, from_anthropic_message, usage_from_anthropic
from thrifty.providers.anthropic_request import to_anthropic_request
from thrifty.providers.http import HttpClient
from thrifty.settings import ProviderSettings

_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class AnthropicBatchAdapter:
    max_items = 100_000

    def __init__(
        self, name: str, settings: ProviderSettings, api_key: str | None, missing_key_env: str | None = None
    ) -> None:
        self.name = name
        self._http = HttpClient(
            name, settings, auth_headers(settings, api_key), missing_key_env=missing_key_env
        )
        assert settings.base_url is not None
        self._url = settings.base_url.rstrip("/") + "/v1/messages/batches"

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    async def submit(self, items: Iterable[Outbound], label: str) -> str:
        # Anthropic takes the requests inline in one JSON body (up to 256 MB), so they are in memory.
        requests = [
            {
                "custom_id": item.request_id,
                "params": to_anthropic_request(item.body, item.target.upstream_model),
            }
            for item in items
        ]
        batch = await self._http.post_json(self._url, {"requests": requests})
        return str(batch["id"])

    async def find(self, label: str) -> str | None:
        return None  # its batches carry no label to find them by

    async def poll(self, remote_id: str) -> RemoteState:
        batch = await self._get(f"{self._url}/{remote_id}")
        status = str(batch.get("processing_status"))
        return RemoteState(ended=status == "ended", status=status)

    async def results(self, remote_id: str, items: Iterable[Outbound]) -> AsyncIterator[Outcome]:
        batch = await self._get(f"{self._url}/{remote_id}")
        url = batch.get("results_url")
        if not url:
            raise ProviderProtocolError(f"{self.name}: batch {remote_id} ended without a results_url")
        try:
            async with self._http.session.get(url) as resp:
                if resp.status >= 400:
                    raise self._http.error_from(resp.status, await resp.read())
                async for raw in resp.content:
                    if raw.strip():
                        yield _outcome(orjson.loads(raw))
        except ThriftyError:
            raise
        except aiohttp.ClientError as err:
            raise self._http.unreachable(err) from err

    async def cancel(self, remote_id: str) -> None:
        await self._http.post_json(f"{self._url}/{remote_id}/cancel", {})

    async def _get(self, url: str) -> dict[str, Any]:
        try:
            async with self._http.session.get(url) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._http.error_from(resp.status, raw)
        except ThriftyError:
            raise
        except aiohttp.ClientError as err:
            raise self._http.unreachable(err) from err
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            raise ProviderProtocolError(f"{self.name} answered with JSON that is not an object")
        return body


def _outcome(line: dict[str, Any]) -> Outcome:
    request_id = str(line.get("custom_id"))
    result = line.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        usage = message.get("usage")
        return Outcome(
            request_id,
            "done",
            200,
            from_anthropic_message(message),
            usage_from_anthropic(usage) if isinstance(usage, dict) else None,
        )
    if kind in ("canceled", "expired"):
        return Outcome(
            request_id,
            "cancelled" if kind == "canceled" else "expired",
            error={"code": f"batch_{'cancelled' if kind == 'canceled' else 'expired'}", "message": kind},
        )
    inner = ((result.get("error") or {}).get("error")) or {}
    error_type = str(inner.get("type") or "api_error")
    body = {"error": {"message": inner.get("message") or "errored", "type": error_type, "code": None}}
    return Outcome(request_id, "failed", _ERROR_STATUS.get(error_type, 500), body)
