"""`thrifty cache tune|purge|stats`: learn the semantic cache's rule, remove entries, show its state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import orjson
import typer

from thrifty.cli_common import ConfigOpt
from thrifty.cli_common import cli_settings as _settings
from thrifty.cli_common import console as _console
from thrifty.cli_common import semantic_extra as _semantic_extra
from thrifty.errors import ThriftyError

cache_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Caching: tune the semantic cache, purge exact and semantic entries",
)


@cache_app.command("tune")
def cache_tune(
    data: Annotated[Path, typer.Option(help="labelled text,category CSV (e.g. your own traffic)")],
    target_precision: Annotated[float, typer.Option(help="e.g. 0.99")] = 0.99,
    out: Annotated[Path | None, typer.Option(help="write the learned parameters (JSON) here")] = None,
    z: Annotated[
        float,
        typer.Option(
            help="one-sided z of the precision lower bound the threshold must clear (0: point estimate)"
        ),
    ] = 3.0,
    density: Annotated[
        bool,
        typer.Option(
            help="also tune on sparse caches (random subsets of the data) and learn a threshold per "
            "cache size; --no-density: leave-one-out on the whole data only, one threshold"
        ),
    ] = True,
    scope_share: Annotated[
        float,
        typer.Option(
            help="out-of-scope lookups (texts of held-out categories, every hit wrong) as this share of "
            "the lookups; 0: none (the built-in rule used 0.1)",
            min=0.0,
            max=0.9,
        ),
    ] = 0.1,
) -> None:
    """Learn the semantic cache's decision parameters from labelled queries."""
    with _semantic_extra("thrifty cache tune"):
        from thrifty.bench.cache import tune_cache

        result = tune_cache(data, target_precision, z=z, density=density, scope_share=scope_share)
    params = result.params.to_dict()
    if params["threshold"] == "inf":
        typer.echo(
            f"warning: no threshold reaches precision {target_precision} on this data (at the z={z} "
            "lower bound); with these parameters the semantic cache never answers. Label more "
            "queries, lower the target or lower --z.",
            err=True,
        )
    typer.echo(
        f"fit (cross-fitted, leave-one-out lookups): hit rate {result.fit_hit_rate:.1%} at precision "
        f"{result.fit_precision:.2%}"
    )
    for point in result.by_size:
        never = point.threshold == float("inf")
        typer.echo(
            f"  cache of {point.size:>6,} entries: "
            + (
                "never hits (no threshold certified)"
                if never
                else f"threshold {point.threshold:.4f}, hit rate {point.hit_rate:.1%} at precision "
                f"{point.precision:.2%}"
            )
            + f" ({point.lookups:,} lookups)"
        )
    text = orjson.dumps(params, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(text)
        typer.echo(f"parameters written to {out}")
    else:
        typer.echo(text)


@cache_app.command("purge")
def cache_purge(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's entries")] = None,
    route: Annotated[str | None, typer.Option(help="only this route's entries")] = None,
    prompt_version: Annotated[str | None, typer.Option(help="only entries of this prompt version")] = None,
    corpus_version: Annotated[str | None, typer.Option(help="only entries of this corpus version")] = None,
    expired: Annotated[bool, typer.Option(help="only entries past their TTL")] = False,
    all_entries: Annotated[bool, typer.Option("--all", help="everything (required with no filter)")] = False,
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file (instead of --config)")] = None,
) -> None:
    """Remove exact- and semantic-cache entries by scope (a running gateway stops serving them at once)."""
    from thrifty.settings import StorageSettings
    from thrifty.stores.factory import purge_caches

    filters = (tenant, route, prompt_version, corpus_version)
    if all(f is None for f in filters) and not expired and not all_entries:
        raise ThriftyError(
            "give a scope (--tenant, --route, --prompt-version, --corpus-version, --expired) or --all"
        )
    settings = _settings(config) if db is None else None
    storage = settings.storage if settings is not None else StorageSettings(url=f"sqlite:///{db}")
    scope = {
        "tenant": tenant,
        "route": route,
        "prompt_version": prompt_version,
        "corpus_version": corpus_version,
    }
    # PostgreSQL storage: the entries every replica shares; SQLite: the one file.
    exact, semantic = purge_caches(storage, scope, time.time() if expired else None)
    typer.echo(
        f"purged {exact + semantic} cache entr{'y' if exact + semantic == 1 else 'ies'} "
        f"({exact} exact, {semantic} semantic)"
    )


@cache_app.command("stats")
def cache_stats(
    route: Annotated[str | None, typer.Option(help="only this route")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    config: ConfigOpt = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file (instead of the settings' storage)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Semantic cache by route and partition: hit rate, estimated precision (95% CI), verifications
    and their cost, savings net of verification, and the current thresholds."""
    from thrifty.cache.semantic.stats import stats_table
    from thrifty.cache.semantic.stored_stats import stored_partition_stats

    settings = _settings(config) if db is None or config is not None else None
    if settings is not None and route is not None and route not in settings.routes:
        known = ", ".join(sorted(settings.routes))
        raise ThriftyError(f"--route: no route {route!r} in the settings (routes: {known})")
    rows = stored_partition_stats(settings, path=db, tenant=tenant, route=route)
    if as_json:
        typer.echo(orjson.dumps([r.to_dict() for r in rows], option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        typer.echo("no semantic cache partition has recorded lookups on a route with semantic_cache.verify")
        return
    _console().print(stats_table(rows, with_thresholds=settings is not None))
