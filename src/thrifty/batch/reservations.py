"""Budget holds of batch items: every item's worst case at batch prices, reserved before anything
is sent (a job all or nothing), settled item by item as results arrive.

In-process (one replica, or PostgreSQL without shared state) the holds are in the gateway's budget
book, with no await inside a job's reservation, so it is atomic on the event loop. With shared
budgets (Redis) they are in the shared store, like real-time requests': a batch item's spend
counts on every replica. A shared hold lasts as long as a provider batch may take (BATCH_HOLD_S), not
the real-time lease, so an item's worst case stays held until its result lands; its spend is added
when the item is settled, on whichever replica records the result: the hold's id is the item's, so
that replica (or a restarted one) releases it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from thrifty.batch.store import Item, NewItem
from thrifty.errors import BudgetExceeded, SharedStateUnavailable
from thrifty.guard.budgets import BudgetBook, BudgetPlan, Reservation, rejection
from thrifty.stores.ports import Limit, SharedBudgetStore, window_bounds

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
# The providers' completion window (24 h) plus an hour to collect the results: a hold that outlives
# it belongs to a batch that expired, whose items are settled when the expiry is recorded.
BATCH_HOLD_S = 25 * 3600.0


class BatchReservations:
    def __init__(self, plan: BudgetPlan, book: BudgetBook, shared: SharedBudgetStore | None) -> None:
        self._plan = plan
        self._book = book
        self._shared = shared
        self.held: dict[str, Reservation] = {}  # request id -> its hold, on this replica

    @property
    def empty(self) -> bool:
        return self._plan.empty

    def _limits(self, tenant: str, tags: dict[str, Any], route: str | None) -> list[Limit]:
        return self._plan.limits_for(tenant, tags.get("feature"), route)

    async def reserve(self, tenant: str, tags: dict[str, Any], items: Iterable[NewItem]) -> None:
        """Hold every item's worst case, all or nothing; BudgetExceeded names the limit."""
        if self._plan.empty:
            return
        if self._shared is None:
            self.reserve_local(tenant, tags, list(items))
            return
        taken: list[tuple[str, Reservation]] = []
        now = time.time()
        try:
            for item in items:
                limits = self._limits(tenant, tags, item.route)
                usd = item.reserve_usd or _ZERO
                outcome = await self._shared.reserve(
                    limits,
                    now,
                    usd,
                    item.reserve_tokens,
                    reservation_id=_hold_id(item.request_id),
                    lease_s=BATCH_HOLD_S,
                )
                if outcome.reservation is None:
                    assert outcome.refused is not None
                    limit = limits[outcome.refused]
                    need = usd if limit.unit == "usd" else Decimal(item.reserve_tokens)
                    end = window_bounds(now, limit.window)[1]
                    raise BudgetExceeded(
                        rejection(limit, outcome.left[outcome.refused], need, end), resets_in_s=end - now
                    )
                taken.append((item.request_id, outcome.reservation))
        except (BudgetExceeded, SharedStateUnavailable):
            for _, reservation in taken:
                await self._settle_shared(reservation, _ZERO, 0)
            raise
        self.held.update(taken)

    def reserve_local(self, tenant: str, tags: dict[str, Any], items: list[NewItem]) -> None:
        """In the in-process book (no await inside: atomic on the loop)."""
        taken: list[tuple[str, Reservation]] = []
        now = time.time()
        try:
            for item in items:
                limits = self._limits(tenant, tags, item.route)
                reservation = self._book.reserve(limits, now, item.reserve_usd or _ZERO, item.reserve_tokens)
                taken.append((item.request_id, reservation))
        except BudgetExceeded:
            for _, reservation in taken:
                self._book.settle(reservation, _ZERO, 0)
            raise
        self.held.update(taken)

    def rereserve(self, owners: dict[str, tuple[str, dict[str, Any]]], items: list[Item]) -> None:
        """After a restart, in-process: hold the open items' worst case again (the ledger holds the
        spent part). The shared store keeps its own counters across restarts."""
        if self._plan.empty or self._shared is not None:
            return
        now = time.time()
        for item in items:
            tenant, tags = owners[item.job_id]
            try:
                self.held[item.request_id] = self._book.reserve(
                    self._limits(tenant, tags, item.route),
                    now,
                    item.reserve_usd or _ZERO,
                    item.reserve_tokens,
                )
            except BudgetExceeded:
                log.warning("batch item %s: its reservation no longer fits the budget", item.request_id)

    def drop_ended(self, request_ids: Iterable[str]) -> None:
        """Items another process recorded: their spend was counted there (with shared budgets it
        also released the hold), so this process's hold (or its memory of one) goes."""
        for request_id in request_ids:
            reservation = self.held.pop(request_id, None)
            if reservation is not None and self._shared is None:
                self._book.settle(reservation, _ZERO, 0)

    async def settle(
        self,
        request_id: str,
        usd: Decimal | None,
        tokens: int,
        owner: tuple[str, dict[str, Any], str | None, float] | None = None,
    ) -> None:
        """Replace an item's hold by what it cost. `owner` (tenant, tags, route, when the item was
        reserved) lets a replica that did not take the hold (or a restarted one) settle it in the
        shared store all the same: the hold's id is the item's, its counters those of that time."""
        reservation = self.held.pop(request_id, None)
        if self._shared is None:
            if reservation is not None:
                self._book.settle(reservation, usd or _ZERO, tokens)
            return
        if reservation is None:
            if owner is None or self._plan.empty:
                return
            tenant, tags, route, ts = owner
            keys = [
                (lim.scope, lim.window, window_bounds(ts, lim.window)[0], lim.unit)
                for lim in self._limits(tenant, tags, route)
            ]
            if not keys:
                return
            # The store counts a settle once, whoever sends it, and releases the hold it names.
            reservation = Reservation(keys, _ZERO, 0, id=_hold_id(request_id), local=False)
        await self._settle_shared(reservation, usd or _ZERO, tokens)

    async def _settle_shared(self, reservation: Reservation, usd: Decimal, tokens: int) -> None:
        assert self._shared is not None
        try:
            await self._shared.settle(reservation, usd, tokens)
        except SharedStateUnavailable as err:
            # The item's result and ledger row stand; the shared counters miss it until their rebuild.
            log.error("batch budget settlement %s lost: %s", reservation.id, err.message)


def _hold_id(request_id: str) -> str:
    return "batch-" + request_id
