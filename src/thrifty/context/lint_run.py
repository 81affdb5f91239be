"""`thrifty prompt lint`: reading the prompts and the traffic, printing the findings (I/O only)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from thrifty.context.lint import LintReport, lint, usd_per_token_day
from thrifty.context.sections import CountCache
from thrifty.errors import InvalidData, ThriftyError
from thrifty.pricing import PriceCatalog
from thrifty.settings import Settings
from thrifty.tokens import TokenCounter, encoding_for_model
from thrifty.types import Usage


def read_prompts(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, request body) for each distinct prompt in the file: a chat request or a list of
    messages (JSON), thrifty recordings or request bodies one per line (JSONL: one per distinct
    system/developer prompt, with how many lines used it), or plain text (a system prompt)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidData(f"cannot read {path}: {err}") from err
    if path.suffix == ".jsonl":
        bodies = (
            _body(_json(line, f"{path}:{n}"), f"{path}:{n}")
            for n, line in enumerate(raw.splitlines(), start=1)
            if line.strip()
        )
        return _distinct(bodies, f"{path}: no requests in the file")
    if path.suffix == ".json":
        return [(path.name, _body(_json(raw, str(path)), str(path)))]
    return [(path.name, {"messages": [{"role": "system", "content": raw}]})]


def _distinct(bodies: Iterable[dict[str, Any]], empty: str) -> list[tuple[str, dict[str, Any]]]:
    """One (label, first body) per distinct system/developer prompt, with how many requests used it."""
    groups: dict[str, tuple[dict[str, Any], int]] = {}
    for body in bodies:
        prompts = [m.get("content") for m in body["messages"] if m.get("role") in ("system", "developer")]
        key = orjson.dumps(prompts).decode()
        first, seen = groups.get(key, (body, 0))
        groups[key] = (first, seen + 1)
    if not groups:
        raise InvalidData(empty)
    return [(f"prompt {i + 1} ({seen} requests)", body) for i, (body, seen) in enumerate(groups.values())]


def recorded_prompts(
    settings: Settings, tenant: str, route: str, prompt_version: str | None, days: float
) -> list[tuple[str, dict[str, Any]]]:
    """The distinct prompts a route sent for a tenant over the last `days`, from its recordings (the
    ledger keeps no prompt text; a route with `record` keeps a sample of its requests, redacted)."""
    from thrifty.recording import read_recordings

    if route not in settings.routes:
        raise ThriftyError(f"--route: no route {route!r} in the settings")
    recordings = read_recordings(settings, tenant, route=route, since=time.time() - days * 86400)
    bodies = (
        _body(rec.request, f"recording {rec.request_id}")
        for rec in recordings
        if prompt_version is None or rec.prompt_version == prompt_version
    )
    hint = "" if settings.routes[route].record else f" (route {route!r} has no `record` setting)"
    return _distinct(
        bodies, f"no recordings of tenant {tenant!r} on route {route!r} in the last {days:g} days{hint}"
    )


def _json(text: str, where: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise InvalidData(f"{where}: not valid JSON ({err})") from err


def _body(data: Any, where: str) -> dict[str, Any]:
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InvalidData(f'{where}: expected a chat request ({{"messages": [...]}}) or a list of messages')
    return {
        "messages": messages,
        **({"tools": data["tools"]} if isinstance(data, dict) and "tools" in data else {}),
    }


def traffic(settings: Settings, route: str, prompt_version: str | None, days: float) -> tuple[float, str]:
    """Requests per day on the route (and prompt version) over the last `days`, from the ledger
    (through the reader port: the SQLite file or PostgreSQL, as `storage.url` says)."""
    from thrifty.stores.factory import open_reader

    if route not in settings.routes:
        raise ThriftyError(f"--route: no route {route!r} in the settings")
    reader = open_reader(settings, existing=True)
    try:
        n = reader.route_requests(route, time.time() - days * 86400, prompt_version)
    finally:
        reader.close()
    return n / days, settings.routes[route].model


def run_prompt_lint(
    path: Path | None,
    *,
    tenant: str | None = None,
    console: Console,
    settings: Settings | None = None,
    route: str | None = None,
    prompt_version: str | None = None,
    days: float = 7.0,
    requests_per_day: float | None = None,
    input_usd_per_mtok: Decimal | None = None,
    model: str = "gpt-4o",
    json_out: Path | None = None,
    as_json: bool = False,
) -> list[dict[str, Any]]:
    traffic_note = "no traffic given: pass --route with --config, or --requests-per-day and --input-price"
    if settings is not None and route is not None:
        requests_per_day, model = traffic(settings, route, prompt_version, days)
        catalog = PriceCatalog.from_settings(settings.models, settings.providers)
        price = catalog.cost(model, Usage(input_tokens=1_000_000))
        if price is None:
            raise ThriftyError(f"model {model!r} of route {route!r} has no known price")
        input_usd_per_mtok = price
        traffic_note = (
            f"route {route!r}: {requests_per_day:,.1f} requests/day over {days:g} days, {model} input"
        )
    per_token = (
        usd_per_token_day(requests_per_day, input_usd_per_mtok)
        if requests_per_day is not None and input_usd_per_mtok is not None
        else None
    )
    if per_token is not None and route is None:
        traffic_note = (
            f"{requests_per_day:,.1f} requests/day at ${input_usd_per_mtok} per million input tokens"
        )
    upstream = settings.models[model].upstream or model if settings and model in settings.models else model
    count = CountCache(TokenCounter(), encoding_for_model(upstream)[0])
    results = []
    if path is not None:
        prompts = read_prompts(path)
    elif settings is not None and route is not None and tenant is not None:
        prompts = recorded_prompts(settings, tenant, route, prompt_version, days)
    else:
        raise ThriftyError(
            "give a PROMPT file, or --config, --route and --tenant to lint a route's recordings"
        )
    for label, body in prompts:
        report = lint(body, count)
        results.append({"prompt": label, "traffic": traffic_note, **report.to_json(per_token)})
        if not as_json:
            _print(console, label, report, per_token, traffic_note)
    if as_json:
        console.print_json(orjson.dumps(results).decode())
    if json_out is not None:
        json_out.write_text(
            orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n", encoding="utf-8"
        )
    return results


def _print(console: Console, label: str, report: LintReport, per_token: Decimal | None, note: str) -> None:
    sections = ", ".join(f"{k} {v:,}" for k, v in report.sections.items() if v)
    console.print(f"{label}: {report.prompt_tokens:,} prompt tokens ({sections}); {note}")
    table = Table(title_justify="left")
    for name in ("finding", "where", "text", "tokens", "USD/day"):
        table.add_column(name, justify="right" if name in ("tokens", "USD/day") else "left")
    for f in report.findings:
        text = f.text if len(f.text) <= 70 else f.text[:67] + "..."
        table.add_row(
            f.kind,
            f.where,
            text + (f" ({f.note})" if f.note else ""),
            f"{f.tokens:,}",
            "-" if per_token is None else f"{per_token * f.tokens:.4f}",
        )
    if report.findings:
        console.print(table)
    else:
        console.print("no findings")
