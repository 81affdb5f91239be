"""The replay provider as a batch API: answers every item at once from its recordings (offline demo)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Set

from thrifty.batch.adapters.base import Outbound, Outcome, RemoteState
from thrifty.errors import ThriftyError
from thrifty.providers.replay import ReplayProvider


class ReplayBatchAdapter:
    max_items = 100_000

    def __init__(self, name: str, provider: ReplayProvider) -> None:
        self.name = name
        self._provider = provider

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def submit(self, items: Iterable[Outbound], label: str) -> str:
        return f"replay_{os.urandom(8).hex()}"

    async def find(self, label: str, request_ids: Set[str], since: float, known: Set[str]) -> str | None:
        return None  # nothing is sent anywhere: a batch not stored was never answered

    async def poll(self, remote_id: str) -> RemoteState:
        return RemoteState(ended=True, status="ended")

    async def results(self, remote_id: str, items: Iterable[Outbound]) -> AsyncIterator[Outcome]:
        for item in items:
            try:
                result = await self._provider.complete(item.target, item.body)
            except ThriftyError as err:
                yield Outcome(item.request_id, "failed", err.status, err.to_openai())
                continue
            yield Outcome(item.request_id, "done", 200, result.body, result.usage)

    async def cancel(self, remote_id: str) -> None:
        return None
