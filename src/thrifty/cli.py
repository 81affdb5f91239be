"""The `thrifty` command line. Errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.text import Text

from thrifty.batch.cli import batch_app
from thrifty.bench.commands import bench_app
from thrifty.cli_common import (
    ConfidenceOpt,
    ConfigOpt,
    PricesOpt,
    TargetQualityOpt,
)
from thrifty.cli_common import cli_settings as _settings
from thrifty.cli_common import console as _console
from thrifty.cli_common import semantic_extra as _semantic_extra
from thrifty.cli_common import settings_path as _settings_path
from thrifty.errors import ThriftyError
from thrifty.experiments.cli import experiment_app
from thrifty.experiments.release_cli import release_app
from thrifty.planning.commands import estimate, reconcile
from thrifty.recording.command import recordings_app
from thrifty.settings import load_settings, resolve_secrets
from thrifty.simulate.command import simulate_command
from thrifty.stores.ports import LedgerReader

app = typer.Typer(
    rich_markup_mode="markdown",
    add_completion=False,
    no_args_is_help=True,
    help="thrifty: the LLM cost-control gateway",
)
keys_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="Virtual keys (stored hashed; shown once)"
)
cache_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Caching: tune the semantic cache, purge exact and semantic entries",
)
route_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="Routing: train a router from labelled outputs"
)
prompt_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Prompts: where their tokens go and what that costs",
)
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")
app.add_typer(route_app, name="route")
app.add_typer(cache_app, name="cache")
app.add_typer(prompt_app, name="prompt")
eval_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Evals: golden sets through the gateway, and a regression gate",
)
app.add_typer(eval_app, name="eval")
app.add_typer(batch_app, name="batch")
app.add_typer(experiment_app, name="experiment")
app.add_typer(release_app, name="release")
app.command()(estimate)
app.command()(reconcile)
app.command("simulate")(simulate_command)
app.add_typer(recordings_app, name="recordings")


def _ledger_reader(config: Path | None, db: Path | None) -> LedgerReader:
    """The ledger named by --db (a SQLite file) or by the settings' storage.url (SQLite or PostgreSQL)."""
    from thrifty.stores.factory import open_reader
    from thrifty.stores.readers import SqliteLedgerReader
    from thrifty.stores.sqlite_db import open_database

    settings = None if db is not None else _settings(config)
    if settings is not None and settings.storage.backend == "postgresql":
        return open_reader(settings)
    path = db or (settings.storage.sqlite_path if settings else Path("thrifty.db"))
    if not path.exists():
        raise ThriftyError(f"no ledger at {path}")
    return SqliteLedgerReader(open_database(path))


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default from settings)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default from settings)")] = None,
) -> None:
    """Run the OpenAI-compatible gateway."""
    import logging

    from thrifty.server.run import serve as run_server

    # Start-up warnings (a provider key not set, a model without a price) are for the operator.
    logging.basicConfig(level=logging.WARNING, format="thrifty %(levelname)s: %(message)s")
    path = _settings_path(config)
    settings = load_settings(path)
    run_server(
        settings,
        resolve_secrets(settings, os.environ),
        host=host or settings.server.host,
        port=settings.server.port if port is None else port,
        settings_path=path,
    )


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant the key bills to")],
    config: ConfigOpt = None,
    label: Annotated[str | None, typer.Option(help="a note to recognise the key by")] = None,
) -> None:
    """Create a virtual key; it is printed once and stored only as a hash."""
    from thrifty.stores.factory import open_key_store

    settings = _settings(config)
    if tenant not in settings.tenants:
        raise ThriftyError(f"unknown tenant {tenant!r}; add it under tenants: in the settings first")
    store, conn = open_key_store(settings)
    key = store.create(tenant, label)
    conn.close()
    typer.echo(key)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None) -> None:
    """List keys by hash prefix (the keys themselves are not stored)."""
    from thrifty.stores.factory import open_key_store

    store, conn = open_key_store(_settings(config))
    for prefix, tenant, label, _created, revoked in store.list():
        typer.echo(f"{prefix}  {tenant:<20} {label or '':<20} {'revoked' if revoked else 'active'}")
    conn.close()


