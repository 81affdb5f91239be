"""`thrifty recordings export`: a tenant's recordings as traffic JSONL, what `thrifty simulate` reads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from thrifty.cli_common import ConfigOpt, cli_settings
from thrifty.errors import ThriftyError

recordings_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="Recordings of routes with `record`, for simulate"
)


@recordings_app.command("export")
def export(
    tenant: Annotated[str, typer.Option(help="the tenant whose recordings to write (one tenant a file)")],
    route: Annotated[str | None, typer.Option(help="only this route")] = None,
    since: Annotated[str | None, typer.Option(help="YYYY-MM-DD, ISO time, or 7d/24h/30m")] = None,
    until: Annotated[str | None, typer.Option(help="only before this time (the forms of --since)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many lines")] = None,
    out: Annotated[Path | None, typer.Option(help="traffic JSONL file (default: stdout)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a tenant's recordings in the traffic format, oldest first."""
    from thrifty.report import parse_since
    from thrifty.stores.recordings import read_recordings

    try:
        since_ts, until_ts = parse_since(since), parse_since(until)
    except ValueError as err:
        raise ThriftyError(f"--since/--until: {err}") from err
    settings = cli_settings(config)
    sink = out.open("wb") if out is not None else sys.stdout.buffer
    count = 0
    try:
        for rec in read_recordings(
            settings, tenant, route=route, since=since_ts, until=until_ts, limit=limit
        ):
            sink.write(orjson.dumps(rec.traffic_line()) + b"\n")
            count += 1
    finally:
        if out is not None:
            sink.close()
        else:
            sink.flush()
    if out is not None:
        typer.echo(f"{count} recordings of tenant {tenant} written to {out}", err=True)


__all__ = ["recordings_app"]
