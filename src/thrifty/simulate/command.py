"""`thrifty simulate`: the savings stack of candidate settings on recorded traffic."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import orjson
import typer

from thrifty.cli_common import console, semantic_extra
from thrifty.errors import ThriftyError
from thrifty.settings import load_settings


def _warn_once() -> None:
    logging.basicConfig(level=logging.WARNING, format="thrifty %(levelname)s: %(message)s")


class BadTraffic(ThriftyError):
    """Malformed traffic lines and no --skip-bad: named, and the command exits non-zero."""


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:

        def task(name: str, total: int) -> Callable[[int], None]:
            task_id = progress.add_task(name, total=total)
            return lambda n: progress.advance(task_id, n)

        yield task


def simulate_command(
    traffic: Annotated[list[Path], typer.Option("--traffic", help="traffic JSONL (repeatable)")],
    settings: Annotated[Path, typer.Option("--settings", help="the candidate settings YAML")],
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="the current settings YAML (default: no savings)")
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option(
            "--outputs", help="labelled per-model outputs (ZeroEval JSONL file or folder; repeatable)"
        ),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the JSON here")] = None,
    svg_out: Annotated[
        Path | None, typer.Option("--svg", help="write the stack as an SVG chart here")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="replay the good lines when some are malformed")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """Replay recorded traffic through the candidate's pipeline and report the savings stack."""
    from thrifty.simulate.engine import simulate
    from thrifty.simulate.render import stack_json, stack_notes, stack_svg, stack_table
    from thrifty.simulate.traffic import read_traffic

    if output_format not in ("table", "json"):
        raise ThriftyError(f"--format must be table or json, not {output_format!r}")
    for path in traffic:
        if not path.is_file():
            raise ThriftyError(f"--traffic {path}: no such file")
    read = read_traffic(traffic)
    out = console()
    if read.bad:
        for bad in read.bad[:20]:
            out.print(f"bad traffic line {bad}", markup=False, highlight=False)
        more = " (first 20 shown)" if len(read.bad) > 20 else ""
        summary = f"{len(read.bad)} bad traffic lines of {len(read.bad) + len(read.lines)}{more}"
        if not skip_bad:
            raise BadTraffic(f"{summary}; fix them, or pass --skip-bad to replay the others")
        out.print(f"{summary}: skipped (--skip-bad)", markup=False, highlight=False)
    if not read.lines:
        raise ThriftyError("the traffic has no requests to replay")
    _warn_once()
    candidate = load_settings(settings)
    current = load_settings(baseline) if baseline is not None else None
    with (
        semantic_extra("simulate (the candidate has a semantic_cache route)"),
        progress_bars(progress) as bars,
    ):
        result = simulate(candidate, read.lines, baseline=current, outputs=outputs or (), progress=bars)
    report = result.report
    report.skipped = [str(b) for b in read.bad]
    data = stack_json(report)
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    if svg_out is not None:
        svg_out.write_text(stack_svg(report), encoding="utf-8")
    if output_format == "json":
        typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    out.print(stack_table(report, f"savings stack: {len(read.lines):,} requests, candidate {settings}"))
    for line in stack_notes(report):
        out.print(f"- {line}", markup=False, highlight=False)


__all__ = ["progress_bars", "simulate_command"]
