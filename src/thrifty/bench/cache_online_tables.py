"""The tables and the SVG curve of `thrifty bench cache --online` (rendering only; the runs are dicts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table


def finite(value: float) -> float | str:
    """A JSON-safe number: infinity (a threshold that never answers) as "inf"."""
    return value if math.isfinite(value) else "inf"


def online_table(title: str, runs: Sequence[dict[str, Any]]) -> Table:
    table = Table(title=title)
    far = any(run.get("far_lookups") for run in runs)
    columns = ["stream", "rule", "hit rate", "precision", "in-scope precision", "OOS false hits"]
    columns += (
        ["of them far", "verified hits", "net saving", "final threshold"]
        if far
        else [
            "verified hits",
            "net saving",
            "final threshold",
        ]
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("stream", "rule") else "right")
    for run in runs:
        for kind in ("static_no_guard", "static", "online"):
            if kind not in run:
                continue
            t = run[kind]
            final = run["online_final"] if kind == "online" else {}
            thr = final.get("threshold", run["shipped_threshold"])
            table.add_row(
                run["name"],
                f"{kind}: {run['rule']}",
                f"{t['hit_rate']:.1%}",
                f"{t['precision']:.2%}",
                f"{t['in_scope_precision']:.2%}",
                f"{t['oos_false_hit_rate']:.2%}",
                *([f"{t['far_hits']} of {t['far_lookups']}"] if far else []),
                f"{t['verification_rate']:.1%}",
                f"{t['net_saving']:.1%}",
                (f"{thr:.4f}" if isinstance(thr, float) else str(thr))
                + (f" ({final['status']})" if final else ""),
            )
    return table


def curve_table(run: dict[str, Any]) -> Table:
    """The cumulative curve over the stream, as text."""
    table = Table(title=f"{run['name']}: cumulative over the stream (static | online)")
    for col in ("queries", "precision", "hit rate", "OOS false hits", "verified hits", "threshold"):
        table.add_column(col, justify="right")
    for s, o in zip(run["curve"]["static"], run["curve"]["online"], strict=True):
        thr = o.get("threshold")
        table.add_row(
            f"{o['queries']:,}",
            f"{s['precision']:.2%} | {o['precision']:.2%}",
            f"{s['hit_rate']:.1%} | {o['hit_rate']:.1%}",
            f"{s['oos_false_hit_rate']:.2%} | {o['oos_false_hit_rate']:.2%}",
            f"{o['verification_rate']:.1%}",
            f"{thr:.4f}" if isinstance(thr, float) else str(thr),
        )
    return table


def curve_svg(runs: Sequence[dict[str, Any]]) -> str:
    """Cumulative precision (top) and hit rate (bottom) of served hits over the stream, per run."""
    width, height, pad = 640, 420, 40
    panel = (height - 3 * pad) / 2
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{pad}" y="{pad - 12}">cumulative precision of served hits (0.95-1.00)</text>',
        f'<text x="{pad}" y="{2 * pad + panel - 12}">cumulative hit rate (0-1)</text>',
    ]
    for top, (lo, hi) in ((pad, (0.95, 1.0)), (2 * pad + panel, (0.0, 1.0))):
        out.append(
            f'<rect x="{pad}" y="{top}" width="{width - 2 * pad}" height="{panel}" '
            'fill="none" stroke="#999"/>'
        )
        for k, run in enumerate(runs):
            for kind, dash in (("static", "4,3"), ("online", "")):
                points = run["curve"][kind]
                if not points:
                    continue
                n = points[-1]["queries"]
                key = "precision" if lo > 0 else "hit_rate"
                xy = " ".join(
                    f"{pad + (width - 2 * pad) * p['queries'] / n:.1f},"
                    f"{top + panel * (1 - (min(hi, max(lo, p[key])) - lo) / (hi - lo)):.1f}"
                    for p in points
                )
                out.append(
                    f'<polyline points="{xy}" fill="none" stroke="{colours[k % len(colours)]}" '
                    f'stroke-width="1.5" stroke-dasharray="{dash}"/>'
                )
    for k, run in enumerate(runs):
        out.append(
            f'<text x="{width - pad - 170}" y="{pad + 14 + 13 * k}" fill="{colours[k % len(colours)]}">'
            f"{run['name']} (dashed: static)</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
