"""Anthropic Message Batches: `requests: [{custom_id, params}]`, results JSONL from results_url."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterable, Set
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from thrifty.batch.adapters.base import CLOCK_SKEW_S, Outbound, Outcome, RemoteState
from thrifty.errors import BatchUnresolved, ProviderProtocolError, ThriftyError
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
        self._http._check_key()  # an unset key variable is named before anything is written
        # Anthropic takes the requests inline in one JSON body (up to 256 MB): it is written to a
        # temporary file a request at a time and streamed up, so memory does not grow with it.
        with tempfile.TemporaryFile() as fh:
            fh.write(b'{"requests":[')
            for n, item in enumerate(items):
                request = {
                    "custom_id": item.request_id,
                    "params": to_anthropic_request(item.body, item.target.upstream_model),
                }
                fh.write((b"," if n else b"") + orjson.dumps(request))
            fh.write(b"]}")
            fh.seek(0)
            batch = await self._http.post_json(self._url, fh)
        return str(batch["id"])

    async def find(self, label: str, request_ids: Set[str], since: float, known: Set[str]) -> str | None:
        """Message batches carry no label, so the one sent is told by what they do carry: made
        since `since` (less the clock skew), not adopted already, with exactly our number of
        requests; one that has ended shows its custom_ids (our request ids) in its results. An
        ended batch with other custom_ids is not ours; of the rest, a single one is adopted (if
        none of our items comes back from it, the runner queues them again); several cannot be
        told apart until they end."""
        open_candidates: list[str] = []
        async for batch in self._batches_since(since - CLOCK_SKEW_S):
            batch_id = str(batch.get("id"))
            counts = batch.get("request_counts") or {}
            if batch_id in known or sum(int(n) for n in counts.values()) != len(request_ids):
                continue
            if batch.get("processing_status") == "ended" and batch.get("results_url"):
                if await self._first_custom_id(str(batch["results_url"])) in request_ids:
                    return batch_id
                continue
            open_candidates.append(batch_id)
        if len(open_candidates) > 1:
            raise BatchUnresolved(
                f"{self.name}: {len(open_candidates)} message batches of {len(request_ids)} requests were "
                f"created since {label} was sent and none has ended; looked for again once they do"
            )
        return open_candidates[0] if open_candidates else None

    async def _batches_since(self, since: float) -> AsyncIterator[dict[str, Any]]:
        """The workspace's batches, newest first, page by page, back to `since`."""
        after: str | None = None
        while True:
            listing = await self._get(self._url + "?limit=100" + (f"&after_id={after}" if after else ""))
            data = listing.get("data") or []
            for batch in data:
                if _timestamp(batch.get("created_at")) < since:
                    return
                yield batch
            if not data or not listing.get("has_more") or not listing.get("last_id"):
                return
            after = str(listing["last_id"])

    async def _first_custom_id(self, url: str) -> str | None:
        try:
            async with self._http.session.get(url) as resp:
                if resp.status >= 400:
                    raise self._http.error_from(resp.status, await resp.read())
                async for raw in resp.content:
                    if raw.strip():
                        return str(orjson.loads(raw).get("custom_id"))
        except ThriftyError:
            raise
        except aiohttp.ClientError as err:
            raise self._http.unreachable(err) from err
        return None

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


def _timestamp(value: Any) -> float:
    """Anthropic's RFC 3339 times ("2024-08-20T18:37:24.100435Z") as Unix seconds."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError as err:
        raise ProviderProtocolError(f"a message batch's created_at {value!r} is not a time") from err


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
