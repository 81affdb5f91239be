"""One conformance suite per port, run against every implementation: in-process, SQLite, Redis
and PostgreSQL (real servers, started by scripts/services.sh)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.factories import ledger_entry
from tests.services import ServiceDir
from thrifty.errors import BudgetExceeded, SharedStateUnavailable
from thrifty.guard.budgets import BudgetBook
from thrifty.report import build_report
from thrifty.settings import SharedStateSettings
from thrifty.stores import postgres
from thrifty.stores.ledger import LedgerWriter, entry_row
from thrifty.stores.ports import CounterKey, Limit, Reservation, ReserveOutcome, Scope, window_bounds
from thrifty.stores.readers import SqliteAlertStore, SqliteLedgerReader
from thrifty.stores.redis_state import RedisBudgets, RedisState
from thrifty.stores.sqlite_db import open_database
from thrifty.types import Usage

TENANT = Scope("tenant", "acme")
ORG = Scope("org", "")


class InProcessBudgets:
    """The in-process BudgetBook seen through the shared port's async shape, so one suite runs on both."""

    def __init__(self) -> None:
        self.book = BudgetBook()

    async def reserve(self, limits: Sequence[Limit], ts: float, usd: Decimal, tokens: int) -> ReserveOutcome:
        try:
            reservation = self.book.reserve(limits, ts, usd, tokens)
        except BudgetExceeded:
            left = [self.book.remaining(limit, ts) for limit in limits]
            need = [usd if limit.unit == "usd" else Decimal(tokens) for limit in limits]
            refused = next(i for i, (n, lft) in enumerate(zip(need, left, strict=True)) if n > lft)
            return ReserveOutcome(None, left, refused)
        return ReserveOutcome(reservation, [self.book.remaining(limit, ts) for limit in limits])

    async def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> list[Decimal]:
        self.book.settle(reservation, usd, tokens)
        return [self.book.spent.get(key, Decimal(0)) for key in reservation.keys]

    async def remaining(self, limits: Sequence[Limit], ts: float) -> list[Decimal]:
        return [self.book.remaining(limit, ts) for limit in limits]


@pytest.fixture(params=["in-process", "redis"])
async def budgets(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Any]:
    if request.param == "in-process":
        yield InProcessBudgets()
        return
    services: ServiceDir = request.getfixturevalue("services")
    state = RedisState(SharedStateSettings(url=services.redis_url, prefix=redis_prefix))
    yield RedisBudgets(state)
    await state.close()


def usd(amount: str, scope: Scope = TENANT, window: str = "day") -> Limit:
    return Limit(scope, window, "usd", Decimal(amount))  # type: ignore[arg-type]


async def test_reserve_is_all_or_nothing_across_limits(budgets: Any):
    now = time.time()
    limits = [usd("10", ORG), usd("1", TENANT, "month")]
    refused = await budgets.reserve(limits, now, Decimal("2"), 5)
    assert refused.reservation is None and refused.refused == 1
    # Nothing was held on the limit that had room.
    assert await budgets.remaining(limits, now) == [Decimal("10"), Decimal("1")]
    granted = await budgets.reserve(limits, now, Decimal("0.75"), 5)
    assert granted.reservation is not None and granted.left == [Decimal("9.25"), Decimal("0.25")]


async def test_settle_replaces_the_reservation_to_the_exact_decimal(budgets: Any):
    now = time.time()
    limits = [usd("0.01"), Limit(TENANT, "day", "tokens", Decimal(1000))]
    outcome = await budgets.reserve(limits, now, Decimal("0.0000225"), 150)
    assert outcome.left == [Decimal("0.0099775"), Decimal(850)]
    spent = await budgets.settle(outcome.reservation, Decimal("0.000001875"), 40)
    assert spent == [Decimal("0.000001875"), Decimal(40)]
    assert await budgets.remaining(limits, now) == [Decimal("0.009998125"), Decimal(960)]


