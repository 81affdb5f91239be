"""`thrifty prompt lint`: where a prompt's tokens go and what that costs a day."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from thrifty.cli_common import ConfigOpt
from thrifty.cli_common import cli_settings as _settings
from thrifty.cli_common import console as _console
from thrifty.errors import ThriftyError

prompt_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Prompts: where their tokens go and what that costs",
)


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
