"""The `thrifty estimate` and `thrifty reconcile` commands (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from thrifty.cli_common import ConfigOpt
from thrifty.errors import ThriftyError


def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text)


def estimate(
    spec: Annotated[Path | None, typer.Option(help="a YAML feature spec (flags override its values)")] = None,
    model: Annotated[str | None, _opt("model: a genai-prices id or a model of the settings")] = None,
    avg_input_tokens: Annotated[str | None, _opt("average input tokens per request")] = None,
    avg_output_tokens: Annotated[str | None, _opt("average output tokens per request")] = None,
    requests_per_day: Annotated[str | None, _opt("requests per day")] = None,
    days_per_month: Annotated[str | None, _opt("days in the month (default 30)")] = None,
    latency_class: Annotated[
        str | None, _opt("interactive (default) or deferrable (may wait for the batch API)")
    ] = None,
    cache_hit_rate: Annotated[
        str | None, _opt("share of requests the exact cache (or a deduplicated repeat) answers (0-1)")
    ] = None,
    semantic_hit_rate: Annotated[
        str | None, _opt("share of the requests left that the semantic cache answers (0-1)")
    ] = None,
    prompt_cache_share: Annotated[
        str | None, _opt("share of input tokens read from the provider's prompt cache (0-1)")
    ] = None,
    batch_share: Annotated[str | None, _opt("share of calls sent to the batch API (deferrable only)")] = None,
    batch_discount: Annotated[
        str | None, _opt("batch price = list price x (1 - this), for models without a batch price")
    ] = None,
    retry_factor: Annotated[str | None, _opt("upstream calls per request that reaches the provider")] = None,
    input_price: Annotated[
        str | None, _opt("USD per million input tokens (instead of the price source)")
    ] = None,
    output_price: Annotated[str | None, _opt("USD per million output tokens (with --input-price)")] = None,
    cascade_cheap_model: Annotated[str | None, _opt("cascade: the cheap tier tried first")] = None,
    cheap_success_rate: Annotated[str | None, _opt("cascade: share the cheap tier answers (0-1)")] = None,
    escalation_extra_input_tokens: Annotated[
        str | None, _opt("cascade: input tokens an escalation adds to the strong tier's prompt")
    ] = None,
    escalation_extra_output_tokens: Annotated[str | None, _opt("cascade: extra output tokens")] = None,
    gpu_usd_per_hour: Annotated[str | None, _opt("self-hosting: USD per GPU-hour")] = None,
    gpu_tokens_per_second: Annotated[
        str | None, _opt("self-hosting: input+output tokens/s one GPU serves at full load")
    ] = None,
    gpu_utilisation: Annotated[str | None, _opt("self-hosting: share of that throughput sustained")] = None,
    ops_usd_per_month: Annotated[str | None, _opt("self-hosting: fixed operations cost per month")] = None,
    vs: Annotated[list[str] | None, _opt("self-hosting: also compare this API model (repeatable)")] = None,
    ft_setup_usd: Annotated[str | None, _opt("fine-tuning: one-off setup cost (training, evals)")] = None,
    ft_usd_per_call: Annotated[str | None, _opt("fine-tuning: cost of a call after (or --ft-model)")] = None,
    ft_model: Annotated[str | None, _opt("fine-tuning: the tuned model, priced by the price source")] = None,
    ft_avg_input_tokens: Annotated[
        str | None, _opt("fine-tuning: input tokens per call after (shorter prompts)")
    ] = None,
    from_ledger: Annotated[
        bool, typer.Option("--from-ledger", help="take the averages and the month to date from the ledger")
    ] = False,
    feature: Annotated[
        str | None, _opt("the feature (x-thrifty-feature); required with --from-ledger")
    ] = None,
    tenant: Annotated[str | None, _opt("--from-ledger: only this tenant's requests")] = None,
    as_of: Annotated[str | None, _opt("--from-ledger: forecast as of this time (default now)")] = None,
    config: ConfigOpt = None,
    db: Annotated[Path | None, _opt("--from-ledger: ledger SQLite file (instead of the settings')")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table|json")] = "table",
) -> None:
    """Monthly cost of a feature from its average tokens, volume and model; a cascade's blended
    cost; caches, batch and retries; self-hosting break-even; fine-tuning payback; and with
    --from-ledger the month's forecast against the feature's budget (exit 1 when over by 20%)."""
    import dataclasses
    import time

    import orjson

    from thrifty.cli_common import console as make_console
    from thrifty.planning.estimate import build_estimate
    from thrifty.planning.spec import build_spec, merge, read_spec_file

    if fmt not in ("table", "json"):
        raise ThriftyError("--format must be table or json")
    flags = {
        "model": model,
        "avg_input_tokens": avg_input_tokens,
        "avg_output_tokens": avg_output_tokens,
        "requests_per_day": requests_per_day,
        "days_per_month": days_per_month,
        "latency_class": latency_class,
        "cache_hit_rate": cache_hit_rate,
        "semantic_hit_rate": semantic_hit_rate,
        "prompt_cache_share": prompt_cache_share,
        "batch_share": batch_share,
        "batch_discount": batch_discount,
        "retry_factor": retry_factor,
        "feature": feature,
    }
    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if (input_price is None) != (output_price is None):
        raise ThriftyError("give --input-price and --output-price together")
    if input_price is not None:
        given["price"] = {"input_per_mtok": input_price, "output_per_mtok": output_price}
    sections: dict[str, dict[str, Any]] = {
        "cascade": {
            "cheap_model": cascade_cheap_model,
            "cheap_success_rate": cheap_success_rate,
            "escalation_extra_input_tokens": escalation_extra_input_tokens,
            "escalation_extra_output_tokens": escalation_extra_output_tokens,
        },
        "self_hosting": {
            "gpu_usd_per_hour": gpu_usd_per_hour,
            "gpu_tokens_per_second": gpu_tokens_per_second,
            "utilisation": gpu_utilisation,
            "ops_usd_per_month": ops_usd_per_month,
            "compare": vs or None,
        },
        "fine_tuning": {
            "setup_usd": ft_setup_usd,
            "usd_per_call": ft_usd_per_call,
            "model": ft_model,
            "avg_input_tokens": ft_avg_input_tokens,
        },
    }
    for section, values in sections.items():
        present = {k: v for k, v in values.items() if v is not None}
        if present:
            given[section] = present

    data: dict[str, Any] = read_spec_file(spec) if spec is not None else {}
    settings = _optional_settings(config)
    ledger = None
    if from_ledger:
        from thrifty.planning.from_ledger import ledger_inputs
        from thrifty.report import parse_since

        name = feature or data.get("feature")
        if not name:
            raise ThriftyError("--from-ledger needs --feature F (the x-thrifty-feature the requests carry)")
        try:
            moment = parse_since(as_of) if as_of else time.time()
        except ValueError as err:
            raise ThriftyError(f"--as-of: {err}") from err
        assert moment is not None
        reader = _reader(config, db)
        try:
            ledger = ledger_inputs(reader, settings, str(name), tenant, moment)
        finally:
            reader.close()
        data = merge(data, {**ledger.values, "feature": name})
    elif tenant is not None or as_of is not None or db is not None:
        raise ThriftyError("--tenant, --as-of and --db go with --from-ledger")
    source = ", ".join(
        s
        for s in (str(spec) if spec else "", "the ledger" if from_ledger else "", "flags" if given else "")
        if s
    )
    feature_spec = build_spec(merge(data, given), source or "flags")
    report = build_estimate(feature_spec, settings)
    if ledger is not None:
        report = dataclasses.replace(report, forecasts=ledger.forecasts, ledger_note=ledger.note)
    if fmt == "json":
        typer.echo(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        from thrifty.planning.render import estimate_tables

        console = make_console()
        for part in estimate_tables(report, console.width):
            console.print(part, highlight=False, soft_wrap=isinstance(part, str))
    if report.over_budget:
        raise typer.Exit(1)


def _optional_settings(config: Path | None) -> Any:
    """The settings when --config is given or ./thrifty.yaml exists; the estimator works without."""
    from thrifty.cli_common import cli_settings

    if config is None and not Path("thrifty.yaml").exists():
        return None
    return cli_settings(config)


def _reader(config: Path | None, db: Path | None) -> Any:
    from thrifty.stores.factory import open_reader
    from thrifty.stores.readers import SqliteLedgerReader
    from thrifty.stores.sqlite_db import open_database

    if db is not None:
        if not db.exists():
            raise ThriftyError(f"no ledger at {db}")
        return SqliteLedgerReader(open_database(db))
    settings = _optional_settings(config)
    if settings is None:
        raise ThriftyError("no ledger: pass --db FILE or --config SETTINGS (or create ./thrifty.yaml)")
    if settings.storage.backend == "postgresql":
        return open_reader(settings)
    path = settings.storage.sqlite_path
    if not path.exists():
        raise ThriftyError(f"no ledger at {path}")
    return SqliteLedgerReader(open_database(path))


def _fraction(text: str, flag: str) -> Any:
    from decimal import Decimal, InvalidOperation

    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = Decimal(raw.removesuffix("%")) / (100 if percent else 1)
    except InvalidOperation:
        raise ThriftyError(f"{flag}: {text!r} is not a number (0.05 or 5%)") from None
    if not value.is_finite() or value < 0:
        raise ThriftyError(f"{flag}: {text!r} must be a number >= 0 (0.05 or 5%)")
    return value


def reconcile(
    provider: Annotated[str, typer.Option(help="whose export it is: openai|anthropic")],
    export: Annotated[Path, typer.Option(help="the provider's usage or cost export (JSON pages or CSV)")],
    config: ConfigOpt = None,
    db: Annotated[Path | None, _opt("ledger SQLite file (instead of the settings')")] = None,
    tolerance: Annotated[
        str, _opt("largest accepted difference, of the provider's figure (5% or 0.05)")
    ] = "5%",
    min_diff_usd: Annotated[str, _opt("cost differences up to this many USD are never flagged")] = "0.01",
    scope: Annotated[
        list[str] | None,
        _opt(
            "PROVIDER=ID: the API key, project or workspace id the settings' provider PROVIDER bills to "
            "(repeatable); compares per scope where the export has one"
        ),
    ] = None,
    gateway_provider: Annotated[
        list[str] | None,
        _opt(
            "count only this provider of the settings (repeatable; default: every provider of the "
            "--provider kind, e.g. leave out an OpenAI-compatible local server)"
        ),
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="compare without malformed export rows (listed on stderr)")
    ] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list every row, not only the differences")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table|json")] = "table",
) -> None:
    """Compare a provider's usage/cost export with the ledger per day x model (x API key, project or
    workspace), list differences above the tolerance with their likely cause; exit 1 when any is
    (for a scheduled job), 2 on malformed rows unless --skip-bad."""
    import sys
    from datetime import UTC, datetime, timedelta

    import orjson

    from thrifty.cli_common import console as make_console
    from thrifty.errors import InvalidData
    from thrifty.planning.reconcile import render
    from thrifty.planning.reconcile.compare import LedgerView
    from thrifty.planning.reconcile.compare import reconcile as compare
    from thrifty.planning.reconcile.exports import read_export

    if provider not in ("openai", "anthropic"):
        raise ThriftyError("--provider must be openai or anthropic")
    if fmt not in ("table", "json"):
        raise ThriftyError("--format must be table or json")
    tol = _fraction(tolerance, "--tolerance")
    floor = _fraction(min_diff_usd, "--min-diff-usd")
    settings = _optional_settings(config)
    if settings is None and db is None:
        raise ThriftyError("no ledger: pass --config SETTINGS (or create ./thrifty.yaml), or --db FILE")
    scopes: dict[str, str] = {}
    for item in scope or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ThriftyError(f"--scope {item!r}: give PROVIDER=ID (e.g. openai=proj_abc123)")
        if settings is not None and name not in settings.providers:
            known = ", ".join(sorted(settings.providers))
            raise ThriftyError(f"--scope {item!r}: no provider {name!r} in the settings (known: {known})")
        scopes[name] = value
    for name in gateway_provider or []:
        if settings is not None and name not in settings.providers:
            known = ", ".join(sorted(settings.providers))
            raise ThriftyError(
                f"--gateway-provider {name!r}: no such provider in the settings (known: {known})"
            )
    try:
        text = export.read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidData(f"cannot read the export {export}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise InvalidData(
            f"{export} is not UTF-8 text (offset {err.start}): give the export as downloaded"
        ) from err
    parsed = read_export(text, str(export), "openai" if provider == "openai" else "anthropic")
    skipped = [str(b) for b in parsed.bad]
    if skipped and not skip_bad:
        for line in skipped[:50]:
            typer.echo(line, err=True)
        if len(skipped) > 50:
            typer.echo(f"... and {len(skipped) - 50} more", err=True)
        raise InvalidData(
            f"{len(skipped)} malformed row{'s' if len(skipped) != 1 else ''} in {export} (listed above); "
            "fix them, or pass --skip-bad to compare without them"
        )
    if not parsed.records:
        raise InvalidData(f"{export}: no usage or cost rows to compare")
    days = parsed.days
    since = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
    until = datetime.fromisoformat(days[-1]).replace(tzinfo=UTC) + timedelta(days=1)
    view = LedgerView(
        provider_kind=provider,
        model_ids={a: m.upstream or a for a, m in settings.models.items()} if settings else {},
        provider_kinds={n: p.kind for n, p in settings.providers.items()} if settings else {},
        scopes=scopes,
        only=frozenset(gateway_provider) if gateway_provider else None,
    )
    reader = _reader(config, db)
    try:
        rows = list(reader.usage_rows(since.timestamp(), until.timestamp()))
    finally:
        reader.close()
    result = compare(parsed, rows, view, tolerance=tol, min_diff_usd=floor)
    if fmt == "json":
        doc = render.to_json(result, parsed, provider, skipped=skipped)
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        console = make_console()
        console.print(render.summary_line(result, parsed), highlight=False, soft_wrap=True)
        shown = render.table(result, width=console.width, show_all=show_all)
        if shown is not None:
            console.print(shown, highlight=False)
        console.print(render.totals_line(result), highlight=False)
    if skipped:
        print(
            f"skipped {len(skipped)} malformed row{'s' if len(skipped) != 1 else ''} (--skip-bad): "
            + "; ".join(skipped[:20])
            + (f"; ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""),
            file=sys.stderr,
        )
    if result.over:
        raise typer.Exit(1)