async def test_a_retried_settle_counts_once(budgets: Any):
    now = time.time()
    limits = [usd("1")]
    outcome = await budgets.reserve(limits, now, Decimal("0.5"), 1)
    await budgets.settle(outcome.reservation, Decimal("0.25"), 1)
    await budgets.settle(outcome.reservation, Decimal("0.25"), 1)
    assert await budgets.remaining(limits, now) == [Decimal("0.75")]


async def test_redis_settle_is_idempotent_by_its_id_not_by_the_callers_memory(
    services: ServiceDir, redis_prefix: str
):
    state = RedisState(SharedStateSettings(url=services.redis_url, prefix=redis_prefix))
    store = RedisBudgets(state)
    try:
        now = time.time()
        outcome = await store.reserve([usd("1")], now, Decimal("0.5"), 1)
        assert outcome.reservation is not None
        await store.settle(outcome.reservation, Decimal("0.25"), 1)
        # The reply was lost, so the replica retries with what it knows: the reservation's id.
        retry = dataclasses.replace(outcome.reservation, settled=False)
        assert await store.settle(retry, Decimal("0.25"), 1) == [Decimal("0.25")]
        assert await store.remaining([usd("1")], now) == [Decimal("0.75")]
    finally:
        await state.close()


async def test_concurrent_reserves_never_take_more_than_the_limit(budgets: Any):
    now = time.time()
    limits = [usd("10"), usd("100", ORG, "month")]
    outcomes = await asyncio.gather(*(budgets.reserve(limits, now, Decimal("1"), 1) for _ in range(64)))
    granted = [o for o in outcomes if o.reservation is not None]
    assert len(granted) == 10
    assert await budgets.remaining(limits, now) == [Decimal(0), Decimal(90)]


async def test_windows_are_separate_counters(budgets: Any):
    today = time.time()
    yesterday = window_bounds(today, "day")[0] - 60
    limits = [usd("1")]
    first = await budgets.reserve(limits, yesterday, Decimal("1"), 1)
    await budgets.settle(first.reservation, Decimal("1"), 1)
    assert (await budgets.reserve(limits, today, Decimal("1"), 1)).reservation is not None


async def test_a_reservation_whose_replica_died_is_released_after_its_lease(
    services: ServiceDir, redis_prefix: str
):
    state = RedisState(
        SharedStateSettings(url=services.redis_url, prefix=redis_prefix, reservation_lease_s=0.3)
    )
    store = RedisBudgets(state)
    try:
        now = time.time()
        limits = [usd("1")]
        assert (await store.reserve(limits, now, Decimal("1"), 1)).reservation is not None  # never settled
        assert (await store.reserve(limits, now, Decimal("1"), 1)).refused == 0
        await asyncio.sleep(0.4)
        again = await store.reserve(limits, now, Decimal("1"), 1)
        assert again.reservation is not None and again.left == [Decimal(0)]
        # A settle arriving after its lease ran out still counts the spend, once.
        late = await store.reserve([usd("5", ORG)], now, Decimal("2"), 1)
        await asyncio.sleep(0.4)
        assert await store.settle(late.reservation, Decimal("1.5"), 1) == [Decimal("1.5")]
        assert await store.remaining([usd("5", ORG)], now) == [Decimal("3.5")]
    finally:
        await state.close()


