"""`thrifty eval run|gate`: golden sets through the gateway, and the regression gate for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from thrifty.cli_common import ConfigOpt
from thrifty.cli_common import cli_settings as _settings
from thrifty.cli_common import console as _console

eval_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Evals: golden sets through the gateway, and a regression gate",
)


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
