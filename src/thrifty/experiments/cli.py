"""`thrifty experiment status|check|promote|stop ROUTE`: the arms of a route, per arm cost,
success, feedback and escalation, the stop rule, and recorded actions."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer

from thrifty.cli_common import ConfigOpt, cli_settings, console
from thrifty.experiments import actions
from thrifty.experiments.actions import ExperimentReport
from thrifty.experiments.store import ExperimentStore
from thrifty.settings import Settings
from thrifty.stores.factory import open_experiment_store

experiment_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Experiments on a route: variants, feedback, the stop rule, promote and stop",
)
RouteArg = Annotated[str, typer.Argument(help="the route")]
VariantArg = Annotated[str, typer.Argument(help="the variant (arm)")]
FormatOpt = Annotated[str, typer.Option("--format", help="table|json")]
ReasonOpt = Annotated[str, typer.Option(help="why (recorded with the action)")]


def open_store(settings: Settings, *, create: bool = False) -> ExperimentStore:
    """The experiments' store where `storage.url` keeps them (the ledger's SQLite file, or
    PostgreSQL); `create`: a first release may start before the gateway ever ran."""
    return open_experiment_store(settings, existing=not create)


def render(found: ExperimentReport) -> None:
    from thrifty.tables import Column, fit_table

    out = console()
    rows = found.to_json()["variants"]
    cells = []
    for v in rows:
        rule = v["stop_rule"]
        cells.append(
            [
                v["variant"] + (" (baseline)" if v["variant"] == found.baseline else ""),
                f"{v['weight']:g}",
                f"{v['requests']:,}",
                "-" if v["success_rate"] is None else f"{v['success_rate']:.2%}",
                v["cost_usd"],
                v["cost_per_success_usd"] or "-",
                "-" if v["escalation_rate"] is None else f"{v['escalation_rate']:.1%}",
                f"{v['feedback']:,}",
                "-" if v["feedback_score"] is None else f"{v['feedback_score']:.3f}",
                "-" if rule is None else ("STOP: " if rule["stop"] else "") + rule["reason"],
            ]
        )
    columns = [
        Column("variant", "left"),
        Column("weight"),
        Column("requests"),
        Column("success"),
        Column("cost USD"),
        Column("USD/success"),
        Column("escalated", priority=3),
        Column("feedback", priority=4),
        Column("score", priority=5),
        Column("stop rule", "left", priority=6),
    ]
    out.print(fit_table(columns, cells, width=out.width, title=f"experiment on route {found.route}"))


@experiment_app.command("status")
def status(route: RouteArg, config: ConfigOpt = None, fmt: FormatOpt = "table") -> None:
    """Per variant: weight, requests, success rate, cost, cost per success, escalation, feedback,
    and what the stop rule says (nothing is changed)."""
    settings = cli_settings(config)
    store = open_store(settings)
    try:
        found = actions.report(settings, store, route)
    finally:
        store.close()
    if fmt == "json":
        typer.echo(orjson.dumps(found.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        render(found)


@experiment_app.command("check")
def check(route: RouteArg, config: ConfigOpt = None) -> None:
    """Run the stop rule and stop (recorded) every variant it shows worse than the baseline by
    more than the margin. Safe to run as often as you like (cron, CI): the test is always valid."""
    settings = cli_settings(config)
    store = open_store(settings)
    try:
        found, stopped = actions.check(settings, store, route)
    finally:
        store.close()
    render(found)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing to stop")


@experiment_app.command("promote")
def promote(
    route: RouteArg, variant: VariantArg, config: ConfigOpt = None, reason: ReasonOpt = "manual"
) -> None:
    """Send all of the route's traffic to VARIANT, which becomes the baseline (recorded)."""
    settings = cli_settings(config)
    store = open_store(settings)
    try:
        arms = actions.promote(settings, store, route, variant, reason)
    finally:
        store.close()
    typer.echo(f"promoted {variant} on route {route}: weights {arms.weights()}")


@experiment_app.command("stop")
def stop(
    route: RouteArg, variant: VariantArg, config: ConfigOpt = None, reason: ReasonOpt = "manual"
) -> None:
    """Send no more traffic to VARIANT (recorded); its users go to the other variants."""
    settings = cli_settings(config)
    store = open_store(settings)
    try:
        arms = actions.stop(settings, store, route, variant, reason)
    finally:
        store.close()
    typer.echo(f"stopped {variant} on route {route}: weights {arms.weights()}")


@experiment_app.command("log")
def log(route: RouteArg, config: ConfigOpt = None) -> None:
    """The recorded actions on the route's arms (promote, stop, release steps), oldest first."""
    settings = cli_settings(config)
    store = open_store(settings)
    try:
        found = store.actions(route)
    finally:
        store.close()
    for a in found:
        typer.echo(
            orjson.dumps({"ts": a.ts, "action": a.action, "variant": a.variant, "reason": a.reason}).decode()
        )


__all__ = ["experiment_app", "open_store"]