async def test_a_hold_with_its_own_lease_outlives_the_stores_lease(services: ServiceDir, redis_prefix: str):
    # A batch item's hold lasts its provider's window, not the real-time lease: a day-long batch
    # keeps its worst case held on every replica until its result is settled.
    state = RedisState(
        SharedStateSettings(url=services.redis_url, prefix=redis_prefix, reservation_lease_s=0.3)
    )
    store = RedisBudgets(state)
    try:
        now = time.time()
        limits = [usd("2")]
        held = await store.reserve(limits, now, Decimal("1"), 1, reservation_id="batch-item", lease_s=3600)
        assert held.reservation is not None
        assert (await store.reserve(limits, now, Decimal("1"), 1)).reservation is not None  # lease 0.3 s
        await asyncio.sleep(0.4)
        # The short hold is let go (at the next reserve), the batch hold stays: 1 of 2 left.
        assert (await store.reserve(limits, now, Decimal("1.5"), 1)).refused == 0
        again = await store.reserve(limits, now, Decimal("1"), 1)
        assert again.reservation is not None and again.left == [Decimal(0)]
        await store.settle(again.reservation, Decimal(0), 0)
        assert await store.settle(held.reservation, Decimal("0.5"), 1) == [Decimal("0.5")]
        assert await store.remaining(limits, now) == [Decimal("1.5")]
    finally:
        await state.close()


async def test_admission_and_reservation_in_one_script_reserve_nothing_for_a_refused_request(
    services: ServiceDir, redis_prefix: str
):
    from thrifty.stores.ports import AdmitRequest

    state = RedisState(SharedStateSettings(url=services.redis_url, prefix=redis_prefix))
    store = RedisBudgets(state)
    try:
        now = time.time()
        limits = [usd("1")]
        admit = AdmitRequest("acme", 2, None, 0, None)
        first = [await store.reserve(limits, now, Decimal("0.1"), 1, admit=admit) for _ in range(3)]
        assert [o.admission.refused if o.admission else "?" for o in first] == [None, None, "requests"]
        assert first[2].reservation is None and first[2].admission is not None
        assert 59 < first[2].admission.wait_s <= 60
        # Only the two admitted requests hold budget.
        assert await store.remaining(limits, now) == [Decimal("0.8")]
        # A budget refusal still uses a rate slot, as with two separate calls (the window is shared).
        steps = AdmitRequest("acme", None, None, 0, ("route:s1", 5))
        over = await store.reserve(limits, now, Decimal("5"), 1, admit=steps)
        assert over.admission is not None and over.admission.refused is None and over.refused == 0
        assert over.left == [Decimal("0.8")]
    finally:
        await state.close()


async def test_redis_rate_admission_is_all_or_nothing_and_holds_under_concurrency(
    services: ServiceDir, redis_prefix: str
):
    # The in-process windows live in the rate stage itself (test_rate_limits.py); this is the shared
    # store's contract: the same answers, atomically across callers.
    from thrifty.stores.ports import AdmitRequest
    from thrifty.stores.redis_state import RedisRates

    state = RedisState(SharedStateSettings(url=services.redis_url, prefix=redis_prefix))
    rates = RedisRates(state)
    try:
        racing = await asyncio.gather(
            *(rates.admit(AdmitRequest("acme", 5, None, 0, None)) for _ in range(20))
        )
        refused = [a for a in racing if a.refused is not None]
        assert len(refused) == 15 and {a.refused for a in refused} == {"requests"}
        assert all(a.used == 5 and 0 < a.wait_s <= 60 for a in refused)
        # Tokens: a request that does not fit is refused whole (its request is not counted either).
        first = await rates.admit(AdmitRequest("globex", 3, 100, 60, None))
        too_many = await rates.admit(AdmitRequest("globex", 3, 100, 60, None))
        fits = await rates.admit(AdmitRequest("globex", 3, 100, 40, None))
        assert (first.refused, too_many.refused, too_many.used, fits.refused) == (None, "tokens", 60, None)
        assert (await rates.admit(AdmitRequest("globex", 3, None, 0, None))).refused is None  # 3rd request
        assert (await rates.admit(AdmitRequest("globex", 3, None, 0, None))).refused == "requests"
        # Session steps: the step limit counts admitted steps only.
        steps = [await rates.admit(AdmitRequest("initech", None, None, 0, ("run-1", 2))) for _ in range(3)]
        assert [a.refused for a in steps] == [None, None, "steps"] and steps[2].used == 2
    finally:
        await state.close()


