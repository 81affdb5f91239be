"""Keeping a running key's or flight's short lease alive while its owner generates.

A running record is written with a short lease (`idempotency.flight_lease_s`) so that a gateway
that dies mid-request frees it soon; the live owner renews it every third of that lease, off the
request path, until it finishes. Nothing runs before the first third has passed: a request
shorter than that costs one timer and no round trip. Renewal stops when the owner is told it no
longer holds the record (the fencing token: its lease ended while it was paused and another
owner took over), and after `idempotency.lease_s` in all, which bounds how long a request that
never finishes can hold its key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Heartbeat:
    """Renews one running record every `lease_s / 3` (by `renew`, which says whether the owner
    still holds it) until `stop`, a lost record, or `hold_s` from now."""

    def __init__(
        self,
        renew: Callable[[], Awaitable[bool]],
        *,
        lease_s: float,
        hold_s: float,
        what: str,
        spawn: Spawn,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._renew = renew
        self._interval = lease_s / 3
        self._until = loop.time() + hold_s
        self._what = what
        # The owner's set of background tasks: a renewal in flight when the request ends finishes
        # there (cancelling a Redis call midway could leave its connection mid-reply).
        self._spawn = spawn
        self._stopped = False
        self._timer = loop.call_later(self._interval, self._beat)

    def stop(self) -> None:
        self._stopped = True
        self._timer.cancel()

    def _beat(self) -> None:
        if not self._stopped:
            self._spawn(self._renew_once())

    async def _renew_once(self) -> None:
        try:
            held = await self._renew()
        except Exception as err:  # noqa: BLE001 - an outage: the record holds until its lease ends
            log.warning("could not renew the lease of %s (trying again): %s", self._what, err)
            held = True
        if self._stopped:
            return
        if not held:
            log.warning(
                "%s was taken over after its lease ended (this gateway stalled?): its result will "
                "not be stored",
                self._what,
            )
            return
        loop = asyncio.get_running_loop()
        if loop.time() + self._interval < self._until:
            self._timer = loop.call_later(self._interval, self._beat)


__all__ = ["Heartbeat"]
