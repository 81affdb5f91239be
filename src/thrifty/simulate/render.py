"""The savings stack as a table, as JSON, and as an SVG chart drawn here (no network, no library)."""

from __future__ import annotations

from decimal import Decimal
from html import escape
from typing import Any

from rich.table import Table

from thrifty.simulate.stack import LayerReport, StackReport


def _pct(part: Decimal, whole: Decimal) -> float | None:
    return float(part / whole * 100) if whole else None


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _status(layer: LayerReport) -> str:
    if not layer.configured:
        return "not configured"
    if layer.uninformed and layer.affected == 0:
        return "traffic cannot inform it"
    return "measured"


def stack_table(report: StackReport, title: str = "savings stack") -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("layer", "left"),
        ("cost after", "right"),
        ("saving $", "right"),
        ("% of baseline", "right"),
        ("% of remaining", "right"),
        ("requests affected", "right"),
        ("quality", "left"),
        ("status", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_row("baseline", f"${report.baseline_cost:.6f}", "", "", "", f"{report.requests:,}", "", "")
    for layer in report.layers:
        table.add_row(
            layer.title,
            f"${layer.cost_after:.6f}",
            f"${layer.saving:.6f}" if layer.configured else "-",
            _fmt_pct(_pct(layer.saving, report.baseline_cost)) if layer.configured else "-",
            _fmt_pct(_pct(layer.saving, layer.cost_before)) if layer.configured else "-",
            f"{layer.affected:,}" if layer.configured else "-",
            layer.quality.text if layer.quality is not None else "",
            _status(layer),
        )
    saved = report.baseline_cost - report.final_cost
    table.add_row(
        "[bold]candidate[/bold]",
        f"[bold]${report.final_cost:.6f}[/bold]",
        f"[bold]${saved:.6f}[/bold]",
        f"[bold]{_fmt_pct(_pct(saved, report.baseline_cost))}[/bold]",
        "",
        "",
        "",
        "",
    )
    return table


def stack_notes(report: StackReport) -> list[str]:
    lines = []
    for layer in report.layers:
        if layer.detail:
            parts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in layer.detail.items())
            lines.append(f"{layer.title}: {parts}")
        for note in layer.notes:
            lines.append(f"{layer.title}: {note}")
    if report.unrecorded:
        lines.append(
            f"{report.unrecorded} requests have no recorded answer at all: "
            "they fail in every step and cost $0"
        )
    if report.failed:
        lines.append(
            f"{report.failed} requests were refused in the baseline already (cost $0 there), e.g.: "
            f"{report.failed_example}"
        )
    if report.recorded_failures:
        answered = report.recorded_failures_answered
        by_layer = f"; {answered} of them answered by a layer of the candidate first" if answered else ""
        lines.append(
            f"{report.recorded_failures} requests failed when recorded (upstream errors, refusals): "
            f"replayed as failures, at what the ledger charges for them{by_layer}"
        )
    if report.recorded_deferred:
        missing = report.recorded_deferred_unanswered
        lines.append(
            f"{report.recorded_deferred} requests went to a batch when recorded: answered now where the "
            "route does not defer, deferred where the candidate's does"
            + (f"; {missing} without a recorded batch answer (not guessed)" if missing else "")
        )
    if report.unpriced:
        lines.append(f"{report.unpriced} answered requests are on models without a price (counted as $0)")
    lines.extend(report.notes)
    if report.skipped:
        lines.append(f"{len(report.skipped)} bad traffic lines skipped (--skip-bad)")
    return lines


def stack_json(report: StackReport) -> dict[str, Any]:
    base = report.baseline_cost
    return {
        "requests": report.requests,
        "baseline_cost_usd": str(base),
        "final_cost_usd": str(report.final_cost),
        "saving_usd": str(base - report.final_cost),
        "saving_pct": _pct(base - report.final_cost, base),
        "layers": [
            {
                "layer": layer.key,
                "title": layer.title,
                "configured": layer.configured,
                "status": _status(layer),
                "cost_before_usd": str(layer.cost_before),
                "cost_after_usd": str(layer.cost_after),
                "saving_usd": str(layer.saving),
                "saving_pct_of_baseline": _pct(layer.saving, base),
                "saving_pct_of_remaining": _pct(layer.saving, layer.cost_before),
                "requests_affected": layer.affected,
                "detail": layer.detail,
                "uninformed_requests": layer.uninformed,
                "uninformed_for_want_of": layer.uninformed_models,
                "quality": layer.quality.to_json() if layer.quality is not None else None,
                "notes": layer.notes,
            }
            for layer in report.layers
        ],
        "unrecorded_requests": report.unrecorded,
        "unpriced_requests": report.unpriced,
        "refused_in_baseline": report.failed,
        "recorded_failures": report.recorded_failures,
        "recorded_failures_answered": report.recorded_failures_answered,
        "recorded_deferred": report.recorded_deferred,
        "recorded_deferred_unanswered": report.recorded_deferred_unanswered,
        "notes": report.notes,
        "skipped_lines": report.skipped,
        "seconds": report.seconds,
        "ledger_totals_usd": report.ledger_totals,
    }


def stack_svg(report: StackReport, title: str = "thrifty savings stack") -> str:
    """A waterfall: the baseline bar, each layer's saving taken off it, the candidate's cost."""
    width, left, right, row, top = 860, 190, 200, 30, 44
    bars: list[tuple[str, Decimal, Decimal, LayerReport | None]] = [
        ("baseline", report.baseline_cost, Decimal(0), None)
    ]
    bars += [(layer.title, layer.cost_after, layer.saving, layer) for layer in report.layers]
    bars.append(("candidate", report.final_cost, Decimal(0), None))
    height = top + row * len(bars) + 30
    scale = float(width - left - right) / float(report.baseline_cost or 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="12" y="24" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (name, after, saving, layer) in enumerate(bars):
        y = top + i * row
        kept = float(after) * scale
        out.append(f'<text x="12" y="{y + 19}">{escape(name)}</text>')
        colour = "#4a6fa5" if layer is None else "#9db4d6"
        out.append(f'<rect x="{left}" y="{y + 5}" width="{kept:.1f}" height="{row - 10}" fill="{colour}"/>')
        if layer is not None and saving > 0:
            out.append(
                f'<rect x="{left + kept:.1f}" y="{y + 5}" width="{float(saving) * scale:.1f}" '
                f'height="{row - 10}" fill="#5cb85c"/>'
            )
        if layer is None:
            label = f"${after:.4f}"
        elif not layer.configured:
            label = "not configured"
        elif layer.uninformed and not layer.affected:
            label = "traffic cannot inform it"
        else:
            pct = _pct(saving, report.baseline_cost)
            label = f"-${saving:.4f} ({_fmt_pct(pct)})"
        out.append(f'<text x="{width - right + 10}" y="{y + 19}">{escape(label)}</text>')
    out.append(
        f'<text x="12" y="{height - 10}" fill="#666">{report.requests:,} requests replayed through the '
        "candidate's pipeline; green: the layer's saving</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


__all__ = ["stack_json", "stack_notes", "stack_svg", "stack_table"]