async def test_counters_are_rebuilt_once_per_window_across_replicas(services: ServiceDir, redis_prefix: str):
    settings = SharedStateSettings(url=services.redis_url, prefix=redis_prefix)
    replicas = [RedisState(settings) for _ in range(3)]
    now = time.time()
    month = window_bounds(now, "month")[0]
    key: CounterKey = (TENANT, "month", month, "usd")
    loads = 0

    async def load() -> dict[CounterKey, Decimal]:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)  # the ledger query takes a while; the others must wait, not add
        return {key: Decimal("2.000000000001")}

    try:
        done = await asyncio.gather(*(RedisBudgets(r).rebuild_once(month, load) for r in replicas))
        assert sorted(done) == [False, False, True] and loads == 1
        assert await RedisBudgets(replicas[0]).remaining([usd("5", TENANT, "month")], now) == [
            Decimal("2.999999999999")
        ]
        assert await RedisBudgets(replicas[1]).rebuild_once(month, load) is False and loads == 1
    finally:
        for r in replicas:
            await r.close()


async def test_an_unreachable_redis_is_a_clear_error(private_redis: ServiceDir, redis_prefix: str):
    state = RedisState(SharedStateSettings(url=private_redis.redis_url, prefix=redis_prefix, timeout_s=0.3))
    store = RedisBudgets(state)
    try:
        assert (await store.reserve([usd("1")], time.time(), Decimal("0.5"), 1)).reservation is not None
        private_redis.stop("redis")
        with pytest.raises(SharedStateUnavailable, match=r"Redis at redis://127\.0\.0\.1"):
            await store.reserve([usd("1")], time.time(), Decimal("0.1"), 1)
    finally:
        await state.close()


# -- the ledger, reports, keys, alerts and exact cache: SQLite and PostgreSQL -------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("pg_url")
    conn = postgres.connect(url)
    postgres.migrate(conn)
    conn.close()
    return url


def _writer(url: str, tmp_path: Path) -> Any:
    if url.startswith("sqlite"):
        return LedgerWriter(Path(url.removeprefix("sqlite:///")))
    return postgres.PostgresLedgerWriter(url, tmp_path / "spool.jsonl")


def _reader(url: str) -> Any:
    if url.startswith("sqlite"):
        return SqliteLedgerReader(open_database(Path(url.removeprefix("sqlite:///"))))
    return postgres.PostgresLedgerReader(url)


async def _close(writer: Any) -> None:
    if isinstance(writer, LedgerWriter):
        writer.close()
    else:
        await writer.aclose()


async def test_ledger_commits_before_release_and_reports_the_same(backend: str, tmp_path: Path):
    writer = _writer(backend, tmp_path)
    writer.start(asyncio.get_running_loop())
    try:
        costs = ["0.0000225", "0.000001875", "1.1", "0.3333333333333"]
        entries = [
            ledger_entry(f"req_{i:04d}", tenant=("acme", "globex")[i % 2], cost=costs[i % 4], feature="f")
            for i in range(200)
        ]
        # The context stage's record is in the ledger too, and in the report, on both backends.
        entries[1] = dataclasses.replace(entries[1], context={"saved": 120, "finish_reason": "length"})
        await asyncio.gather(*(writer.submit(e) for e in entries))
        reader = _reader(backend)
        assert len(list(reader.report_rows("tenant_id", None))) == 200  # committed, read elsewhere
        await writer.submit(entries[0])  # a repeat of a written row is not a second row
        rows = {r.group: r for r in build_report(reader, "tenant")}
        reader.close()
    finally:
        await _close(writer)
    assert rows["acme"].requests == 100 and rows["globex"].requests == 100
    assert (rows["globex"].context_tokens_saved, rows["globex"].length_cutoffs) == (120, 1)
    assert rows["acme"].cost_usd == 50 * Decimal("0.0000225") + 50 * Decimal("1.1")
    assert rows["globex"].cost_usd == 50 * Decimal("0.000001875") + 50 * Decimal("0.3333333333333")


