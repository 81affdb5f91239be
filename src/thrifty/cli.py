"""The `thrifty` command line. Errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.text import Text

from thrifty.batch.cli import batch_app
from thrifty.bench.commands import bench_app
from thrifty.cache.cli import cache_app
from thrifty.cli_common import ConfigOpt
from thrifty.cli_common import cli_settings as _settings
from thrifty.cli_common import console as _console
from thrifty.cli_common import settings_path as _settings_path
from thrifty.context.cli import prompt_app
from thrifty.errors import ThriftyError
from thrifty.evals.cli import eval_app
from thrifty.experiments.cli import experiment_app
from thrifty.experiments.release_cli import release_app
from thrifty.planning.commands import estimate, reconcile
from thrifty.recording.command import recordings_app
from thrifty.routing.cli import route_app
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
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")
app.add_typer(route_app, name="route")
app.add_typer(cache_app, name="cache")
app.add_typer(prompt_app, name="prompt")
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
