"""Charts drawn on the server as SVG: no script, no external asset, readable with JS off.

Amounts arrive as exact decimal text; they become floats only for drawing. Every bar carries a
<title> with its exact value, and each chart is followed on the page by a table of the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f", "#bab0ac")


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    if value < 1:
        magnitude = 1.0
        while magnitude / 10 >= value:
            magnitude /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _tick(value: float) -> str:
    return f"{value:.6g}"


def stacked_bars(
    labels: Sequence[str],
    stacks: Sequence[tuple[str, Sequence[Decimal]]],
    *,
    title: str,
    unit: str = "USD",
    width: int = 960,
    height: int = 280,
) -> str:
    """One bar per label, each split into the stacks' values (stacks: (name, one value per label))."""
    left, right, top, bottom = 70, 10, 10, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum((s[1][i] for s in stacks), Decimal(0)) for i in range(len(labels))]
    y_max = _nice_max(float(max(totals, default=Decimal(0))))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):
        value = y_max * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_tick(value)}</text>'
        )
    n = max(len(labels), 1)
    slot = plot_w / n
    bar_w = max(slot * 0.8, 1.0)
    label_every = max(1, n // 12)
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h
        for s, (name, values) in enumerate(stacks):
            amount = values[i]
            if amount <= 0:
                continue
            h = plot_h * float(amount) / y_max
            y -= h
            parts.append(
                f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{bar_w:.2f}" height="{h:.2f}" '
                f'fill="{PALETTE[s % len(PALETTE)]}" data-group="{escape(name)}" data-value="{amount}">'
                f"<title>{escape(label)} · {escape(name)}: {amount} {escape(unit)}</title></rect>"
            )
        if i % label_every == 0:
            parts.append(
                f'<text x="{left + i * slot + slot / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                f'class="tick">{escape(label)}</text>'
            )
    parts.append(f'<text x="{left}" y="{height - 6}" class="tick">{escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>{escape(name)}</li>'
        for i, name in enumerate(names)
    )
    return f'<ul class="legend">{items}</ul>'


def meter(share: float | None) -> str:
    """A horizontal use-vs-limit bar."""
    share = max(0.0, min(share or 0.0, 1.0))
    colour = "#e15759" if share >= 1 else "#f28e2b" if share >= 0.8 else "#59a14f"
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" class="meter" width="160" height="12" viewBox="0 0 160 12">'
        '<rect width="160" height="12" fill="#eee"/>'
        f'<rect width="{160 * share:.1f}" height="12" fill="{colour}"/>'
        "</svg>"
    )