async def test_every_ledger_column_reads_back_as_written_on_postgres(pg_url: str, tmp_path: Path):
    """The writer sends values as text through libpq: money, floats, JSON and text must come back
    exactly (numeric, double precision, jsonb), including NULLs and non-ASCII, in a one-row batch
    (prepared) and in a batch too large to prepare."""
    conn = postgres.connect(pg_url)
    postgres.migrate(conn)
    writer = postgres.PostgresLedgerWriter(pg_url, tmp_path / "spool.jsonl")
    writer.start(asyncio.get_running_loop())
    full = dataclasses.replace(
        ledger_entry(
            "req_full", ts=1764633600.123456789, cost="0.000000000001", failed_attempt_costs=("0.5",)
        ),
        user="zoë",
        route="faq",
        saved_usd=Decimal("123.456789012345"),
        error="quota \"exceeded\" — 'retry' later\n",
        latency_ms=0.1 + 0.2,
        ttft_ms=None,
        idempotency_key="k;1",
        context={"saved": 7, "note": "ünïcode", "nested": [1, 2.5, None]},
        variant="b",
    )
    try:
        await writer.submit(full)
        await asyncio.gather(*(writer.submit(ledger_entry(f"req_{i:03d}")) for i in range(100)))
    finally:
        await writer.aclose()
    names = [c.strip('"') for c in postgres.LEDGER_COLUMNS]
    row = conn.execute(
        f"SELECT {', '.join(postgres.LEDGER_COLUMNS)} FROM ledger WHERE request_id = 'req_full'"
    ).fetchone()
    got = dict(zip(names, row, strict=True))
    want = dict(zip(names, entry_row(full), strict=True))
    assert got.pop("attempts") == orjson.loads(want.pop("attempts"))
    assert got.pop("context") == full.context
    want.pop("context")
    for money in ("cost_usd", "saved_usd", "retry_cost_usd"):
        assert got.pop(money) == Decimal(want.pop(money))
    assert got == want  # ts and latency_ms exact as doubles; text, ints and NULLs as sent
    assert conn.execute("SELECT count(*) FROM ledger").fetchone()[0] == 101
    conn.close()


def _keys(url: str) -> tuple[Any, Any]:
    if url.startswith("sqlite"):
        from thrifty.stores.keys import SqliteKeyStore

        conn = open_database(Path(url.removeprefix("sqlite:///")))
        return SqliteKeyStore(conn), conn
    conn = postgres.connect(url)
    return postgres.PostgresKeys(conn), conn


def test_keys_create_look_up_and_revoke(backend: str):
    from thrifty.stores.keys import hash_key

    store, conn = _keys(backend)
    try:
        key = store.create("acme", "ci")
        assert store.tenant_for_hash(hash_key(key)) == "acme"
        ((prefix, tenant, label, _, revoked),) = store.list()
        assert (tenant, label, revoked) == ("acme", "ci", None)
        assert store.revoke(prefix) == 1 and store.tenant_for_hash(hash_key(key)) is None
        assert store.revoke(prefix) == 0
    finally:
        conn.close()


async def test_an_alert_is_stored_once_per_key(backend: str):
    if backend.startswith("sqlite"):
        conn = open_database(Path(backend.removeprefix("sqlite:///")))
        local = SqliteAlertStore(conn)
        results = [local.insert_once("k1", 1.0, "budget", "tenant:acme", "m", "{}") for _ in range(3)]
        conn.close()
    else:
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(backend, kwargs={"autocommit": True}) as pool:
            # Three replicas racing to store the same alert: the primary key lets one through.
            stores = [postgres.PostgresAlertStore(pool) for _ in range(3)]
            results = await asyncio.gather(
                *(s.insert_once("k1", 1.0, "budget", "tenant:acme", "m", "{}") for s in stores)
            )
    assert sorted(results) == [False, False, True]
    reader = _reader(backend)
    assert len(reader.alerts_since(0)) == 1
    reader.close()


