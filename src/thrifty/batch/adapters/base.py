"""The port a provider's batch API is driven through, in OpenAI's chat shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Set
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from thrifty.types import ModelTarget, Usage

OutcomeKind = Literal["done", "failed", "expired", "cancelled"]
# A provider's clock against ours, when a recovery looks for batches created since a moment.
CLOCK_SKEW_S = 300.0


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request to send: `custom_id` on the provider's side is thrifty's request id."""

    request_id: str
    target: ModelTarget
    body: dict[str, Any]  # an OpenAI chat body, already through the pre-call guards


@dataclass(frozen=True, slots=True)
class RemoteState:
    ended: bool
    status: str  # the provider's own word for it


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    kind: OutcomeKind
    status_code: int | None = None
    body: dict[str, Any] | None = None  # chat.completion when done; the provider's error body else
    usage: Usage | None = None
    error: dict[str, Any] | None = None  # {code, message} when the provider sent no response


class BatchAdapter(Protocol):
    name: str
    max_items: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, items: Iterable[Outbound], label: str) -> str:
        """Send one provider batch; return the provider's id for it."""
        ...

    async def find(self, label: str, request_ids: Set[str], since: float, known: Set[str]) -> str | None:
        """After a crash between sending a batch and storing its id: the provider's id of the
        batch sent with this label and these requests (their custom_ids) at or after `since`,
        never one of `known` (adopted already); None when the provider has no such batch. Raises
        a ThriftyError when it cannot tell yet (the provider is unreachable, or several of its
        batches could be this one): then nothing is sent again until it can."""
        ...

    async def poll(self, remote_id: str) -> RemoteState: ...

    def results(self, remote_id: str, items: Iterable[Outbound]) -> AsyncIterator[Outcome]: ...

    async def cancel(self, remote_id: str) -> None: ...
