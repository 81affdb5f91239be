"""The dashboard's rollups on PostgreSQL (real server, tests/services.py): folded behind a
transaction-id watermark, exact to the Decimal against a scan of the ledger and `thrifty report`,
whatever is folded, and never missing or doubling a row a slow transaction commits late."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.dashboard_helpers import ADMIN_KEY, get
from tests.services import pg_url, services  # noqa: F401 - fixtures
from tests.test_rollups import T0, varied_entries
from tests.test_user_totals import assert_rankings_exact, spread_entries
from thrifty.report import GROUP_COLUMNS
from thrifty.stores import postgres
from thrifty.stores.ledger import entry_row
from thrifty.stores.postgres_reporting import PostgresReportingStore
from thrifty.stores.reporting import Window
from thrifty.stores.rollups import HOUR
from thrifty.types import LedgerEntry

WINDOWS = [
    Window(),
    Window(since=T0 + 2 * HOUR),
    Window(since=T0 + HOUR, until=T0 + 4 * HOUR, tenant="acme"),
    Window(since=T0 - 86400, until=T0 + 86400, tenant="globex"),
]


def _migrated(url: str) -> None:
    conn = postgres.connect(url)
    try:
        postgres.migrate(conn)
    finally:
        conn.close()


def _insert(conn: psycopg.Connection, entries: list[LedgerEntry]) -> None:
    rows = [entry_row(e) for e in entries]
    conn.execute(postgres.insert_ledger_sql(len(rows)), [v for row in rows for v in row])


async def _assert_exact(store: PostgresReportingStore, windows: list[Window] = WINDOWS) -> None:
    for window in windows:
        for by in GROUP_COLUMNS:
            rolled = [r.to_json() for r in await store.rollup_by(by, window)]
            assert rolled == [r.to_json() for r in await store.spend_by(by, window)], (by, window)


async def test_rollups_equal_the_ledger_scan_unfolded_folded_and_in_between(pg_url: str):  # noqa: F811
    _migrated(pg_url)
    entries = varied_entries()
    store = PostgresReportingStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            _insert(conn, entries[:70])
            await _assert_exact(store)  # all from the ledger's tail
            assert await store.fold() == 70
            assert await store.fold() == 0
            _insert(conn, entries[70:])
            await _assert_exact(store)  # folded rows and the tail together
            assert await store.fold() == len(entries) - 70
            await _assert_exact(store)
            points = await store.rollup_series("tenant", "hour", Window())
            assert sum(p.row.requests for p in points) == len(entries)
            (acme,) = [r for r in await store.rollup_top("tenant", Window(), 5) if r.group == "acme"]
            assert acme.cost_usd == sum(
                (e.cost_usd for e in entries if e.tenant_id == "acme" and e.cost_usd is not None),
                start=acme.cost_usd * 0,
            )
            use = await store.budget_use(T0 // 86400 * 86400, tenant="acme", feature=None, route=None)
            assert use.usd == acme.cost_usd
            assert await store.rebuild_rollups() == len(entries)
            await _assert_exact(store, WINDOWS[:1])
    finally:
        await store.aclose()


async def test_a_transaction_committing_late_is_folded_once_not_lost(pg_url: str):  # noqa: F811
    """The attack on a sequence-like watermark: a writer that took its id first and commits last.
    The fold must not move past it while it is open, nor count it twice once it commits."""
    _migrated(pg_url)
    early, later = varied_entries(30)[:10], varied_entries(30)[10:]
    store = PostgresReportingStore(pg_url)
    try:
        slow = psycopg.connect(pg_url)  # a transaction, held open
        fast = psycopg.connect(pg_url, autocommit=True)
        _insert(slow, early)  # its txid is older than the rows committed next
        _insert(fast, later)
        assert await store.fold() == 0  # the open transaction holds the watermark below itself
        await _assert_exact(store, WINDOWS[:1])  # the committed rows are read from the tail
        slow.commit()
        assert await store.fold() == len(early) + len(later)
        await _assert_exact(store, WINDOWS[:2])
        assert await store.fold() == 0
        (row,) = await store.rollup_by("day", Window(until=T0 + 10 * HOUR)) or [None]
        assert row is not None
        slow.close()
        fast.close()
    finally:
        await store.aclose()


def test_the_gateway_dashboard_on_postgres_equals_thrifty_report(
    tmp_path: Path,
    openai_upstream,
    pg_url: str,  # noqa: F811
):
    import openai

    from thrifty.server.run import BackgroundServer
    from thrifty.stores.keys import hash_key

    settings = base_settings(
        tmp_path,
        storage={"url": pg_url, "spool_path": str(tmp_path / "spool.jsonl")},
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "K"}},
        models=openai_models(),
        dashboard={"admin_key_hashes": [hash_key(ADMIN_KEY)], "fold_interval_s": 0.2},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        for tenant, feature in (("acme", "f1"), ("acme", "f2"), ("globex", "f1"), ("acme", "f1")):
            client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-thrifty-feature": feature},
            )
        root = f"http://{server.host}:{server.port}"
        body = get(root + "/dashboard/api/summary", ADMIN_KEY, by="feature", range="24h").json()
        mine = get(root + "/dashboard/api/summary", KEYS["globex"], by="tenant", range="24h").json()
        page = get(root + "/dashboard/api/page", ADMIN_KEY, range="24h")
        assert page.status_code == 200 and len(page.json()["requests"]["requests"]) == 4
    config = tmp_path / "thrifty.yaml"
    minimal = {
        "storage": {"url": pg_url},
        "providers": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9"}},
    }
    config.write_text(yaml.safe_dump({**minimal, "models": {}}), encoding="utf-8")
    w = body["window"]
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "report", "--by", "feature", "--format", "json", "-c", str(config),
         "--since", w["since_iso"], "--until", w["until_iso"]],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert body["rows"] == json.loads(out.stdout)
    assert [(r["group"], r["requests"]) for r in body["rows"]] == [("f1", 3), ("f2", 1)]
    assert [(r["group"], r["requests"]) for r in mine["rows"]] == [("globex", 1)]  # its own tenant only


def test_migrations_leave_writers_nothing_to_do(pg_url: str):  # noqa: F811
    """A ledger row inserted without naming txid gets its transaction's id: what every writer of
    ledger rows (the ledger writer, a batch store, an import) relies on."""
    _migrated(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _insert(conn, varied_entries(2))
        ids = conn.execute("SELECT DISTINCT txid FROM ledger").fetchall()
        assert len(ids) == 1 and ids[0][0] > 0
    asyncio.run(_check_folded(pg_url))


async def _check_folded(url: str) -> None:
    store = PostgresReportingStore(url)
    try:
        assert await store.fold() == 2
    finally:
        await store.aclose()


async def test_the_request_explorer_pages_by_keyset_on_postgres(pg_url: str):  # noqa: F811
    from tests.factories import ledger_entry

    _migrated(pg_url)
    entries = [ledger_entry(f"r{i:02d}", ts=T0 + (0 if 5 <= i < 12 else i)) for i in range(20)]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _insert(conn, entries)
    store = PostgresReportingStore(pg_url)
    try:
        seen: list[str] = []
        before = None
        while True:
            page = await store.requests(Window(), limit=4, before=before)
            seen += [r["request_id"] for r in page]
            if len(page) < 4:
                break
            before = (page[-1]["ts"], page[-1]["request_id"])
        assert sorted(seen) == sorted(e.request_id for e in entries) and len(seen) == len(set(seen))
        (newest,) = await store.requests(Window(), limit=1)
        assert newest["cost_usd"] == "0.1" and isinstance(newest["attempts"], list)
    finally:
        await store.aclose()


def _user_totals(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(
        'SELECT k.tenant_id, k."user", c.bucket, c.requests, c.ok, c.cost_usd FROM ledger_user_cum AS c '
        "JOIN ledger_user_key AS k ON k.id = c.key"
    ).fetchall()
    return sorted((t or "", u or "", b, r, o, c) for t, u, b, r, o, c in rows)


async def test_user_rankings_on_postgres_are_exact_folded_late_and_after_the_migration(pg_url: str):  # noqa: F811
    """The running user totals: rankings equal the scan with the newer rows folded and older ones
    in the tail, after those are folded late (a key's later totals rewritten), after the migration
    builds them from the hourly user rollups, and after a rebuild."""
    _migrated(pg_url)
    entries = spread_entries()
    store = PostgresReportingStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            _insert(conn, entries[75:])
            await assert_rankings_exact(store)
            assert await store.fold() == 75
            _insert(conn, entries[:75])  # rows for hours before the users' last totals
            await assert_rankings_exact(store)
            assert await store.fold() == 75
            await assert_rankings_exact(store)
            folded = _user_totals(conn)
            with conn.transaction():
                conn.execute("DROP TABLE ledger_user_cum, ledger_user_key")
                conn.execute("DROP INDEX ledger_rollup_by_user")
                conn.execute("DELETE FROM schema_migrations WHERE version = 11")
            assert postgres.migrate(conn) == [11]
            assert _user_totals(conn) == folded
            await assert_rankings_exact(store)
            assert await store.rebuild_rollups() == len(entries)
            assert _user_totals(conn) == folded
    finally:
        await store.aclose()
