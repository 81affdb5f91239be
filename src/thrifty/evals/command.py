"""`thrifty eval run` and `thrifty eval gate`: the I/O around the runner, the summary and the gate."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from thrifty.alerts.rules import Alert
from thrifty.errors import InvalidData
from thrifty.evals.gate import Drift, GateVerdict, gate, parse_points, pass_rate_drops
from thrifty.evals.results import (
    TABLE_HEADERS,
    read_results,
    summarise,
    table_rows,
    write_results,
    write_zeroeval,
)
from thrifty.routing.resolve import ROUTE_PREFIX
from thrifty.settings import Settings, resolve_secrets


def systems_of(models: str | None, route: str | None, settings: Settings) -> list[str]:
    systems = [m.strip() for m in (models or "").split(",") if m.strip()]
    if route:
        systems.append(ROUTE_PREFIX + route.removeprefix(ROUTE_PREFIX))
    if not systems:
        raise InvalidData("give the models to evaluate: --models A,B (and/or --route R)")
    for system in systems:
        if system.startswith(ROUTE_PREFIX):
            if system.removeprefix(ROUTE_PREFIX) not in settings.routes:
                known = ", ".join(sorted(settings.routes)) or "none"
                raise InvalidData(
                    f"there is no route {system.removeprefix(ROUTE_PREFIX)!r} (routes: {known})"
                )
        elif system not in settings.models:
            raise InvalidData(
                f"there is no model {system!r} in the settings (models: {', '.join(settings.models)})"
            )
    if len(set(systems)) != len(systems):
        raise InvalidData("--models names a model twice")
    return systems


def tenant_of(tenant: str | None, settings: Settings) -> str:
    if tenant is not None:
        if tenant not in settings.tenants:
            raise InvalidData(
                f"there is no tenant {tenant!r} (tenants: {', '.join(settings.tenants) or 'none'})"
            )
        return tenant
    if len(settings.tenants) == 1:
        return next(iter(settings.tenants))
    raise InvalidData(
        f"the settings have {len(settings.tenants)} tenants; name the one to bill with --tenant"
    )


def upstream_names(systems: Sequence[str], settings: Settings) -> dict[str, str]:
    """Each model alias by its upstream model id (what prices and `route train` know), unless two
    aliases share one; routes keep their names."""
    upstream = {s: settings.models[s].upstream or s for s in systems if s in settings.models}
    counts: dict[str, int] = {}
    for name in upstream.values():
        counts[name] = counts.get(name, 0) + 1
    return {s: u for s, u in upstream.items() if counts[u] == 1}


def drift_message(drift: Drift, set_path: str) -> str:
    return (
        f"eval of {drift.model} on {set_path}: pass rate {drift.rate:.1%} vs the baseline's "
        f"{drift.baseline_rate:.1%} on {drift.items} items"
    )


def drift_alert(drift: Drift, set_path: str, run_id: str, threshold: float) -> Alert:
    """Keyed by run and model: a resumed run (same run id) never raises it twice."""
    return Alert(
        key=f"eval_drift:{run_id}:{drift.model}",
        kind="eval_drift",
        scope=drift.model,
        message=drift_message(drift, set_path),
        data={
            "model": drift.model,
            "set": set_path,
            "items": drift.items,
            "baseline_rate": drift.baseline_rate,
            "rate": drift.rate,
            "threshold": threshold,
        },
    )


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def batches_path(out: Path) -> Path:
    """`--via batch`: each model's batch id, so a rerun waits for it instead of sending again."""
    return out.with_name(out.name + ".batches")


def labelled_path(out: Path) -> Path:
    return out.with_name(out.stem + ".zeroeval.jsonl")


