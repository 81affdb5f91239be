"""OpenAI Batch: the lines go up as a JSONL file (purpose=batch), then one batch per file.

OpenAI takes one model per input file; the runner groups items by model before they get here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterable, Set
from typing import Any

import aiohttp
import orjson

from thrifty.batch.adapters.base import CLOCK_SKEW_S, Outbound, Outcome, RemoteState
from thrifty.errors import ProviderProtocolError, ThriftyError
from thrifty.providers.http import HttpClient
from thrifty.providers.openai import usage_from_openai
from thrifty.settings import ProviderSettings

_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
_LEFTOVER = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class OpenAIBatchAdapter:
    max_items = 50_000

    def __init__(
        self, name: str, settings: ProviderSettings, api_key: str | None, missing_key_env: str | None = None
    ) -> None:
        self.name = name
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HttpClient(name, settings, headers, missing_key_env=missing_key_env)
        assert settings.base_url is not None
        self._base = settings.base_url.rstrip("/")

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    async def submit(self, items: Iterable[Outbound], label: str) -> str:
        self._http._check_key()  # an unset key variable is named before anything is written
        # The input file is written to a temporary file and streamed up: memory does not grow with it.
        with tempfile.TemporaryFile() as fh:
            for item in items:
                line = {
                    "custom_id": item.request_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {**item.body, "model": item.target.upstream_model},
                }
                fh.write(orjson.dumps(line) + b"\n")
            fh.flush()
            # aiohttp reads the file in an executor thread and closes it there when done, which can
            # be after a refusal (401) has already come back and this block has closed `fh`: two
            # closes racing on one object, a ValueError that hid the refusal. So it gets a handle
            # of its own on the same file, which only it closes (or, unread, the collector).
            upload = os.fdopen(os.dup(fh.fileno()), "rb")
            upload.seek(0)
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", upload, filename=f"{label}.jsonl", content_type="application/jsonl")
            uploaded = await self._request("POST", "/files", data=form)
        batch = await self._http.post_json(
            self._base + "/batches",
            {
                "input_file_id": uploaded["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"thrifty_batch": label},
            },
        )
        return str(batch["id"])

    async def find(self, label: str, request_ids: Set[str], since: float, known: Set[str]) -> str | None:
        """Batches are created with metadata {thrifty_batch: label}: page through the list
        (newest first) back to `since`, less the clock skew allowed between us and the provider."""
        after: str | None = None
        while True:
            query = "/batches?limit=100" + (f"&after={after}" if after else "")
            listing = await self._request("GET", query)
            data = listing.get("data") or []
            for batch in data:
                if (batch.get("metadata") or {}).get("thrifty_batch") == label:
                    return str(batch["id"])
            if not data or not listing.get("has_more"):
                return None
            if float(data[-1].get("created_at") or 0) < since - CLOCK_SKEW_S:
                return None
            after = str(data[-1]["id"])

    async def poll(self, remote_id: str) -> RemoteState:
        batch = await self._request("GET", f"/batches/{remote_id}")
        status = str(batch.get("status"))
        return RemoteState(ended=status in _ENDED, status=status)

    async def results(self, remote_id: str, items: Iterable[Outbound]) -> AsyncIterator[Outcome]:
        batch = await self._request("GET", f"/batches/{remote_id}")
        files = [batch.get(k) for k in ("output_file_id", "error_file_id") if batch.get(k)]
        for file_id in files:
            async for line in self._lines(f"/files/{file_id}/content"):
                yield _outcome(line)
        if files:
            return  # a line missing from both files is the runner's to account for
        errors = (batch.get("errors") or {}).get("data") or []
        why = "; ".join(str(e.get("message")) for e in errors) or f"the batch ended {batch.get('status')}"
        for item in items:
            yield Outcome(
                item.request_id,
                "expired" if batch.get("status") == "expired" else "failed",
                error={"code": "batch_failed", "message": f"{self.name}: {why}"},
            )

    async def cancel(self, remote_id: str) -> None:
        await self._request("POST", f"/batches/{remote_id}/cancel")

    async def _request(self, method: str, path: str, data: aiohttp.FormData | None = None) -> dict[str, Any]:
        payload = data() if data is not None else None
        # The session's default content-type is JSON; a form names its own (with the boundary).
        headers = {"content-type": payload.content_type} if payload is not None else None
        try:
            async with self._http.session.request(
                method, self._base + path, data=payload, headers=headers
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._http.error_from(resp.status, raw)
        except ThriftyError:
            raise
        except aiohttp.ClientError as err:
            raise self._http.unreachable(err) from err
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            raise ProviderProtocolError(f"{self.name} answered {path} with JSON that is not an object")
        return body

    async def _lines(self, path: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self._http.session.get(self._base + path) as resp:
                if resp.status >= 400:
                    raise self._http.error_from(resp.status, await resp.read())
                async for raw in resp.content:
                    if raw.strip():
                        yield orjson.loads(raw)
        except ThriftyError:
            raise
        except aiohttp.ClientError as err:
            raise self._http.unreachable(err) from err


def _outcome(line: dict[str, Any]) -> Outcome:
    """One line of an output or error file, in OpenAI's format."""
    request_id = str(line.get("custom_id"))
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict):
        code = int(response.get("status_code") or 0)
        body = response.get("body") if isinstance(response.get("body"), dict) else None
        if code == 200 and body is not None:
            return Outcome(request_id, "done", 200, body, usage_from_openai(body.get("usage")))
        return Outcome(request_id, "failed", code or 500, body)
    error = error if isinstance(error, dict) else {"code": "unknown", "message": "no response"}
    return Outcome(request_id, _LEFTOVER.get(str(error.get("code")), "failed"), error=error)  # type: ignore[arg-type]