async def test_postgres_exact_cache_entries_expire_and_are_shared(pg_url: str):
    # SQLite's exact cache (the same get/put) is covered end to end in test_exact_cache.py.
    from psycopg_pool import AsyncConnectionPool

    conn = postgres.connect(pg_url)
    postgres.migrate(conn)
    conn.close()
    response = {"id": "x", "choices": [{"message": {"content": "hi"}}]}
    usage = Usage(input_tokens=3, output_tokens=1)
    async with AsyncConnectionPool(pg_url, kwargs={"autocommit": True}) as pool:
        writer, other = postgres.PostgresExactCache(pool), postgres.PostgresExactCache(pool)
        scope = {
            "tenant_id": "acme",
            "route": "r",
            "prompt_version": None,
            "corpus_version": None,
            "model": "m",
        }
        await writer.put("k", scope, response, usage, ttl_s=0.3, made_at=time.time())
        assert await other.get("k", time.time()) == (response, usage)
        assert await other.get("k", time.time() + 1) is None


async def test_ledger_rows_are_spooled_while_postgres_is_away_and_replayed_once(tmp_path: Path):
    service = ServiceDir.start("postgres")
    try:
        url = service.postgres_url
        conn = postgres.connect(url)
        postgres.migrate(conn)
        conn.close()
        writer = postgres.PostgresLedgerWriter(url, tmp_path / "spool.jsonl")
        writer.start(asyncio.get_running_loop())
        await asyncio.gather(*(writer.submit(ledger_entry(f"a{i}")) for i in range(20)))
        service.stop("postgres")
        # Released (the rows are fsynced in the spool), although the database is down.
        await asyncio.wait_for(asyncio.gather(*(writer.submit(ledger_entry(f"b{i}")) for i in range(30))), 10)
        assert writer.spooled == 30 and writer.spool_depth == 30  # the depth /metrics shows
        # A process started on the same spool counts what waits in it.
        other = postgres.PostgresLedgerWriter(url, tmp_path / "spool.jsonl")
        other.start(asyncio.get_running_loop())
        assert other.spool_depth == 30
        await other.aclose()
        service.run("start", "postgres")
        deadline = time.monotonic() + 15
        while (tmp_path / "spool.jsonl").exists() or (tmp_path / "spool.jsonl.replaying").exists():
            assert time.monotonic() < deadline, "the spool was not replayed"
            await asyncio.sleep(0.1)
        assert writer.spool_depth == 0
        await writer.replay()  # nothing left; a second replay writes nothing twice
        await asyncio.gather(*(writer.submit(ledger_entry(f"c{i}")) for i in range(5)))
        await writer.aclose()
        reader = postgres.PostgresLedgerReader(url)
        ids = [row[0] for row in reader._conn.execute("SELECT request_id FROM ledger")]
        reader.close()
        assert len(ids) == len(set(ids)) == 55
    finally:
        service.remove()


