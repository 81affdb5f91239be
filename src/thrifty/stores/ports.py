"""The state ports the guard and dedup stages depend on, with the values they speak in.

The in-process implementations (`BudgetBook`, the rate windows) give the embedded default its
guarantees because their check-and-update runs without an await on one event loop. A shared
implementation (Redis, for several replicas) must give the same guarantees with atomic
operations: `reserve` all-or-nothing across every limit, `claim` exactly one owner per key.

A port owns its value types (or takes them from `thrifty.types`), so an implementation depends on
this module alone, never on a stage. Ports that cross the network are async.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from thrifty.guard.budgets import Limit, Reservation


class BudgetStore(Protocol):
    def reserve(self, limits: Iterable[Limit], ts: float, usd: Decimal, tokens: int) -> Reservation:
        """Reserve on every limit or none; raise BudgetExceeded naming the first that is too small."""
        ...

    def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> None:
        """Replace a reservation by the actual spend (idempotent)."""
        ...

    def remaining(self, limit: Limit, ts: float) -> Decimal: ...

    def spent_in_window(self, limit: Limit, ts: float) -> tuple[float, Decimal]: ...


# ---------------------------------------------------------------------------------------------
# Idempotency: one durable record per (tenant, Idempotency-Key)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    tenant_id: str
    key: str  # the client's Idempotency-Key header


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A finished generation as a repeat is answered: the completion body in OpenAI's shape (a
    streamed answer folded into one), and what generating it cost (None when unpriced)."""

    body: dict[str, Any]
    cost_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What the store holds for a key someone else claimed first."""

    fingerprint: str  # the generation asked for: a repeat with another body is refused
    result: StoredResult | None  # None while the first request may still be running
    expires_at: float  # wall clock: end of the lease while running, of the TTL once done


class IdempotencyStore(Protocol):
    """Durable idempotency records: a finished result answers repeats for its TTL, across restarts
    and replicas; a running marker with a lease keeps a key that was in flight when its gateway
    died from being generated twice (repeats get a 409 until the lease ends)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(
        self, key: IdempotencyKey, fingerprint: str, *, owner: str, now: float, lease_s: float
    ) -> IdempotencyRecord | None:
        """Atomically: when the key has no live record (none, expired, or running under this same
        `owner`), write a running record for `owner` until `now + lease_s` and return None: the
        caller generates. Otherwise return the record found and write nothing."""
        ...

    async def complete(
        self, key: IdempotencyKey, result: StoredResult, *, owner: str, now: float, ttl_s: float
    ) -> None:
        """Store the finished result until `now + ttl_s`, if `owner` still holds the key."""
        ...

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        """The owner's request failed: drop its running record so a retry generates anew."""
        ...


__all__ = ["BudgetStore", "IdempotencyKey", "IdempotencyRecord", "IdempotencyStore", "StoredResult"]
