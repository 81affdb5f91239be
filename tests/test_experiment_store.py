"""The experiment store port and the ledger reads the CLI commands use, one suite on SQLite and on
PostgreSQL (real, started by scripts/services.sh): feedback is one row per request even when two
replicas store it at the same moment, another tenant's request is answered as an unknown one,
the arms, the action log and release plans round-trip, and `route_requests` / `costs` (prompt
lint's traffic, the batch eval's prices) read the same on both."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.backends import pg_url, query, services, storage  # noqa: F401 - fixtures
from tests.conftest import base_settings
from tests.factories import ledger_entry
from thrifty.errors import SharedStateUnavailable
from thrifty.experiments.feedback import FeedbackService, UnknownRequest
from thrifty.experiments.store import ExperimentStore, Feedback
from thrifty.settings import Settings
from thrifty.stores import postgres
from thrifty.stores.factory import open_experiment_store, open_reader
from thrifty.stores.ledger import LedgerWriter
from thrifty.types import LedgerEntry


def settings_for(tmp_path: Path, section: dict[str, Any]) -> Settings:
    return base_settings(
        tmp_path,
        storage=section,
        providers={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9"}},
        models={},
    )


async def write(settings: Settings, tmp_path: Path, entries: list[LedgerEntry]) -> None:
    """Rows through the backend's own ledger writer (committed before `submit` returns)."""
    writer: Any
    if settings.storage.backend == "sqlite":
        writer = LedgerWriter(settings.storage.sqlite_path)
    else:
        conn = postgres.connect(settings.storage.url)
        postgres.migrate(conn)
        conn.close()
        writer = postgres.PostgresLedgerWriter(settings.storage.url, tmp_path / "spool.jsonl")
    writer.start(asyncio.get_running_loop())
    try:
        await asyncio.gather(*(writer.submit(e) for e in entries))
    finally:
        if isinstance(writer, LedgerWriter):
            writer.close()
        else:
            await writer.aclose()


def routed(request_id: str, tenant: str, variant: str | None, cost: str | None, **kw: Any) -> LedgerEntry:
    entry = ledger_entry(request_id, tenant=tenant, cost=cost, **kw)
    return dataclasses.replace(entry, route="support", variant=variant)


def feedback(request_id: str, **kw: Any) -> Feedback:
    return Feedback(request_id, "acme", time.time(), "support", "a", "m", "miss", **kw)