@keys_app.command("revoke")
def keys_revoke(hash_prefix: str, config: ConfigOpt = None) -> None:
    """Revoke the key(s) whose hash starts with HASH_PREFIX (see `keys list`)."""
    from thrifty.stores.factory import open_key_store

    if len(hash_prefix) < 8:
        raise ThriftyError("give at least 8 characters of the key hash")
    store, conn = open_key_store(_settings(config))
    revoked = store.revoke(hash_prefix)
    conn.close()
    if not revoked:
        typer.echo(
            f"no active key whose hash starts with {hash_prefix!r} (see `thrifty keys list`)", err=True
        )
        raise typer.Exit(1)
    typer.echo(f"revoked {revoked} key{'' if revoked == 1 else 's'}")


@app.command()
def report(
    by: Annotated[
        str, typer.Option(help="tenant|feature|route|prompt_version|model|user|day|variant")
    ] = "tenant",
    since: Annotated[str | None, typer.Option(help="YYYY-MM-DD, ISO time, or 7d/24h/30m")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table|json|csv")] = "table",
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="ledger SQLite file (instead of --config)")] = None,
    until: Annotated[
        str | None, typer.Option(help="only requests before this time (the forms of --since)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's requests")] = None,
) -> None:
    """Spend, tokens and success by one attribution dimension."""
    import asyncio

    from thrifty.report import REPORT_COLUMNS, batch_line, build_report, parse_since, render_table, to_csv
    from thrifty.stores.reporting import SqliteReportingStore, Window
    from thrifty.stores.sqlite_db import open_database

    if by not in REPORT_COLUMNS:
        raise ThriftyError(f"--by must be one of: {', '.join(REPORT_COLUMNS)}")
    if fmt not in ("table", "json", "csv"):
        raise ThriftyError("--format must be table, json or csv")
    try:
        since_ts = parse_since(since)
    except ValueError as err:
        raise ThriftyError(f"--since: {err}") from err
    try:
        until_ts = parse_since(until)
    except ValueError as err:
        raise ThriftyError(f"--until: {err}") from err
    settings = None if db is not None else _settings(config)
    if settings is not None and settings.storage.backend == "postgresql":
        # PostgreSQL: the ledger itself, through the same reader port (no rollups there yet).
        reader = _ledger_reader(config, db)
        rows = build_report(reader, by, since_ts, until=until_ts, tenant=tenant)
        reader.close()
    else:
        path = db or (settings.storage.sqlite_path if settings else Path("thrifty.db"))
        if not path.exists():
            raise ThriftyError(f"no ledger at {path}")
        open_database(path).close()  # brings an older ledger's schema up to date
        rows = asyncio.run(SqliteReportingStore(path).spend_by(by, Window(since_ts, until_ts, tenant)))
    if fmt == "json":
        typer.echo(orjson.dumps([r.to_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        typer.echo(to_csv(rows), nl=False)
    else:
        console = _console()
        console.print(render_table(rows, by, title=f"spend by {by}", width=console.width))
        line = batch_line(rows)
        if line:
            console.print(line, highlight=False, soft_wrap=True)


@app.command()
def dashboard(
    config: ConfigOpt = None,
    db: Annotated[
        Path | None, typer.Option(help="ledger SQLite file (default: the settings' storage)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default from settings)")] = None,
    port: Annotated[int, typer.Option(help="port")] = 8081,
    rebuild_rollups: Annotated[
        bool, typer.Option("--rebuild-rollups", help="recompute the rollups from the ledger, then exit")
    ] = False,
) -> None:
    """Serve the dashboard (/dashboard) over an existing ledger, without the proxy."""
    import asyncio

    settings = _settings(config)
    postgres = db is None and settings.storage.backend == "postgresql"
    path = db or settings.storage.sqlite_path
    if not postgres and not path.exists():
        raise ThriftyError(f"no ledger at {path}")
    if rebuild_rollups:
        rows = asyncio.run(_rebuild_rollups(settings, None if postgres else path))
        typer.echo(f"rebuilt the rollups from {rows:,} ledger row{'' if rows == 1 else 's'}")
        return
    import uvicorn

    from thrifty.server.dashboard.standalone import dashboard_config

    if not settings.dashboard.admin_key_hashes and not settings.tenants:
        raise ThriftyError("no keys can sign in: add dashboard.admin_key_hashes or tenants to the settings")
    from thrifty.server.run import listening_socket

    bind = host or settings.server.host
    server = uvicorn.Server(dashboard_config(settings, None if postgres else path, host=bind, port=port))
    try:
        sock = listening_socket(bind, port)
    except OSError as err:
        raise ThriftyError(f"cannot listen on {bind}:{port}: {err.strerror}") from err
    where = "PostgreSQL (storage.url)" if postgres else str(path.resolve())
    typer.echo(f"thrifty dashboard on http://{bind}:{port}/dashboard over {where}")
    server.run(sockets=[sock])


async def _rebuild_rollups(settings: Any, path: Path | None) -> int:
    if path is None:
        from thrifty.stores import postgres
        from thrifty.stores.postgres_reporting import PostgresReportingStore

        conn = postgres.connect(settings.storage.url)
        postgres.migrate(conn)
        conn.close()
        store: Any = PostgresReportingStore(settings.storage.url)
    else:
        from thrifty.stores.reporting import SqliteReportingStore
        from thrifty.stores.sqlite_db import open_database

        open_database(path).close()
        store = SqliteReportingStore(path)
    try:
        return int(await store.rebuild_rollups())
    finally:
        await store.aclose()


@app.command()
def alerts(
    since: Annotated[str | None, typer.Option(help="YYYY-MM-DD, ISO time, or 7d/24h/30m")] = "7d",
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="ledger SQLite file (instead of --config)")] = None,
) -> None:
    """Alerts fired (budget thresholds, spend and rate spikes), newest first, with delivery status."""
    from datetime import UTC, datetime

    from thrifty.report import parse_since

    try:
        since_ts = parse_since(since) or 0
    except ValueError as err:
        raise ThriftyError(f"--since: {err}") from err
    reader = _ledger_reader(config, db)
    rows = reader.alerts_since(since_ts)
    reader.close()
    if not rows:
        typer.echo("no alerts")
    for ts, kind, _scope, message, delivered, error in rows:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        status = "delivered" if delivered else (error or "stored (no webhook)")
        typer.echo(f"{when}  {kind:<20} {message}  [{status}]")


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="ZeroEval-format JSONL dir (default ../shared/data/routing/zeroeval)")
    ] = None,
    requests: Annotated[int, typer.Option(help="mixed-traffic requests to send")] = 300,
    db: Annotated[Path | None, typer.Option(help="keep the demo ledger in this SQLite file")] = None,
    cascade_prompts: Annotated[
        int, typer.Option(help="recorded prompts sent to the cascade route and to gpt-4o (0 skips)")
    ] = 200,
    support_data: Annotated[
        Path | None,
        typer.Option(
            help="Banking77-format dir, train.csv/test.csv (default ../shared/data/cache/banking77)"
        ),
    ] = None,
    support_seeds: Annotated[int, typer.Option(help="first askers, answered upstream and cached")] = 1500,
    support_lookups: Annotated[
        int, typer.Option(help="later askers in other words (0 skips the phase)")
    ] = 500,
    serve: Annotated[
        bool, typer.Option("--serve", help="then keep the gateway up and print the dashboard's URL")
    ] = False,
    stack_requests: Annotated[
        int, typer.Option(help="requests of the demo workload replayed for the savings stack (0 skips)")
    ] = 1000,
) -> None:
    """Start the gateway on loopback, send real SDK traffic, print the report. No keys, no services."""
    from thrifty.demo import DEFAULT_DATA, run_demo
    from thrifty.demo.support import DEFAULT_DATA as SUPPORT_DATA

    console = _console()
    code = run_demo(
        data or (DEFAULT_DATA if DEFAULT_DATA.exists() else None),
        requests,
        db,
        console.print,
        cascade_prompts=cascade_prompts,
        support_data=support_data or (SUPPORT_DATA if SUPPORT_DATA.exists() else None),
        support_seeds=support_seeds,
        support_lookups=support_lookups,
        width=console.width,
        serve=serve,
        stack_requests=stack_requests,
    )
    raise typer.Exit(code)


