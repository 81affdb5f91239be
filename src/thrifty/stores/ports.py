"""The state ports the guard stages depend on.

The in-process implementations (`BudgetBook`, `FlightStore`, the rate windows) give the embedded
default its guarantees because their check-and-update runs without an await on one event loop.
A shared implementation (Redis, for several replicas) must give the same guarantees with atomic
operations: `reserve` all-or-nothing across every limit, `begin` exactly one leader per key.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from thrifty.dedup.stage import Flight, Outcome
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


class FlightStorePort(Protocol):
    def get(self, key: tuple[str, ...], now: float) -> Flight | None: ...

    def begin(self, key: tuple[str, ...], fingerprint: str) -> Flight:
        """Become the one leader for `key`; callers have checked `get` first."""
        ...

    def finish(self, key: tuple[str, ...], flight: Flight, outcome: Outcome, *, keep: bool) -> None: ...

    def fail(self, key: tuple[str, ...], flight: Flight, error: BaseException) -> None: ...


__all__ = ["BudgetStore", "FlightStorePort"]