def run_command(
    settings: Settings,
    *,
    golden_path: Path,
    models: str | None,
    route: str | None,
    out: Path,
    tenant: str | None,
    concurrency: int,
    confidence: float,
    labelled_out: Path | None,
    console: Console,
    baseline: Path | None = None,
    alert_drop: str | None = None,
    via: str = "realtime",
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from thrifty.evals.golden import load_golden
    from thrifty.evals.journal import Journal
    from thrifty.evals.runner import run_eval
    from thrifty.gateway import Gateway

    if concurrency < 1:
        raise InvalidData("--concurrency must be at least 1")
    if via not in ("realtime", "batch"):
        raise InvalidData("--via must be realtime or batch")
    if not 0.5 <= confidence < 1:
        raise InvalidData("--confidence must be in [0.5, 1)")
    if (baseline is None) != (alert_drop is None):
        raise InvalidData(
            "--baseline and --alert-drop go together (the drop is measured against the baseline)"
        )
    drop = parse_points(alert_drop, "--alert-drop") if alert_drop is not None else None
    base = read_results(baseline) if baseline is not None else None
    golden = load_golden(golden_path)
    systems = systems_of(models, route, settings)
    who = tenant_of(tenant, settings)
    judges = sorted({str(i.judge["model"]) for i in golden.items if i.scorer == "judge"})
    for judge in judges:
        if judge not in settings.models and judge.removeprefix(ROUTE_PREFIX) not in settings.routes:
            raise InvalidData(f"the judge model {judge!r} is not in the settings' models")
    journal = Journal(journal_path(out), golden.fingerprint)
    try:
        todo = sum(1 for s in systems for i in golden.items if not journal.done(s, i.id))

        async def go() -> tuple[list[tuple[str, str]], list[Drift]]:
            with Progress(
                TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=console, transient=True, disable=todo == 0,
            ) as progress:  # fmt: skip
                task = progress.add_task("eval", total=todo)
                async with Gateway(settings, secrets=resolve_secrets(settings, os.environ)) as gateway:
                    if via == "batch":
                        from thrifty.evals.batch_path import run_eval_batch

                        await run_eval_batch(
                            gateway, golden, systems, journal, batches_path(out), tenant=who,
                            poll_s=min(settings.batch.poll_interval_s, 5.0),
                            on_done=lambda: progress.advance(task),
                        )  # fmt: skip
                        left: list[tuple[str, str]] = []
                    else:
                        left = await run_eval(
                            gateway, golden, systems, journal, tenant=who, concurrency=concurrency,
                            on_done=lambda: progress.advance(task),
                        )  # fmt: skip
                    drifts: list[Drift] = []
                    if base is not None and drop is not None:
                        now = summarise(golden, systems, journal.records, confidence)
                        drifts = pass_rate_drops(base, now, drop)
                        if gateway.alerts is not None:
                            gateway.alerts.fire(
                                [drift_alert(d, golden.path, journal.run_id, drop) for d in drifts]
                            )
                    return left, drifts

        pending, drifts = asyncio.run(go())
    finally:
        journal.close()
    results = summarise(golden, systems, journal.records, confidence)
    results["pending"] = [list(p) for p in sorted(pending)]
    results["drift"] = [
        {"model": d.model, "items": d.items, "baseline_rate": d.baseline_rate, "rate": d.rate} for d in drifts
    ]
    write_results(out, results)
    labelled = labelled_out or labelled_path(out)
    rows = write_zeroeval(labelled, golden, systems, journal.records, upstream_names(systems, settings))
    table = Table(*TABLE_HEADERS, title=f"eval of {golden.path} ({len(golden.items)} items)")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"results written to {out}; labelled outputs ({rows} rows, ZeroEval format) to {labelled}")
    for d in drifts:
        console.print(f"ALERT: {drift_message(d, golden.path)}", highlight=False)
    if pending:
        console.print(
            f"{len(pending)} call(s) were running when a previous run died and are refused by the gateway "
            "until their idempotency lease ends (idempotency.flight_lease_s, 15 s by default); run the "
            "same command again then",
            highlight=False,
        )
    return results


def gate_command(
    *,
    baseline: Path,
    candidate: Path,
    max_drop: str,
    confidence: float,
    max_cost_ratio: float | None,
    baseline_model: str | None,
    candidate_model: str | None,
) -> GateVerdict:
    if not 0.5 <= confidence < 1:
        raise InvalidData("--confidence must be in [0.5, 1)")
    if max_cost_ratio is not None and max_cost_ratio <= 0:
        raise InvalidData("--max-cost-ratio must be above 0")
    return gate(
        read_results(baseline),
        read_results(candidate),
        max_drop=parse_points(max_drop),
        confidence=confidence,
        max_cost_ratio=max_cost_ratio,
        baseline_model=baseline_model,
        candidate_model=candidate_model,
    )


__all__: Sequence[str] = ["gate_command", "run_command"]
