"""The reconciliation as JSON and as a table."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from thrifty.planning.reconcile.compare import Difference, Reconciliation, Side
from thrifty.planning.reconcile.exports import Export
from thrifty.tables import Column, fit_table, money_text
from thrifty.types import decimal_text


def _share(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value.quantize(Decimal("1e-6")).normalize())


def _side_json(side: Side, count_name: str) -> dict[str, Any]:
    return {
        "cost_usd": decimal_text(side.cost_usd),
        "input_tokens": side.tokens.input,
        "cached_input_tokens": side.tokens.cached_input,
        "cache_write_tokens": side.tokens.cache_write,
        "output_tokens": side.tokens.output,
        count_name: side.calls,
        "batch": side.batch,
        "names": sorted(side.models),
    }


def to_json(rec: Reconciliation, export: Export, provider: str, *, skipped: list[str]) -> dict[str, Any]:
    return {
        "provider": provider,
        "export": export.file,
        "format": export.format,
        "measure": rec.measure,
        "compared_by": ["day", *(["model"] if rec.by_model else []), *(["scope"] if rec.by_scope else [])],
        "tolerance": decimal_text(rec.tolerance),
        "provider_total": decimal_text(rec.provider_total),
        "ledger_total": decimal_text(rec.ledger_total),
        "over_tolerance": len(rec.over),
        "rows": [_row_json(r) for r in rec.rows],
        "skipped_rows": skipped,
    }


def _row_json(r: Difference) -> dict[str, Any]:
    provider = _side_json(r.provider, "rows")
    ledger = _side_json(r.ledger, "calls")
    if r.ledger.unpriced:
        ledger["unpriced_calls"] = r.ledger.unpriced
    return {
        "day": r.day,
        "model": r.model,
        "scope": r.scope,
        "provider": provider,
        "ledger": ledger,
        "difference": decimal_text(r.difference),
        "difference_share": _share(r.share),
        "over_tolerance": r.over,
        "likely_causes": list(r.causes),
    }


def table(rec: Reconciliation, *, width: int, show_all: bool) -> Any:
    rows = list(rec.rows if show_all else rec.over)
    cost = rec.measure == "cost_usd"
    unit = "USD" if cost else "tokens"

    def values(side: str) -> list[str]:
        if cost:
            return money_text([getattr(r, side).cost_usd for r in rows])
        return [f"{getattr(r, side).token_total:,}" for r in rows]

    provider, ledger = values("provider"), values("ledger")
    diffs = money_text([r.difference for r in rows]) if cost else [f"{int(r.difference):+,}" for r in rows]
    columns = [Column("day", "left"), Column("model", "left")]
    if rec.by_scope:
        columns.append(Column("scope", "left"))
    columns += [
        Column(f"provider {unit}"),
        Column(f"gateway {unit}"),
        Column("difference"),
        Column("of provider's"),
        Column("", "left"),
        Column("likely cause", "left"),
    ]
    cells = []
    for i, r in enumerate(rows):
        head = [r.day, r.model] + ([r.scope or "-"] if rec.by_scope else [])
        cells.append(
            [
                *head,
                provider[i],
                ledger[i],
                diffs[i],
                "-" if r.share is None else f"{r.share * 100:.1f}%",
                "OVER" if r.over else "ok",
                "; ".join(r.causes),
            ]
        )
    return fit_table(columns, cells, width=width) if cells else None


def summary_line(rec: Reconciliation, export: Export) -> str:
    by = " x ".join(["day", *(["model"] if rec.by_model else []), *(["scope"] if rec.by_scope else [])])
    return (
        f"{export.file} ({export.format}) vs the ledger, by {by}: {len(rec.over)} of {len(rec.rows)} rows "
        f"differ by more than {(rec.tolerance * 100).normalize():f}%"
    )


def totals_line(rec: Reconciliation) -> str:
    if rec.measure == "cost_usd":
        p, led = money_text([rec.provider_total, rec.ledger_total])
        return f"totals: provider ${p}, gateway ${led}"
    return f"totals: provider {int(rec.provider_total):,} tokens, gateway {int(rec.ledger_total):,} tokens"
