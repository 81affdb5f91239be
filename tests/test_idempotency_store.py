"""The IdempotencyStore port's contract, against the SQLite and the Redis implementations.

Written against the port only: the `store` fixture runs each contract test on both (a real Redis,
started by scripts/services.sh); the tests that reopen a file or bound its size are SQLite's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from thrifty.stores.idempotency import SqliteIdempotencyStore
from thrifty.stores.ports import IdempotencyKey, IdempotencyStore, StoredResult

KEY = IdempotencyKey("acme", "order-1")
BODY = {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}


def make_store(tmp_path: Path, max_entries: int = 100) -> IdempotencyStore:
    return SqliteIdempotencyStore(tmp_path / "thrifty.db", max_entries=max_entries)


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdempotencyStore]:
    state = None
    if request.param == "redis":
        from thrifty.settings import SharedStateSettings
        from thrifty.stores.redis_idempotency import RedisIdempotencyStore
        from thrifty.stores.redis_state import RedisState

        services = request.getfixturevalue("services")
        state = RedisState(
            SharedStateSettings(url=services.redis_url, prefix=request.getfixturevalue("redis_prefix"))
        )
        s: IdempotencyStore = RedisIdempotencyStore(state)
    else:
        s = make_store(tmp_path)
    await s.start()
    yield s
    await s.close()
    if state is not None:
        await state.close()


async def test_one_owner_per_key_and_a_result_for_everyone_after(store: IdempotencyStore) -> None:
    assert await store.claim(KEY, "fp", owner="a", now=100.0, lease_s=60) is None
    running = await store.claim(KEY, "fp", owner="b", now=101.0, lease_s=60)
    assert running is not None and running.result is None and running.expires_at == 160.0
    # The same owner finds its own running record free (its flight ended, the release is late).
    assert await store.claim(KEY, "fp", owner="a", now=102.0, lease_s=60) is None
    await store.complete(KEY, StoredResult(BODY, Decimal("0.000123")), owner="a", now=103.0, ttl_s=1000)
    for owner in ("a", "b"):
        done = await store.claim(KEY, "other-fp", owner=owner, now=104.0, lease_s=60)
        assert done is not None and done.fingerprint == "fp"
        assert done.result == StoredResult(BODY, Decimal("0.000123")) and done.expires_at == 1103.0
    # Keys are per tenant.
    assert (
        await store.claim(IdempotencyKey("globex", "order-1"), "fp", owner="b", now=104.0, lease_s=60) is None
    )


async def test_leases_and_ttls_end_and_only_the_owner_completes_or_releases(store: IdempotencyStore) -> None:
    assert await store.claim(KEY, "fp", owner="a", now=100.0, lease_s=60) is None
    await store.release(KEY, owner="b")  # not b's: nothing happens
    assert await store.claim(KEY, "fp", owner="b", now=101.0, lease_s=60) is not None
    # After the lease, another owner takes the key over; the old owner can no longer complete it.
    assert await store.claim(KEY, "fp", owner="b", now=161.0, lease_s=60) is None
    await store.complete(KEY, StoredResult(BODY, None), owner="a", now=162.0, ttl_s=1000)
    still = await store.claim(KEY, "fp", owner="c", now=163.0, lease_s=60)
    assert still is not None and still.result is None
    await store.release(KEY, owner="b")
    assert await store.claim(KEY, "fp", owner="c", now=164.0, lease_s=60) is None
    await store.complete(KEY, StoredResult(BODY, None), owner="c", now=165.0, ttl_s=10)
    await store.release(KEY, owner="c")  # a finished result is not released
    assert (await store.claim(KEY, "fp", owner="d", now=170.0, lease_s=60)) is not None
    assert await store.claim(KEY, "fp", owner="d", now=175.0, lease_s=60) is None  # TTL over


async def test_results_survive_a_new_store_on_the_same_file(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    await first.start()
    assert await first.claim(KEY, "fp", owner="a", now=100.0, lease_s=60) is None
    await first.complete(KEY, StoredResult(BODY, Decimal("0.5")), owner="a", now=101.0, ttl_s=1000)
    await first.claim(IdempotencyKey("acme", "in-flight"), "fp", owner="a", now=102.0, lease_s=60)
    await first.close()
    second = make_store(tmp_path)
    await second.start()
    try:
        done = await second.claim(KEY, "fp", owner="z", now=200.0, lease_s=60)
        assert done is not None and done.result == StoredResult(BODY, Decimal("0.5"))
        running = await second.claim(
            IdempotencyKey("acme", "in-flight"), "fp", owner="z", now=120.0, lease_s=60
        )
        assert running is not None and running.result is None
    finally:
        await second.close()


async def test_the_oldest_results_are_dropped_beyond_max_entries_but_running_keys_never(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path, max_entries=2)
    await store.start()
    try:
        running = IdempotencyKey("acme", "running")
        assert await store.claim(running, "fp", owner="a", now=1.0, lease_s=10_000) is None
        for i in range(4):
            key = IdempotencyKey("acme", f"done-{i}")
            assert await store.claim(key, "fp", owner="a", now=10.0 + i, lease_s=60) is None
            await store.complete(key, StoredResult(BODY, None), owner="a", now=10.0 + i, ttl_s=1000)
        kept = [
            await store.claim(IdempotencyKey("acme", f"done-{i}"), "fp", owner="b", now=20.0, lease_s=60)
            is not None
            for i in range(4)
        ]
        assert kept == [False, False, True, True]
        found = await store.claim(running, "fp", owner="b", now=20.0, lease_s=60)
        assert found is not None and found.result is None
    finally:
        await store.close()


async def test_the_owner_renews_its_short_lease_and_a_stale_owner_can_neither_renew_nor_record(
    store: IdempotencyStore,
) -> None:
    assert await store.claim(KEY, "fp", owner="a", now=100.0, lease_s=15) is None
    assert await store.renew(KEY, owner="a", now=110.0, lease_s=15) is True  # now ends at 125
    assert await store.renew(KEY, owner="b", now=111.0, lease_s=15) is False  # not b's: nothing written
    running = await store.claim(KEY, "fp", owner="b", now=120.0, lease_s=15)
    assert running is not None and running.result is None and running.expires_at == 125.0
    # a stops renewing (it died, or stalled): once its lease ends b owns the key, and a is fenced off.
    assert await store.claim(KEY, "fp", owner="b", now=126.0, lease_s=15) is None
    assert await store.renew(KEY, owner="a", now=127.0, lease_s=15) is False
    await store.complete(KEY, StoredResult({"stale": True}, Decimal("0.5")), owner="a", now=128.0, ttl_s=1000)
    assert await store.renew(KEY, owner="b", now=129.0, lease_s=15) is True
    await store.complete(KEY, StoredResult(BODY, Decimal("0.25")), owner="b", now=130.0, ttl_s=1000)
    assert await store.renew(KEY, owner="b", now=131.0, lease_s=15) is False  # finished: nothing runs
    done = await store.claim(KEY, "fp", owner="c", now=132.0, lease_s=15)
    assert done is not None and done.result == StoredResult(BODY, Decimal("0.25"))
    assert done.expires_at == 1130.0  # the TTL, not a lease a renewal could have stretched


async def test_a_flight_leader_keeps_its_flight_by_renewing_and_a_stale_one_cannot_publish(
    services: Any, redis_prefix: str
) -> None:
    from thrifty.settings import SharedStateSettings
    from thrifty.stores.redis_idempotency import RedisFlights
    from thrifty.stores.redis_state import RedisState

    state = RedisState(SharedStateSettings(url=services.redis_url, prefix=redis_prefix))
    flights = RedisFlights(state)
    try:
        assert await flights.join("acme", "f", owner="a", lease_s=0.6, waiting=False) is True
        for _ in range(4):  # 1.2 s in all, twice the lease: still a's while it renews
            await asyncio.sleep(0.3)
            assert await flights.renew("acme", "f", owner="a", lease_s=0.6) is True
            assert await flights.join("acme", "f", owner="b", lease_s=0.6, waiting=True) is False
        await asyncio.sleep(0.7)  # a stopped renewing: its lease ends and the waiting b leads
        assert await flights.join("acme", "f", owner="b", lease_s=0.6, waiting=True) is True
        assert await flights.renew("acme", "f", owner="a", lease_s=0.6) is False
        await flights.publish("acme", "f", StoredResult({"stale": True}, None), owner="a", ttl_s=10)
        assert await flights.join("acme", "f", owner="c", lease_s=0.6, waiting=True) is False
        await flights.publish("acme", "f", StoredResult(BODY, Decimal("0.25")), owner="b", ttl_s=10)
        joined = await flights.join("acme", "f", owner="c", lease_s=0.6, waiting=True)
        assert joined == StoredResult(BODY, Decimal("0.25"))
    finally:
        await state.close()


async def test_a_key_claimed_locally_while_redis_is_away_is_renewed_in_the_local_file(tmp_path: Path) -> None:
    import socket

    from thrifty.errors import SharedStateUnavailable
    from thrifty.settings import SharedStateSettings
    from thrifty.stores.faults import LocalFallback
    from thrifty.stores.idempotency_degraded import DegradingIdempotencyStore
    from thrifty.stores.redis_idempotency import RedisIdempotencyStore
    from thrifty.stores.redis_state import RedisState

    with socket.socket() as s:  # a port nothing listens on: Redis is away
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = RedisState(SharedStateSettings(url=f"redis://127.0.0.1:{port}/0", fault_mode="degrade_local"))
    local = SqliteIdempotencyStore(tmp_path / "local.db", max_entries=100)
    store = DegradingIdempotencyStore(RedisIdempotencyStore(state), local, LocalFallback("idempotency keys"))
    await store.start()
    try:
        assert await store.claim(KEY, "fp", owner="a", now=100.0, lease_s=15) is None  # claimed locally
        assert await store.renew(KEY, owner="a", now=110.0, lease_s=15) is True
        running = await local.claim(KEY, "fp", owner="b", now=120.0, lease_s=15)
        assert running is not None and running.expires_at == 125.0  # the renewal is in the local file
        other = IdempotencyKey(
            "acme", "claimed-in-redis"
        )  # not claimed here: it goes to Redis, which is away
        with pytest.raises(SharedStateUnavailable):
            await store.renew(other, owner="a", now=110.0, lease_s=15)
    finally:
        await store.close()
        await state.close()
