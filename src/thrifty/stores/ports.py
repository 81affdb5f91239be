"""The state ports the stages depend on, and the values they speak in.

Two kinds of implementation stand behind them. The in-process ones (`BudgetBook`, `FlightStore`,
the rate windows, SQLite) give the embedded default its guarantees because their check-and-update
runs without an await on one event loop; their methods are plain calls. The shared ones (Redis,
PostgreSQL, for several replicas) cross the network, so their ports are async and must give the
same guarantees with atomic operations: `reserve` all-or-nothing across every limit in one round
trip, a settle that counts once however often it is retried, `claim` exactly one owner per key.

A stage holds the in-process store and, when settings name a shared backend, the shared one; it
awaits only in the second case, so the embedded default pays nothing for the option.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from thrifty.errors import SharedStateUnavailable
    from thrifty.types import Usage

Window = Literal["day", "month"]
Unit = Literal["usd", "tokens"]
ScopeKind = Literal["org", "tenant", "feature", "route"]


@dataclass(frozen=True, slots=True)
class Scope:
    kind: ScopeKind
    name: str  # "" for the org, the tenant id, "tenant/feature", or the route name

    def describe(self) -> str:
        return "the organisation" if self.kind == "org" else f"{self.kind} {self.name!r}"


@dataclass(frozen=True, slots=True)
class Limit:
    scope: Scope
    window: Window
    unit: Unit
    amount: Decimal


CounterKey = tuple[Scope, Window, float, Unit]  # scope, window, window start, unit


@dataclass(slots=True)
class Reservation:
    keys: list[CounterKey]
    usd: Decimal
    tokens: int
    settled: bool = False
    # Shared stores: the reservation's id (also its settle id) and the lease it holds.
    id: str | None = None
    local: bool = True  # False when a shared store holds it


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """A shared store's answer: the reservation, or the index of the first limit too small.

    `left` is what remains on each limit (in the order given) after the reservation, or at the
    refusal: the stage builds the remaining-budget header and the refusal message from it. When
    the rate admission came along (`admit=`), `admission` is its answer; a request it refused
    reserves nothing (reservation None, left empty, refused None)."""

    reservation: Reservation | None
    left: list[Decimal]
    refused: int | None = None
    admission: Admission | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """A shared rate store's answer for one request.

    `refused` names the limit that was hit ("requests", "tokens" or "steps"), `used` what was used
    of it and `wait_s` how long until a slot frees up."""

    refused: Literal["requests", "tokens", "steps"] | None = None
    used: int = 0
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """One request's rate admission: the tenant's per-minute limits (None: no such limit), the
    tokens it may use, and its session's step key and maximum."""

    tenant: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    tokens: int
    session: tuple[str, int] | None


@dataclass(slots=True)
class PendingAdmission:
    """A rate admission the rate stage leaves to the budget stage, so that both go to the shared
    store in one round trip. `check` raises the rate stage's own errors for a refusal; `alone`
    runs the admission by itself (a request that reserves nothing); `unavailable` decides what
    a store that did not answer means (raise, or admit with the local windows)."""

    request: AdmitRequest
    check: Callable[[Admission], None]
    alone: Callable[[], Awaitable[None]]
    unavailable: Callable[[SharedStateUnavailable], None]


def window_bounds(ts: float, window: Window) -> tuple[float, float]:
    """(start, end) of the UTC day or month containing ts."""
    now = datetime.fromtimestamp(ts, UTC)
    if window == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(start.timestamp() + 86400, UTC)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        if start.month == 12:
            end = start.replace(year=start.year + 1, month=1)
        else:
            end = start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


# -- budgets -------------------------------------------------------------------------------------


class BudgetStore(Protocol):
    """In-process: every call completes without an await."""

    def reserve(self, limits: Iterable[Limit], ts: float, usd: Decimal, tokens: int) -> Reservation:
        """Reserve on every limit or none; raise BudgetExceeded naming the first that is too small."""
        ...

    def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> None:
        """Replace a reservation by the actual spend (idempotent)."""
        ...

    def remaining(self, limit: Limit, ts: float) -> Decimal: ...

    def spent_in_window(self, limit: Limit, ts: float) -> tuple[float, Decimal]: ...


class SharedBudgetStore(Protocol):
    """Across replicas. Each method is one round trip; a reservation not settled within the
    store's lease (its replica died) is released by the store itself."""

    async def reserve(
        self,
        limits: Sequence[Limit],
        ts: float,
        usd: Decimal,
        tokens: int,
        admit: AdmitRequest | None = None,
        reservation_id: str | None = None,
        lease_s: float | None = None,
    ) -> ReserveOutcome:
        """Reserve on every limit or none, after `admit` (when given) in the same round trip.
        `reservation_id` (default: a new one) is also the settle id: a batch item's, so that any
        replica recording its result releases its hold. `lease_s` (default: the store's lease) is
        how long the hold lasts unsettled: a batch item's lasts its provider's window."""
        ...

    async def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> list[Decimal]:
        """Replace the reservation by the actual spend; a repeat of the same settle counts nothing.
        Returns what is spent on each of the reservation's counters afterwards."""
        ...

    async def remaining(self, limits: Sequence[Limit], ts: float) -> list[Decimal]: ...

    async def rebuild_once(
        self, month_start: float, load: Callable[[], Awaitable[dict[CounterKey, Decimal]]]
    ) -> bool:
        """Set the counters `load` rebuilds from the ledger, once per month across replicas: one
        replica takes a lock, sees no marker for the month, loads, sets and marks; the others wait
        for the marker. Returns whether this call did the rebuild."""
        ...


