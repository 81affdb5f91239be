"""What the command modules share: the settings option, the console, the semantic-extra guard."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from thrifty.errors import ThriftyError
from thrifty.settings import Settings, load_settings

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="settings YAML (default ./thrifty.yaml)")
]
TargetQualityOpt = Annotated[
    float,
    typer.Option(help="quality relative to the reference that the thresholds are certified for"),
]
ConfidenceOpt = Annotated[
    float, typer.Option(help="confidence of the certified quality on new prompts of the seen tasks")
]
PricesOpt = Annotated[
    Path | None,
    typer.Option(
        help='JSON prices per model id, {"MODEL": {"input_per_mtok": .., "output_per_mtok": ..}}; '
        "models not in it are priced by genai-prices"
    ),
]


def console() -> Console:
    # Reports are wide; when piped (CI logs, files) do not squeeze them to 80 columns, unless the
    # caller says how wide (COLUMNS).
    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=160)


@contextlib.contextmanager
def semantic_extra(command: str) -> Iterator[None]:
    """A command that embeds texts: a missing semantic extra is the one-line install hint, exit 2."""
    from thrifty.cache.semantic import extra

    try:
        yield
    except (ImportError, extra.ModelNotInstalledError) as err:
        raise extra.missing(command, err) from err


def settings_path(config: Path | None) -> Path:
    path = config or (Path("thrifty.yaml") if Path("thrifty.yaml").exists() else None)
    if path is None:
        raise ThriftyError(
            "no settings: pass --config FILE or create ./thrifty.yaml (cp examples/thrifty.yaml thrifty.yaml)"
        )
    return path


def cli_settings(config: Path | None) -> Settings:
    return load_settings(settings_path(config))
