"""The heartbeat that renews a running key's short lease: when it renews, and when it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from thrifty.dedup.heartbeat import Heartbeat


class Owner:
    """What the dedup stage gives a heartbeat: a renewal that answers whether the record is still
    held (here: as scripted), and a set that keeps its background tasks alive."""

    def __init__(self, held: list[bool] | None = None, fail: int = 0) -> None:
        self.renewals = 0
        self._held = held or []
        self._fail = fail
        self.tasks: set[asyncio.Task[None]] = set()

    async def renew(self) -> bool:
        self.renewals += 1
        if self._fail:
            self._fail -= 1
            raise OSError("redis away")
        return self._held.pop(0) if self._held else True

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def beat(owner: Owner, lease_s: float = 0.3, hold_s: float = 60.0) -> Heartbeat:
    return Heartbeat(owner.renew, lease_s=lease_s, hold_s=hold_s, what="a test key", spawn=owner.spawn)


async def test_nothing_is_renewed_before_a_third_of_the_lease_and_nothing_after_stop():
    owner = Owner()
    heartbeat = beat(owner)
    await asyncio.sleep(0.05)
    heartbeat.stop()  # a short request: one timer, cancelled, and no renewal
    await asyncio.sleep(0.3)
    assert owner.renewals == 0


async def test_it_renews_every_third_of_the_lease_until_stopped():
    owner = Owner()
    heartbeat = beat(owner)
    await asyncio.sleep(0.55)  # renewals at 0.1 .. 0.5 s
    heartbeat.stop()
    done = owner.renewals
    await asyncio.sleep(0.3)
    assert 3 <= done <= 5 and owner.renewals == done  # 3: a loaded machine's late timers


async def test_a_lost_record_stops_renewal_and_an_outage_does_not():
    lost = Owner(held=[True, False])
    beat(lost)
    failing = Owner(fail=2)  # the first two renewals fail (Redis away); it keeps trying
    heartbeat = beat(failing)
    await asyncio.sleep(0.65)
    heartbeat.stop()
    assert lost.renewals == 2  # taken over: fenced off, it stops trying
    assert failing.renewals >= 3  # it tried again after both failures


async def test_renewal_stops_after_the_hold():
    owner = Owner()
    beat(owner, lease_s=0.3, hold_s=0.35)  # renewals at 0.1, 0.2, 0.3 s; none once the hold is over
    await asyncio.sleep(0.7)
    done = owner.renewals
    await asyncio.sleep(0.3)
    assert 2 <= done <= 3 and owner.renewals == done  # 2: a loaded machine's late timers