# -- rate limits ---------------------------------------------------------------------------------


class SharedRateStore(Protocol):
    async def admit(self, request: AdmitRequest) -> Admission:
        """Check and record one request in the tenant's sliding minute (and its session's step
        count, `(session key, max steps)`), all or nothing, in one round trip."""
        ...


# -- circuit breakers ----------------------------------------------------------------------------


class BreakerBoard(Protocol):
    """Where replicas tell each other which targets' breakers are open (off the request path)."""

    def opened(self, target: str, cooldown_s: float) -> None: ...

    def closed(self, target: str) -> None: ...

    def start(self, apply: Callable[[dict[str, float]], None]) -> None:
        """Call `apply` with {target: seconds of cool-down left} whenever the board is read."""
        ...

    async def close(self) -> None: ...


# -- durable storage (SQLite, PostgreSQL) --------------------------------------------------------


class KeyDirectory(Protocol):
    def tenant_for_hash(self, key_hash: str) -> str | None: ...


class SharedExactCache(Protocol):
    async def get(self, key: str, now: float) -> tuple[dict[str, Any], Usage] | None: ...

    async def put(
        self,
        key: str,
        scope: dict[str, Any],
        response: dict[str, Any],
        usage: Usage,
        ttl_s: float,
        made_at: float,
    ) -> None:
        """Store an answer made at ``made_at`` (written after the response: a purge since covers it)."""
        ...


class LedgerReader(Protocol):
    """What reports, alert listings and the budget rebuild read (the CLI and start-up; sync)."""

    def report_rows(
        self, column: str, since: float | None, until: float | None = None, tenant: str | None = None
    ) -> Iterable[tuple[Any, ...]]: ...

    def spend_rows(self, since: float) -> Iterable[tuple[float, str, str | None, str | None, Any, int]]:
        """(ts, tenant, feature, route, cost_usd, tokens) since `since`."""
        ...

    def usage_rows(self, since: float, until: float, feature: str | None = None) -> Iterable[tuple[Any, ...]]:
        """(ts, tenant, feature, model, cache, batch, status, cost_usd, input_tokens,
        cached_input_tokens, output_tokens, retries, attempts) with since <= ts < until, oldest
        first; attempts as stored (JSON text in SQLite, a parsed list from PostgreSQL)."""
        ...

    def alerts_since(self, since: float) -> list[tuple[float, str, str, str, float | None, str | None]]: ...

    def route_requests(self, route: str, since: float, prompt_version: str | None = None) -> int:
        """How many requests the route (and prompt version) had since `since` (prompt lint's traffic)."""
        ...

    def costs(self, request_ids: Sequence[str]) -> dict[str, str | None]:
        """Each found request's cost as decimal text (None: unpriced), by request id."""
        ...

    def close(self) -> None: ...


# -- idempotency: one durable record per (tenant, Idempotency-Key) ---------------------------


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
    died from being generated twice (repeats get a 409 until the lease ends). The lease is short and
    renewed by its live owner (`renew`), so a dead owner's key is free again soon."""

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

    async def renew(self, key: IdempotencyKey, *, owner: str, now: float, lease_s: float) -> bool:
        """The owner is alive and still generating: its running record now ends at `now + lease_s`.
        False (and nothing written) when `owner` no longer holds a running record for the key (its
        lease ended and another owner took it over, or it finished)."""
        ...

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        """The owner's request failed: drop its running record so a retry generates anew."""
        ...


class SharedFlights(Protocol):
    """Key-less coalescing across replicas (routes with `coalesce: true`, shared state only): one
    generation per identical in-flight request, whichever replica it reaches. Unlike an
    idempotency record, a finished flight answers only the requests that joined it while it ran;
    a request arriving after it finished starts a new flight (coalescing is not a cache)."""

    async def join(
        self, tenant_id: str, flight: str, *, owner: str, lease_s: float, waiting: bool
    ) -> StoredResult | bool:
        """Atomically: True when `owner` now leads the flight (none running, its lease ended, or,
        for a first join (`waiting` False), only a finished one); False while another owner runs
        it; its result once it finished, for a request already `waiting` on it."""
        ...

    async def publish(
        self, tenant_id: str, flight: str, result: StoredResult, *, owner: str, ttl_s: float
    ) -> None:
        """The leader's result, for its waiters (if `owner` still leads: a stale leader cannot)."""
        ...

    async def renew(self, tenant_id: str, flight: str, *, owner: str, lease_s: float) -> bool:
        """The leader is alive: its flight's lease now ends `lease_s` from now. False (nothing
        written) when `owner` no longer leads it (a waiter took it over after its lease ended)."""
        ...

    async def release(self, tenant_id: str, flight: str, *, owner: str) -> None:
        """The leader failed: its waiters join again and one of them leads."""
        ...


__all__ = [
    "Admission",
    "AdmitRequest",
    "BreakerBoard",
    "BudgetStore",
    "CounterKey",
    "IdempotencyKey",
    "IdempotencyRecord",
    "IdempotencyStore",
    "KeyDirectory",
    "LedgerReader",
    "Limit",
    "PendingAdmission",
    "Reservation",
    "ReserveOutcome",
    "Scope",
    "SharedBudgetStore",
    "SharedExactCache",
    "SharedFlights",
    "SharedRateStore",
    "StoredResult",
    "Unit",
    "Window",
    "window_bounds",
]