@route_app.command("train")
def route_train(
    data: Annotated[list[Path], typer.Option(help="ZeroEval-format JSONL file(s) or dir(s); repeatable")],
    out: Annotated[Path, typer.Option(help="where to write the router artifact (JSON)")],
    reference: Annotated[
        str, typer.Option(help="the model whose quality is the target")
    ] = "gpt-4o-2024-08-06",
    target_quality: TargetQualityOpt = 0.99,
    confidence: ConfidenceOpt = 0.95,
    prices: PricesOpt = None,
    vote_ordering: Annotated[
        str,
        typer.Option(
            help="which rows order the vote cascades' certification path: same (the rows it tests), "
            "split (a disjoint half orders, the other half tests) or crossfit (both ways, half the "
            "error budget each)"
        ),
    ] = "same",
) -> None:
    """Learn a cascade router (and a pre-call classifier) from labelled per-model outputs of any
    models: the ladder is searched over every priced model in the data, and thresholds are
    certified on out-of-fold gate scores (per task, and across tasks for unseen tasks)."""
    from thrifty.bench.route import certificate_line, train_router

    console = _console()
    router = train_router(
        data,
        out,
        reference=reference,
        target_quality=target_quality,
        confidence=confidence,
        prices=prices,
        console=console,
        vote_ordering=vote_ordering,
    )
    console.print(certificate_line(router), highlight=False)
    typer.echo(f"router written to {out}; it calls {', '.join(sorted(router.models()))}")


