"""`thrifty route train`: a cascade router learned from labelled per-model outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from thrifty.cli_common import ConfidenceOpt, PricesOpt, TargetQualityOpt
from thrifty.cli_common import console as _console

route_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="Routing: train a router from labelled outputs"
)


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
