"""Adapter for OpenAI's chat completions wire format (OpenAI, vLLM, llama.cpp, Ollama, Groq, ...)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from thrifty.errors import ProviderProtocolError
from thrifty.providers.base import StreamChunk
from thrifty.providers.http import HttpClient
from thrifty.settings import ProviderSettings
from thrifty.types import ModelTarget, UpstreamResult, Usage


def usage_from_openai(raw: Any) -> Usage | None:
    """OpenAI's usage block -> Usage. `prompt_tokens` already includes cached tokens."""
    if not isinstance(raw, dict) or "prompt_tokens" not in raw:
        return None
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=int(raw.get("prompt_tokens") or 0),
        cached_input_tokens=int(prompt_details.get("cached_tokens") or 0),
        cache_write_tokens=0,
        output_tokens=int(raw.get("completion_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


class OpenAIProvider:
    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        api_key: str | None,
        *,
        missing_key_env: str | None = None,
    ) -> None:
        self.name = name
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HttpClient(name, settings, headers, missing_key_env=missing_key_env)
        assert settings.base_url is not None
        self._url = settings.base_url.rstrip("/") + "/chat/completions"

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    async def complete(self, target: ModelTarget, body: dict[str, Any]) -> UpstreamResult:
        payload = dict(body)
        payload["model"] = target.upstream_model
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        resp = await self._http.post_json(self._url, payload)
        return UpstreamResult(body=resp, usage=usage_from_openai(resp.get("usage")))

    async def stream(self, target: ModelTarget, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        payload = dict(body)
        payload["model"] = target.upstream_model
        payload["stream"] = True
        # Ask for the usage chunk even if the client did not; the gateway hides it again then.
        payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        async for data in self._http.post_stream(self._url, payload):
            if data == b"[DONE]":
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as err:
                raise ProviderProtocolError(
                    f"{self.name} sent an SSE event that is not JSON: {data[:200]!r}"
                ) from err
            if not isinstance(chunk, dict):
                raise ProviderProtocolError(f"{self.name} sent an SSE event that is not a JSON object")
            if "error" in chunk and "choices" not in chunk:
                raise self._http.error_from(502, data)
            yield StreamChunk(chunk, raw=data, usage=usage_from_openai(chunk.get("usage")))