@prompt_app.command("lint")
def prompt_lint(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="a prompt: .json request or messages, .jsonl requests, or text; "
            "without it, --tenant's recordings of --route"
        ),
    ] = None,
    config: ConfigOpt = None,
    tenant: Annotated[
        str | None, typer.Option(help="without PROMPT: lint this tenant's recorded prompts of --route")
    ] = None,
    route: Annotated[str | None, typer.Option(help="price findings at this route's traffic (ledger)")] = None,
    prompt_version: Annotated[str | None, typer.Option(help="only this prompt version's traffic")] = None,
    days: Annotated[float, typer.Option(help="traffic over the last N days")] = 7.0,
    requests_per_day: Annotated[float | None, typer.Option(help="traffic, without a ledger")] = None,
    input_price: Annotated[str | None, typer.Option(help="USD per million input tokens, with it")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table|json")] = "table",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the findings here")] = None,
) -> None:
    """Tokens per section, sentences repeated across system and developer prompts, few-shot examples,
    filler phrases and format instructions a JSON schema would enforce, each with its USD per day."""
    from decimal import Decimal, InvalidOperation

    from thrifty.context.lint_run import run_prompt_lint

    if fmt not in ("table", "json"):
        raise ThriftyError("--format must be table or json")
    try:
        price = Decimal(input_price) if input_price is not None else None
    except InvalidOperation as err:
        raise ThriftyError(f"--input-price: {input_price!r} is not a number") from err
    run_prompt_lint(
        path,
        tenant=tenant,
        console=_console(),
        settings=_settings(config) if route is not None else None,
        route=route,
        prompt_version=prompt_version,
        days=days,
        requests_per_day=requests_per_day,
        input_usd_per_mtok=price,
        json_out=json_out,
        as_json=fmt == "json",
    )


