"""Idempotency records while Redis is away, with `shared_state.fault_mode: degrade_local`.

At most once across replicas needs one owner per key that every replica agrees on; without Redis
there is none, so the promise cannot be kept whole. `fail_closed` refuses every request (503
naming Redis), including those with an `Idempotency-Key`. `degrade_local` is the operator saying
"keep serving, per replica" for budgets and rate limits; idempotency follows the same rule and
keeps what one replica can keep:

- while Redis is away, a key is claimed in this replica's own SQLite file: repeats reaching this
  replica get the same result without a new generation (a key reused with another body is still
  refused). A repeat reaching another replica may be generated once more there: at most one
  generation per replica, the same N-fold bound the budgets and rate limits have in this mode.
- a leader whose claim is in Redis but whose result cannot be stored there (Redis went away
  mid-generation) keeps the result locally the same way.
- once Redis answers again, a repeat on this replica of a key finished locally is answered from
  the local result, and the result is published to Redis for the other replicas: no generation
  after the outage repeats one made during it.
- what Redis held before the outage is in Redis only: a repeat of such a key during the outage may
  be generated again (once per replica).

Every decision taken without Redis counts in the degraded-decisions metric and is logged.
"""

from __future__ import annotations

from thrifty.errors import SharedStateUnavailable
from thrifty.stores.faults import LocalFallback
from thrifty.stores.idempotency import SqliteIdempotencyStore
from thrifty.stores.ports import IdempotencyKey, IdempotencyRecord, IdempotencyStore, StoredResult

_MAX_CLAIMS = 100_000  # claims awaiting their complete/release (a leak guard, far above real use)


class DegradingIdempotencyStore:
    """The shared store (Redis) while it answers, this replica's SQLite file while it does not."""

    def __init__(
        self, shared: IdempotencyStore, local: SqliteIdempotencyStore, fallback: LocalFallback
    ) -> None:
        self._shared = shared
        self._local = local
        self._fallback = fallback
        # Keys this gateway claimed and has not finished: (claimed locally, fingerprint).
        self._claims: dict[IdempotencyKey, tuple[bool, str]] = {}
        self._local_until = 0.0  # wall clock until which a result finished locally may be live

    async def start(self) -> None:
        await self._shared.start()
        await self._local.start()
        # What an earlier life of this replica finished during an outage still answers here.
        self._local_until = await self._local.last_expiry()

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()

    def _remember(self, key: IdempotencyKey, local: bool, fingerprint: str) -> None:
        if len(self._claims) >= _MAX_CLAIMS:
            del self._claims[next(iter(self._claims))]
        self._claims[key] = (local, fingerprint)

    async def claim(
        self, key: IdempotencyKey, fingerprint: str, *, owner: str, now: float, lease_s: float
    ) -> IdempotencyRecord | None:
        try:
            record = await self._shared.claim(key, fingerprint, owner=owner, now=now, lease_s=lease_s)
        except SharedStateUnavailable as err:
            self._fallback.note(err)
            record = await self._local.claim(key, fingerprint, owner=owner, now=now, lease_s=lease_s)
            if record is None:
                self._remember(key, True, fingerprint)
            return record
        if record is not None:
            return record
        if now < self._local_until:
            # Redis is back and this replica finished keys without it: this may be one of them.
            found = await self._local.finished(key, now)
            if found is not None and found.result is not None:
                try:
                    if found.fingerprint == fingerprint:
                        ttl_s = found.expires_at - now
                        await self._shared.complete(key, found.result, owner=owner, now=now, ttl_s=ttl_s)
                    else:
                        await self._shared.release(key, owner=owner)
                except SharedStateUnavailable as err:  # gone again: answered here all the same
                    self._fallback.note(err)
                return found
        self._remember(key, False, fingerprint)
        return None

    async def complete(
        self, key: IdempotencyKey, result: StoredResult, *, owner: str, now: float, ttl_s: float
    ) -> None:
        local, fingerprint = self._claims.pop(key, (False, ""))
        if not local:
            try:
                await self._shared.complete(key, result, owner=owner, now=now, ttl_s=ttl_s)
                return
            except SharedStateUnavailable as err:
                self._fallback.note(err)
                if not fingerprint:
                    raise
                # Redis's running record ends with its lease; this replica answers from its own.
                await self._local.claim(key, fingerprint, owner=owner, now=now, lease_s=ttl_s)
        await self._local.complete(key, result, owner=owner, now=now, ttl_s=ttl_s)
        self._local_until = max(self._local_until, now + ttl_s)

    async def renew(self, key: IdempotencyKey, *, owner: str, now: float, lease_s: float) -> bool:
        # Where it was claimed; an outage raises, and the owner tries again at its next renewal.
        local, _ = self._claims.get(key, (False, ""))
        store: IdempotencyStore = self._local if local else self._shared
        return await store.renew(key, owner=owner, now=now, lease_s=lease_s)

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        local, _ = self._claims.pop(key, (False, ""))
        if local:
            await self._local.release(key, owner=owner)
        else:
            await self._shared.release(key, owner=owner)


__all__ = ["DegradingIdempotencyStore"]
