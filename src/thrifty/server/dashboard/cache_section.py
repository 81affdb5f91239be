"""The dashboard's semantic cache table: the rows of `thrifty cache stats`, one per partition and a
summary per route (the viewer's own tenant only, filtered before it gets here). Values are escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

_COLUMNS = (
    "tenant",
    "route",
    "partition",
    "entries",
    "hit rate",
    "precision (95% CI)",
    "verified (wrong)",
    "feedback (wrong)",
    "verify $",
    "net saved $",
    "status",
    "threshold",
)


def _precision(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "-"
    low, high = p["ci95"]
    return f"{p['estimate']:.1%} ({low:.1%}-{high:.1%})"


def cache_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """The section's HTML; empty when no partition has recorded lookups (the section is left out)."""
    if not rows:
        return ""
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(str(v))}</td>"
            for v in (
                r["tenant_id"],
                r["route"],
                r["partition"],
                r["entries"],
                f"{r['hit_rate']:.1%}",
                _precision(r["precision"]),
                f"{r['verifications']} ({r['verified_wrong']})",
                f"{r['feedback']} ({r['feedback_wrong']})",
                r["verify_cost_usd"],
                r["net_saved_usd"],
                "paraphrases off" if r["status"] == "off" else r["status"],
                "-" if r["threshold"] is None else f"{r['threshold']:.4f}",
            )
        )
        + "</tr>"
        for r in rows
    )
    head = "".join(f"<th>{escape(c)}</th>" for c in _COLUMNS)
    return (
        '<section><h2>Semantic cache</h2><table id="semantic-cache">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


__all__ = ["cache_section"]