@cache_app.command("tune")
def cache_tune(
    data: Annotated[Path, typer.Option(help="labelled text,category CSV (e.g. your own traffic)")],
    target_precision: Annotated[float, typer.Option(help="e.g. 0.99")] = 0.99,
    out: Annotated[Path | None, typer.Option(help="write the learned parameters (JSON) here")] = None,
    z: Annotated[
        float,
        typer.Option(
            help="one-sided z of the precision lower bound the threshold must clear (0: point estimate)"
        ),
    ] = 3.0,
    density: Annotated[
        bool,
        typer.Option(
            help="also tune on sparse caches (random subsets of the data) and learn a threshold per "
            "cache size; --no-density: leave-one-out on the whole data only, one threshold"
        ),
    ] = True,
    scope_share: Annotated[
        float,
        typer.Option(
            help="out-of-scope lookups (texts of held-out categories, every hit wrong) as this share of "
            "the lookups; 0: none (the built-in rule used 0.1)",
            min=0.0,
            max=0.9,
        ),
    ] = 0.1,
) -> None:
    """Learn the semantic cache's decision parameters from labelled queries."""
    with _semantic_extra("thrifty cache tune"):
        from thrifty.bench.cache import tune_cache

        result = tune_cache(data, target_precision, z=z, density=density, scope_share=scope_share)
    params = result.params.to_dict()
    if params["threshold"] == "inf":
        typer.echo(
            f"warning: no threshold reaches precision {target_precision} on this data (at the z={z} "
            "lower bound); with these parameters the semantic cache never answers. Label more "
            "queries, lower the target or lower --z.",
            err=True,
        )
    typer.echo(
        f"fit (cross-fitted, leave-one-out lookups): hit rate {result.fit_hit_rate:.1%} at precision "
        f"{result.fit_precision:.2%}"
    )
    for point in result.by_size:
        never = point.threshold == float("inf")
        typer.echo(
            f"  cache of {point.size:>6,} entries: "
            + (
                "never hits (no threshold certified)"
                if never
                else f"threshold {point.threshold:.4f}, hit rate {point.hit_rate:.1%} at precision "
                f"{point.precision:.2%}"
            )
            + f" ({point.lookups:,} lookups)"
        )
    text = orjson.dumps(params, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(text)
        typer.echo(f"parameters written to {out}")
    else:
        typer.echo(text)


@cache_app.command("purge")
def cache_purge(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's entries")] = None,
    route: Annotated[str | None, typer.Option(help="only this route's entries")] = None,
    prompt_version: Annotated[str | None, typer.Option(help="only entries of this prompt version")] = None,
    corpus_version: Annotated[str | None, typer.Option(help="only entries of this corpus version")] = None,
    expired: Annotated[bool, typer.Option(help="only entries past their TTL")] = False,
    all_entries: Annotated[bool, typer.Option("--all", help="everything (required with no filter)")] = False,
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file (instead of --config)")] = None,
) -> None:
    """Remove exact- and semantic-cache entries by scope (a running gateway stops serving them at once)."""
    from thrifty.settings import StorageSettings
    from thrifty.stores.factory import purge_caches

    filters = (tenant, route, prompt_version, corpus_version)
    if all(f is None for f in filters) and not expired and not all_entries:
        raise ThriftyError(
            "give a scope (--tenant, --route, --prompt-version, --corpus-version, --expired) or --all"
        )
    settings = _settings(config) if db is None else None
    storage = settings.storage if settings is not None else StorageSettings(url=f"sqlite:///{db}")
    scope = {
        "tenant": tenant,
        "route": route,
        "prompt_version": prompt_version,
        "corpus_version": corpus_version,
    }
    # PostgreSQL storage: the entries every replica shares; SQLite: the one file.
    exact, semantic = purge_caches(storage, scope, time.time() if expired else None)
    typer.echo(
        f"purged {exact + semantic} cache entr{'y' if exact + semantic == 1 else 'ies'} "
        f"({exact} exact, {semantic} semantic)"
    )


@cache_app.command("stats")
def cache_stats(
    route: Annotated[str | None, typer.Option(help="only this route")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file (instead of the settings' storage)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Semantic cache by route and partition: hit rate, estimated precision (95% CI), verifications
    and their cost, savings net of verification, and the current thresholds."""
    from thrifty.cache.semantic.stats import stats_table
    from thrifty.cache.semantic.stored_stats import stored_partition_stats

    settings = _settings(config) if db is None or config is not None else None
    if settings is not None and route is not None and route not in settings.routes:
        known = ", ".join(sorted(settings.routes))
        raise ThriftyError(f"--route: no route {route!r} in the settings (routes: {known})")
    rows = stored_partition_stats(settings, path=db, tenant=tenant, route=route)
    if as_json:
        typer.echo(orjson.dumps([r.to_dict() for r in rows], option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        typer.echo("no semantic cache partition has recorded lookups on a route with semantic_cache.verify")
        return
    _console().print(stats_table(rows, with_thresholds=settings is not None))


@eval_app.command("run")
def eval_run(
    golden_set: Annotated[Path, typer.Option("--set", help="golden set (JSONL; ZeroEval rows accepted)")],
    out: Annotated[
        Path, typer.Option(help="results file (JSON); its journal FILE.journal makes reruns resume")
    ],
    models: Annotated[str | None, typer.Option(help="models to evaluate, comma-separated")] = None,
    route: Annotated[str | None, typer.Option(help="also evaluate this route (route:NAME)")] = None,
    concurrency: Annotated[int, typer.Option(help="calls in flight at once")] = 4,
    tenant: Annotated[str | None, typer.Option(help="tenant the eval's calls bill to")] = None,
    confidence: Annotated[float, typer.Option(help="confidence of the accuracy intervals")] = 0.95,
    labelled_out: Annotated[
        Path | None, typer.Option(help="labelled outputs, ZeroEval format (default OUT-stem.zeroeval.jsonl)")
    ] = None,
    baseline: Annotated[Path | None, typer.Option(help="results to compare with (drift alert)")] = None,
    alert_drop: Annotated[
        str | None, typer.Option(help="alert when a model's pass rate is this many points below --baseline")
    ] = None,
    config: ConfigOpt = None,
    via: Annotated[
        str, typer.Option(help="realtime, or batch: the calls as batch jobs at batch prices")
    ] = "realtime",
) -> None:
    """Call each model on a golden set through the gateway (priced, in the ledger as feature
    `eval`), score, and report accuracy with a confidence interval, cost, cost per success,
    latency and failures."""
    from thrifty.evals.command import run_command

    results = run_command(
        _settings(config),
        golden_path=golden_set,
        models=models,
        route=route,
        out=out,
        tenant=tenant,
        concurrency=concurrency,
        confidence=confidence,
        labelled_out=labelled_out,
        console=_console(),
        baseline=baseline,
        alert_drop=alert_drop,
        via=via,
    )
    if results["pending"]:
        raise typer.Exit(1)


@eval_app.command("gate")
def eval_gate(
    baseline: Annotated[Path, typer.Option(help="the baseline's results file")],
    candidate: Annotated[Path, typer.Option(help="the candidate's results file")],
    max_drop: Annotated[str, typer.Option(help="largest accepted accuracy drop, in points (1pp)")] = "1pp",
    confidence: Annotated[float, typer.Option(help="confidence that the drop exceeds the margin")] = 0.95,
    max_cost_ratio: Annotated[
        float | None, typer.Option(help="largest accepted rise of cost per successful task (1.2 = +20%)")
    ] = None,
    baseline_model: Annotated[str | None, typer.Option(help="model in the baseline file, if several")] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="model in the candidate file, if several")
    ] = None,
) -> None:
    """For CI: exit 1 when the candidate is worse than the baseline beyond the margins, saying why."""
    from thrifty.evals.command import gate_command

    verdict = gate_command(
        baseline=baseline,
        candidate=candidate,
        max_drop=max_drop,
        confidence=confidence,
        max_cost_ratio=max_cost_ratio,
        baseline_model=baseline_model,
        candidate_model=candidate_model,
    )
    for note in verdict.notes:
        typer.echo(note)
    if not verdict.passed:
        for reason in verdict.reasons:
            typer.echo(f"FAIL: {reason}")
        raise typer.Exit(1)
    typer.echo("PASS")


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The click exception base classes that may carry a usage error.

    typer >= 0.2x vendors its own copy of click whose exceptions are not `click.ClickException`
    subclasses; older typer raises click's own. Both are shown the same way."""
    found: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        found.append(VendoredClickException)
    except ImportError:  # typer that uses the click package itself
        pass
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


def main() -> None:
    try:
        # Without standalone mode click hands back typer.Exit's code instead of exiting with it.
        code = app(standalone_mode=False)
    except ThriftyError as err:
        # The message is plain text: brackets in it (an install hint's `.[semantic]`) are not markup.
        Console(stderr=True).print(
            Text.assemble(("error:", "red"), " ", err.message), highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except _usage_error_types() as err:
        # Usage errors (missing or unknown options, bad values, no subcommand): click's own
        # one-line message and usage, exit 2; "no arguments" shows the help, also exit 2 as click does.
        err.show()  # type: ignore[attr-defined]
        sys.exit(int(getattr(err, "exit_code", 2)))
    sys.exit(code if isinstance(code, int) else 0)