async def test_usage_rows_read_the_same_requests_and_attempts(backend: str, tmp_path: Path):
    """What `thrifty estimate --from-ledger` and `thrifty reconcile` read, on every backend."""
    from thrifty.planning.ledger_usage import attempts_of, summarise

    writer = _writer(backend, tmp_path)
    writer.start(asyncio.get_running_loop())
    try:
        base = 1_790_000_000.0
        entries = [
            ledger_entry("u1", ts=base, feature="f", cost="0.25", failed_attempt_costs=("0.125",)),
            ledger_entry("u2", ts=base + 10, feature="f", cost=None),
            ledger_entry("u3", ts=base + 20, feature="g", cost="1"),
            ledger_entry("u4", ts=base + 30, feature="f", cost="9"),  # at `until`: not read
        ]
        await asyncio.gather(*(writer.submit(e) for e in entries))
        reader = _reader(backend)
        rows = list(reader.usage_rows(base, base + 30, "f"))
        every = list(reader.usage_rows(base, base + 30))
        reader.close()
    finally:
        await _close(writer)
    assert [r[0] for r in rows] == [base, base + 10] and len(every) == 3
    usage = summarise(rows)
    assert (usage.requests, usage.unpriced, usage.cost_usd, usage.retries) == (2, 1, Decimal("0.375"), 1)
    attempts = attempts_of(rows[0][-1])
    assert [(a["status"], a["cost_usd"]) for a in attempts] == [(500, "0.125"), (200, "0.25")]


# -- semantic-cache entries: SQLite and PostgreSQL ------------------------------------------------


class SqliteSemantic:
    """The SQLite semantic store seen through the shared port's async shape, so one suite runs on both."""

    def __init__(self, path: Path) -> None:
        from thrifty.cache.semantic.store import SqliteSemanticStore

        self.conn = open_database(path)
        self.store = SqliteSemanticStore(self.conn)

    async def add(self, entry: Any) -> int | None:
        return self.store.add(entry)

    async def answer(self, entry_id: int, now: float) -> Any:
        return self.store.answer(entry_id, now)

    async def live(self, now: float, embedding_model: str) -> AsyncIterator[Any]:
        for entry in self.store.live(now, embedding_model):
            yield entry

    async def delete(self, entry_ids: list[int]) -> None:
        self.store.delete(entry_ids)

    async def drop_expired(self, now: float) -> None:
        self.store.drop_expired(now)

    async def close(self) -> None:
        self.conn.close()


def semantic_entry(query: str, *, tenant: str = "acme", seed: int = 0, ttl_s: float = 600, **kw: Any) -> Any:
    import numpy as np

    from thrifty.cache.semantic.store import NewEntry

    vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    now = time.time()
    values: dict[str, Any] = {
        "partition": f"p-{tenant}",
        "tenant_id": tenant,
        "route": "support",
        "user": None,
        "prompt_version": "v1",
        "corpus_version": None,
        "model": "gpt-4o-mini",
        "system_hash": "s",
        "query": query,
        "normalised_query": query.lower(),
        "embedding_model": "minilm",
        "embedding": vector / np.linalg.norm(vector),
        "answer_id": f"text:{query}",
        "response": {"id": "c1", "choices": [{"message": {"role": "assistant", "content": f"re: {query}"}}]},
        "evidence": (),
        "safety_policy_version": "1",
        "usage": Usage(input_tokens=42, cached_input_tokens=2, output_tokens=9),
        "created_at": now,
        "expires_at": now + ttl_s,
    }
    values.update(kw)
    return NewEntry(**values)


def _pg_semantic(pool: Any, url: str) -> Any:
    from thrifty.stores.postgres_semantic import PostgresSemanticStore

    return PostgresSemanticStore(pool, url)


