"""`thrifty release plan|advance|rollback|status ROUTE`: gated releases (see experiments/release.py).

Exit codes: 0 the step passed (or a canary started), 1 the step's numbers did not pass (nothing
moved), 2 a usage or settings error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from thrifty.cli_common import ConfigOpt, cli_settings, console
from thrifty.errors import InvalidData
from thrifty.evals.command import tenant_of
from thrifty.evals.gate import parse_points
from thrifty.experiments import release
from thrifty.experiments.cli import open_store

release_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Gated releases: golden eval, safety eval, bench, canary, cost per success, promote",
)
RouteArg = Annotated[str, typer.Argument(help="the route")]


@release_app.command("plan")
def plan(
    route: RouteArg,
    candidate: Annotated[str, typer.Option(help="the model alias to release (hosted or self-hosted)")],
    golden: Annotated[
        Path, typer.Option(help="golden set (JSONL) for the quality gate and the bench prompts")
    ],
    safety: Annotated[Path, typer.Option(help="safety eval set (JSONL)")],
    config: ConfigOpt = None,
    tenant: Annotated[str | None, typer.Option(help="tenant billed for the evals and the bench")] = None,
    canary: Annotated[float, typer.Option(help="percent of the route's users on the candidate")] = 10.0,
    max_drop: Annotated[str, typer.Option(help="largest quality drop allowed on the golden set")] = "1pp",
    confidence: Annotated[float, typer.Option(help="confidence of the golden gate")] = 0.95,
    safety_min_pass: Annotated[float, typer.Option(help="share of the safety set that must pass")] = 1.0,
    max_p95_ms: Annotated[float | None, typer.Option(help="bench: highest p95 latency allowed")] = None,
    bench_requests: Annotated[int, typer.Option(help="bench: requests")] = 50,
    bench_concurrency: Annotated[int, typer.Option(help="bench: concurrency")] = 4,
    min_canary_requests: Annotated[int, typer.Option(help="canary: requests before it can pass")] = 200,
    max_cost_ratio: Annotated[float, typer.Option(help="cost per success allowed vs the baseline")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="also write the plan as JSON here")] = None,
) -> None:
    """Write the release's steps for ROUTE moving to --candidate (stored with the ledger)."""
    settings = cli_settings(config)
    if not 0 <= safety_min_pass <= 1:
        raise InvalidData("--safety-min-pass must be between 0 and 1")
    if not 0.5 <= confidence < 1:
        raise InvalidData("--confidence must be in [0.5, 1)")
    if max_cost_ratio <= 0:
        raise InvalidData("--max-cost-ratio must be above 0")
    store = open_store(settings, create=True)
    try:
        written = release.plan_release(
            settings,
            store,
            route,
            candidate,
            golden=golden,
            safety=safety,
            tenant=tenant_of(tenant, settings),
            canary_percent=canary,
            max_drop=parse_points(max_drop),
            confidence=confidence,
            safety_min_pass=safety_min_pass,
            max_p95_ms=max_p95_ms,
            bench_requests=bench_requests,
            bench_concurrency=bench_concurrency,
            min_canary_requests=min_canary_requests,
            max_cost_ratio=max_cost_ratio,
        )
    finally:
        store.close()
    if out is not None:
        out.write_bytes(orjson.dumps(written, option=orjson.OPT_INDENT_2))
    typer.echo(f"release of {candidate} on route {route}:")
    for line in release.describe(written):
        typer.echo(line)


@release_app.command("advance")
def advance(route: RouteArg, config: ConfigOpt = None) -> None:
    """Measure the current step; move on (and move the route's weights) only if it passes."""
    settings = cli_settings(config)
    store = open_store(settings, create=True)
    try:
        outcome = release.advance(settings, store, route, console())
        written = store.release(route)
    finally:
        store.close()
    for line in outcome.lines:
        typer.echo(line)
    assert written is not None
    for line in release.describe(written):
        typer.echo(line)
    if not outcome.passed:
        raise typer.Exit(1)


@release_app.command("rollback")
def rollback(route: RouteArg, config: ConfigOpt = None, reason: str = "manual") -> None:
    """All of ROUTE's traffic back on the baseline; the release ends (recorded)."""
    settings = cli_settings(config)
    store = open_store(settings, create=True)
    try:
        written = release.rollback(settings, store, route, reason)
    finally:
        store.close()
    typer.echo(f"rolled back the release of {written['candidate']} on route {route}")


@release_app.command("status")
def status(route: RouteArg, config: ConfigOpt = None) -> None:
    """The release's steps and what each measured."""
    settings = cli_settings(config)
    store = open_store(settings, create=True)
    try:
        written = store.release(route)
    finally:
        store.close()
    if written is None:
        raise InvalidData(f"route {route!r} has no release")
    for line in release.describe(written):
        typer.echo(line)


__all__ = ["release_app"]