async def test_feedback_once_per_request_tenants_apart_and_the_variant_rows(
    tmp_path: Path,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    settings = settings_for(tmp_path, storage)
    costs = ["0.000000125", "1.1", None, "0.3333333333333"]
    entries = [routed(f"req_{i}", "acme", "ab"[i % 2], costs[i % 4]) for i in range(8)]
    entries.append(routed("req_globex", "globex", "a", "0.5"))
    entries.append(dataclasses.replace(ledger_entry("req_plain", tenant="acme"), route="support"))
    await write(settings, tmp_path, entries)
    store = open_experiment_store(settings)
    try:
        service = FeedbackService(store)
        # Another tenant's request and an unknown id: the same error, nothing stored.
        with pytest.raises(UnknownRequest) as theirs:
            await service.record("acme", {"request_id": "req_globex", "correct": True})
        with pytest.raises(UnknownRequest) as unknown:
            await service.record("acme", {"request_id": "req_nope", "correct": True})
        assert (
            (theirs.value.status, theirs.value.code)
            == (unknown.value.status, unknown.value.code)
            == (
                404,
                "request_not_found",
            )
        )
        assert store.feedback_count() == 0
        fb, stored = await service.record("acme", {"request_id": "req_1", "score": 0.25, "label": "bad"})
        assert stored == "new" and (fb.variant, fb.route, fb.cache) == ("b", "support", "miss")
        assert (await service.record("acme", {"request_id": "req_1", "score": 0.25, "label": "bad"}))[
            1
        ] == "same"
        assert (await service.record("acme", {"request_id": "req_1", "correct": False}))[1] == "changed"
        assert query(settings, "SELECT request_id, score, label, correct FROM feedback") == [
            ("req_1", None, None, 0)
        ]
        # The variant rows: every routed request with a variant, oldest first, its exact cost
        # as decimal text and its feedback; the request without a variant is left out.
        rows = store.variant_rows("support")
        assert [r.variant for r in rows] == [*("ab" * 4), "a"]
        assert [r.cost_usd for r in rows[:4]] == costs
        priced = sum((Decimal(c) for c in costs if c is not None), Decimal(0))
        assert sum((Decimal(r.cost_usd) for r in rows if r.cost_usd), Decimal(0)) == 2 * priced + Decimal(
            "0.5"
        )
        assert [(r.correct, r.score) for r in rows if r.correct is not None] == [(False, None)]
        assert store.variant_rows("support", since=time.time() + 60) == []
        assert store.variant_rows("other") == []
    finally:
        store.close()


async def test_the_same_feedback_from_two_replicas_at_once_is_one_new_row(
    tmp_path: Path,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    settings = settings_for(tmp_path, storage)
    await write(settings, tmp_path, [routed(f"req_{i}", "acme", "a", "0.1") for i in range(3)])
    replicas = [open_experiment_store(settings), open_experiment_store(settings)]
    try:
        for rid in ("req_0", "req_1", "req_2"):
            start = threading.Barrier(8)
            outcomes: list[str] = []

            def post(store: ExperimentStore, rid: str, start: threading.Barrier, out: list[str]) -> None:
                start.wait()
                out.append(store.put_feedback(feedback(rid, correct=True)))

            threads = [
                threading.Thread(target=post, args=(replicas[i % 2], rid, start, outcomes)) for i in range(8)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == ["new"] + ["same"] * 7, (rid, outcomes)
        assert replicas[0].feedback_count() == replicas[1].feedback_count() == 3
    finally:
        for store in replicas:
            store.close()


def test_arms_actions_and_releases_round_trip_in_order(
    tmp_path: Path,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    settings = settings_for(tmp_path, storage)
    store = open_experiment_store(settings)
    other = open_experiment_store(settings)  # a second replica (or the CLI) sees what one wrote
    try:
        assert store.states() == {} and store.state("support") is None and store.release("support") is None
        # Arms keep the order they were written in (the candidate arm after the baseline).
        arms = {"baseline": "z", "weights": {"z": 0.9, "candidate": 0.1}, "models": {"candidate": "m"}}
        plan = {"route": "support", "status": "in_progress", "steps": [{"name": "golden_eval"}]}
        store.record("support", "release_plan", "planned", variant="candidate", release=plan)
        store.record("support", "canary", "canary at 10%", state=arms, details={"n": 1})
        store.record("other", "stop", "manual", variant="b", state={"baseline": "a", "weights": {"a": 1.0}})
        assert list(other.state("support")["weights"]) == ["z", "candidate"]  # type: ignore[index]
        assert other.states() == {"support": arms, "other": {"baseline": "a", "weights": {"a": 1.0}}}
        assert other.release("support") == plan
        log = other.actions("support")
        assert [(a.action, a.variant, a.reason, a.details) for a in log] == [
            ("release_plan", "candidate", "planned", None),
            ("canary", None, "canary at 10%", {"n": 1}),
        ]
        assert log[0].ts <= log[1].ts
        store.record("support", "rollback", "manual", clear_release=True)
        assert other.release("support") is None and other.state("support") == arms
        assert [a.action for a in other.actions("support")][-1] == "rollback"
    finally:
        store.close()
        other.close()


async def test_route_requests_and_costs_read_the_same_on_both(
    tmp_path: Path,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    settings = settings_for(tmp_path, storage)
    now = time.time()
    entries = [
        routed(f"req_{i:04d}", "acme", None, "0.0000225" if i % 7 else None, prompt_version=f"v{i % 2}")
        for i in range(620)  # more ids than one statement of `costs` takes
    ]
    entries.append(dataclasses.replace(ledger_entry("req_old", ts=now - 10 * 86400), route="support"))
    entries.append(ledger_entry("req_elsewhere"))
    await write(settings, tmp_path, entries)
    reader = open_reader(settings, existing=True)
    try:
        assert reader.route_requests("support", now - 86400) == 620
        assert reader.route_requests("support", now - 30 * 86400) == 621
        assert reader.route_requests("support", now - 86400, "v1") == 310
        assert reader.route_requests("nope", 0) == 0
        ids = [e.request_id for e in entries[:620]] + ["req_unknown"]
        found = reader.costs(ids)
        assert len(found) == 620 and "req_unknown" not in found
        assert found["req_0000"] is None and found["req_0001"] == "0.0000225"
        assert reader.costs([]) == {}
    finally:
        reader.close()


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, {"url": "postgresql://thrifty@127.0.0.1:1/none"})
    with pytest.raises(SharedStateUnavailable, match=r"PostgreSQL at 127\.0\.0\.1:1/none"):
        open_experiment_store(settings)


def test_a_missing_sqlite_ledger_is_an_error_for_a_read(tmp_path: Path) -> None:
    from thrifty.errors import ThriftyError

    settings = settings_for(tmp_path, {"url": f"sqlite:///{tmp_path / 'absent.db'}"})
    with pytest.raises(ThriftyError, match="no ledger at"):
        open_experiment_store(settings, existing=True)
    with pytest.raises(ThriftyError, match="no ledger at"):
        open_reader(settings, existing=True)
    assert not (tmp_path / "absent.db").exists()


def test_a_dropped_connection_is_one_clear_error_then_the_store_reconnects(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A PostgreSQL restart (here: the server ending the store's session) is a 503-style error
    for the call that meets it, never a traceback, and the next call works on a new connection."""
    import psycopg

    settings = settings_for(tmp_path, {"url": pg_url})
    store = open_experiment_store(settings)
    try:
        store.record("support", "stop", "manual", state={"baseline": "a", "weights": {"a": 1.0}})
        with psycopg.connect(pg_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended == (1,)
        with pytest.raises(SharedStateUnavailable, match="is unreachable"):
            store.states()
        assert store.states() == {"support": {"baseline": "a", "weights": {"a": 1.0}}}
    finally:
        store.close()