@pytest.fixture(params=["sqlite", "postgresql"])
async def semantic(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        store = SqliteSemantic(tmp_path / "cache.db")
        yield store
        await store.close()
        return
    from psycopg_pool import AsyncConnectionPool

    url: str = request.getfixturevalue("pg_url")
    conn = postgres.connect(url)
    postgres.migrate(conn)
    conn.close()
    async with AsyncConnectionPool(url, kwargs={"autocommit": True}) as pool:
        store = _pg_semantic(pool, url)
        yield store
        await store.close()


async def test_a_semantic_entry_is_stored_with_its_vector_and_answered_until_it_expires(semantic: Any):
    import numpy as np

    entry = semantic_entry("When are you open?")
    entry_id = await semantic.add(entry)
    short = await semantic.add(semantic_entry("Where are you?", seed=1, ttl_s=0.2))
    other_model = await semantic.add(semantic_entry("Old model", seed=2, embedding_model="old"))
    assert entry_id is not None and short is not None and other_model is not None
    assert len({entry_id, short, other_model}) == 3
    now = time.time()
    assert await semantic.answer(entry_id, now) == (entry.response, entry.usage)
    live = [e async for e in semantic.live(now, "minilm")]
    assert [e.entry_id for e in live] == [entry_id, short]  # oldest first, this embedding model only
    first = live[0]
    assert (first.partition, first.route, first.query, first.normalised_query, first.answer_id) == (
        "p-acme",
        "support",
        "When are you open?",
        "when are you open?",
        "text:When are you open?",
    )
    assert first.expires_at == entry.expires_at and np.array_equal(first.embedding, entry.embedding)
    later = now + 1
    assert await semantic.answer(short, later) is None
    assert [e.entry_id for e in [e async for e in semantic.live(later, "minilm")]] == [entry_id]
    await semantic.drop_expired(later)
    await semantic.delete([entry_id])
    assert await semantic.answer(entry_id, now) is None
    assert [e.entry_id async for e in semantic.live(0, "minilm")] == []


async def test_a_semantic_purge_by_tenant_leaves_the_other_tenants_entries(backend: str, tmp_path: Path):
    from thrifty.settings import StorageSettings
    from thrifty.stores.factory import purge_caches

    storage = StorageSettings(url=backend, local_path=str(tmp_path / "local.db"))
    if backend.startswith("sqlite"):
        store: Any = SqliteSemantic(storage.sqlite_path)
        pool = None
    else:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(backend, kwargs={"autocommit": True}, open=False)
        await pool.open()
        store = _pg_semantic(pool, backend)
    try:
        kept = await store.add(semantic_entry("q", tenant="globex"))
        gone = await store.add(semantic_entry("q", tenant="acme", seed=1))
        scope = {"tenant": "acme", "route": None, "prompt_version": None, "corpus_version": None}
        assert await asyncio.to_thread(purge_caches, storage, scope, None) == (0, 1)
        assert await store.answer(gone, time.time()) is None
        assert await store.answer(kept, time.time()) is not None
    finally:
        await store.close()
        if pool is not None:
            await pool.close()


async def test_postgres_replicas_hear_each_others_semantic_entries_also_after_a_lost_connection(pg_url: str):
    from psycopg_pool import AsyncConnectionPool

    conn = postgres.connect(pg_url)
    postgres.migrate(conn)
    conn.close()
    async with AsyncConnectionPool(pg_url, kwargs={"autocommit": True}) as pool:
        a, b = _pg_semantic(pool, pg_url), _pg_semantic(pool, pg_url)
        heard: dict[str, list[int]] = {"a": [], "b": []}
        arrived = asyncio.Event()

        def on(name: str) -> Any:
            def record(entries: list[Any]) -> None:
                heard[name] += [e.entry_id for e in entries]
                arrived.set()

            return record

        before = await a.add(semantic_entry("before anyone listened"))
        for store, name in ((a, "a"), (b, "b")):
            await store.listen()
            assert [e.entry_id async for e in store.live(time.time(), "minilm")] == [before]
            store.follow(on(name))
        try:
            one = await a.add(semantic_entry("one", seed=1))
            await asyncio.wait_for(arrived.wait(), 5)
            assert heard == {"a": [], "b": [one]}  # a replica is not told of its own entries
            # b's listening connection dies; what a adds meanwhile still reaches b, once it is back.
            with postgres.connect(pg_url) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (b._listener.info.backend_pid,))
            two = await a.add(semantic_entry("two", seed=2))
            deadline = time.monotonic() + 10
            while two not in heard["b"]:
                assert time.monotonic() < deadline, "b never caught up with what it missed"
                await asyncio.sleep(0.05)
            assert heard["a"] == []
        finally:
            await a.close()
            await b.close()
