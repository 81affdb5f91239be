"""Spend reports over the ledger, summed exactly in Decimal."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from thrifty.stores.ports import LedgerReader
from thrifty.stores.readers import SqliteLedgerReader
from thrifty.types import decimal_text

GroupBy = Literal["tenant", "feature", "route", "prompt_version", "model", "day", "user", "variant"]
GROUP_COLUMNS: dict[str, str] = {
    "tenant": "tenant_id",
    "feature": "feature",
    "route": "route",
    "prompt_version": "prompt_version",
    "model": "model",
    "user": "user",
    "day": "ts",
}
# What `thrifty report --by` groups by: the rollups' dimensions, and those only a ledger scan
# answers (an experiment's arm, named within its route: "support/cheap").
REPORT_COLUMNS: dict[str, str] = {**GROUP_COLUMNS, "variant": "route || '/' || variant"}


@dataclass(slots=True)
class ReportRow:
    group: str | None  # None: the attribute was not set (JSON null, an empty CSV cell)
    requests: int = 0
    ok: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)
    error_cost_usd: Decimal = field(default_factory=Decimal)
    retry_cost_usd: Decimal = field(default_factory=Decimal)
    saved_usd: Decimal = field(default_factory=Decimal)
    rejected_budget: int = 0
    cache_hits: int = 0  # exact and semantic cache hits
    dedup_hits: int = 0  # idempotent repeats and coalesced duplicates (no upstream call either)
    batch_requests: int = 0  # items sent through a provider's batch API
    batch_cost_usd: Decimal = field(default_factory=Decimal)
    batch_saved_usd: Decimal = field(default_factory=Decimal)  # real-time price less the batch price
    escalated: int = 0
    unpriced: int = 0
    estimated: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    exact_saved_usd: Decimal = field(default_factory=Decimal)
    semantic_saved_usd: Decimal = field(default_factory=Decimal)
    context_tokens_saved: int = 0  # input tokens the context budgets took out (ledger column context)
    # Requests on routes with an output budget, and those of them cut off at max_tokens.
    output_budgeted: int = 0
    length_cutoffs: int = 0

    @property
    def success_rate(self) -> float:
        return self.ok / self.requests if self.requests else 0.0

    @property
    def cost_per_success(self) -> Decimal | None:
        # Failed requests' spend is part of what each success cost.
        return (self.cost_usd / self.ok) if self.ok else None

    def to_json(self) -> dict[str, Any]:
        cps = self.cost_per_success
        return {
            "group": self.group,
            "requests": self.requests,
            "ok": self.ok,
            "success_rate": round(self.success_rate, 6),
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            # Share of the input the providers served from their prompt caches (priced lower).
            "cached_input_share": round(self.cached_input_tokens / self.input_tokens, 6)
            if self.input_tokens
            else 0.0,
            "output_tokens": self.output_tokens,
            "cost_usd": decimal_text(self.cost_usd),
            "cost_per_success_usd": None if cps is None else decimal_text(cps.quantize(Decimal("1e-12"))),
            "error_cost_usd": decimal_text(self.error_cost_usd),
            "retry_cost_usd": decimal_text(self.retry_cost_usd),
            "saved_usd": decimal_text(self.saved_usd),
            "cache_hits": self.cache_hits,
            "cache_hit_rate": round(self.cache_hits / self.requests, 6) if self.requests else 0.0,
            "dedup_hits": self.dedup_hits,
            "dedup_rate": round(self.dedup_hits / self.requests, 6) if self.requests else 0.0,
            "batch_requests": self.batch_requests,
            "batch_share": round(self.batch_requests / self.requests, 6) if self.requests else 0.0,
            "batch_cost_usd": decimal_text(self.batch_cost_usd),
            # What the same batch items would have cost as real-time calls.
            "batch_realtime_usd": decimal_text(self.batch_cost_usd + self.batch_saved_usd),
            "escalated": self.escalated,
            "escalation_rate": round(self.escalated / self.requests, 6) if self.requests else 0.0,
            "budget_rejections": self.rejected_budget,
            "unpriced_requests": self.unpriced,
            "estimated_usage_requests": self.estimated,
            "exact_cache_hits": self.exact_hits,
            "semantic_cache_hits": self.semantic_hits,
            "exact_saved_usd": decimal_text(self.exact_saved_usd),
            "semantic_saved_usd": decimal_text(self.semantic_saved_usd),
            "context_tokens_saved": self.context_tokens_saved,
            "length_cutoff_rate": round(self.length_cutoffs / self.output_budgeted, 6)
            if self.output_budgeted
            else None,
        }


SINCE_FORMS = (
    "YYYY-MM-DD, an ISO time (2026-11-01T12:00 or with a zone), or a span back from now: 7d, 24h, 30m"
)


def parse_since(text: str | None) -> float | None:
    """`2026-11-01`, an ISO timestamp, or a relative `7d` / `24h` / `30m`."""
    if not text:
        return None
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[-1] in units and text[:-1].isdigit():
        return datetime.now(UTC).timestamp() - int(text[:-1]) * units[text[-1]]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time; give {SINCE_FORMS}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def build_report(
    source: sqlite3.Connection | LedgerReader,
    by: str,
    since: float | None = None,
    *,
    until: float | None = None,
    tenant: str | None = None,
) -> list[ReportRow]:
    """Scan the ledger (SQLite or PostgreSQL, through the LedgerReader port): rows with
    since <= ts < until (each optional), of one tenant if given."""
    if by not in REPORT_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(REPORT_COLUMNS)}")
    reader = SqliteLedgerReader(source) if isinstance(source, sqlite3.Connection) else source
    rows: dict[str | None, ReportRow] = {}
    for row_values in reader.report_rows(REPORT_COLUMNS[by], since, until, tenant):
        (
            key,
            status,
            inp,
            cached,
            out,
            cost,
            retry_cost,
            estimated,
            saved,
            http_status,
            cache,
            escalated,
            ctx_saved,
            finish_reason,
            batch,
        ) = row_values
        if by == "day":
            key = datetime.fromtimestamp(key, UTC).strftime("%Y-%m-%d")
        group = None if key is None else str(key)
        row = rows.get(group)
        if row is None:
            row = rows[group] = ReportRow(group)
        row.requests += 1
        row.input_tokens += inp
        row.cached_input_tokens += cached
        row.output_tokens += out
        row.estimated += estimated
        if status == "ok":
            row.ok += 1
        if cost is None:
            row.unpriced += 1
        else:
            amount = Decimal(cost)
            row.cost_usd += amount
            if status != "ok":
                row.error_cost_usd += amount
        if retry_cost is not None:
            row.retry_cost_usd += Decimal(retry_cost)
        if saved is not None:
            row.saved_usd += Decimal(saved)
            if cache == "exact":
                row.exact_saved_usd += Decimal(saved)
            elif cache == "semantic":
                row.semantic_saved_usd += Decimal(saved)
        if http_status == 429:
            row.rejected_budget += 1
        if cache == "dedup":
            row.dedup_hits += 1
        elif cache != "miss":
            row.cache_hits += 1
            row.exact_hits += cache == "exact"
            row.semantic_hits += cache == "semantic"
        row.escalated += escalated
        row.context_tokens_saved += ctx_saved
        if finish_reason is not None:
            row.output_budgeted += 1
            row.length_cutoffs += finish_reason == "length"
        if batch:
            row.batch_requests += 1
            row.batch_cost_usd += Decimal(cost or 0)
            row.batch_saved_usd += Decimal(saved or 0)
    return sorted(rows.values(), key=lambda r: (-r.cost_usd, r.group is None, r.group or ""))


def totals(rows: Iterable[ReportRow]) -> ReportRow:
    total = ReportRow("TOTAL")
    for r in rows:
        total.requests += r.requests
        total.ok += r.ok
        total.input_tokens += r.input_tokens
        total.cached_input_tokens += r.cached_input_tokens
        total.output_tokens += r.output_tokens
        total.cost_usd += r.cost_usd
        total.error_cost_usd += r.error_cost_usd
        total.retry_cost_usd += r.retry_cost_usd
        total.saved_usd += r.saved_usd
        total.rejected_budget += r.rejected_budget
        total.cache_hits += r.cache_hits
        total.dedup_hits += r.dedup_hits
        total.batch_requests += r.batch_requests
        total.batch_cost_usd += r.batch_cost_usd
        total.batch_saved_usd += r.batch_saved_usd
        total.escalated += r.escalated
        total.unpriced += r.unpriced
        total.estimated += r.estimated
        total.exact_hits += r.exact_hits
        total.semantic_hits += r.semantic_hits
        total.exact_saved_usd += r.exact_saved_usd
        total.semantic_saved_usd += r.semantic_saved_usd
        total.context_tokens_saved += r.context_tokens_saved
        total.output_budgeted += r.output_budgeted
        total.length_cutoffs += r.length_cutoffs
    return total


def to_csv(rows: list[ReportRow]) -> str:
    buf = io.StringIO()
    records = [r.to_json() for r in rows]
    fields = list(records[0]) if records else list(ReportRow("x").to_json())
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def render_table(rows: list[ReportRow], by: str, title: str | None = None, *, width: int = 160) -> Any:
    """The report as a table that fits `width` terminal columns: names and amounts are never cut;
    on a narrow terminal the least important columns are left out (the caption says which)."""
    from thrifty.tables import Column, fit_table, money_text

    columns = [
        Column(by, "left"),
        Column("requests"),
        Column("success", priority=10),
        Column("input tok", priority=8),
        Column("cached tok", priority=4),
        Column("output tok", priority=9),
        Column("cost USD"),
        Column("USD/success", priority=11),
        Column("error USD", priority=2),
        Column("retry USD", priority=1),
        Column("saved USD", priority=6),
        Column("cache hits", priority=7),
        Column("dedup", priority=5),
        Column("escalated", priority=3),
        Column("429s", priority=5),
        Column("ctx tok saved", priority=0),
    ]
    shown = [*rows, totals(rows)] if rows else []
    money = {
        "cost": money_text([r.cost_usd for r in shown]),
        "cps": money_text([_per_success(r) for r in shown]),
        "error": money_text([r.error_cost_usd for r in shown]),
        "retry": money_text([r.retry_cost_usd for r in shown]),
        "saved": money_text([r.saved_usd for r in shown]),
    }
    cells = []
    for n, r in enumerate(shown):
        cells.append(
            [
                "(none)" if r.group is None else r.group,
                f"{r.requests:,}",
                f"{r.success_rate:.1%}",
                f"{r.input_tokens:,}",
                f"{r.cached_input_tokens:,}",
                f"{r.output_tokens:,}",
                money["cost"][n] + ("*" if r.unpriced else ""),
                money["cps"][n] or "-",
                money["error"][n],
                money["retry"][n],
                money["saved"][n],
                f"{r.cache_hits / r.requests:.1%}" if r.requests else "-",
                f"{r.dedup_hits / r.requests:.1%}" if r.requests else "-",
                f"{r.escalated / r.requests:.1%}" if r.requests else "-",
                f"{r.rejected_budget:,}",
                f"{r.context_tokens_saved:,}",
            ]
        )
    return fit_table(columns, cells, width=width, title=title, section_after=len(rows) - 1 if rows else None)


def batch_line(rows: list[ReportRow]) -> str | None:
    """One line under the table: the batch share, its cost, and the same items in real time."""
    total = totals(rows)
    if not total.batch_requests:
        return None
    realtime = total.batch_cost_usd + total.batch_saved_usd
    return (
        f"batch: {total.batch_requests:,} of {total.requests:,} requests "
        f"({total.batch_requests / total.requests:.1%}) cost ${decimal_text(total.batch_cost_usd)}; "
        f"the same in real time: ${decimal_text(realtime)} (saved ${decimal_text(total.batch_saved_usd)})"
    )


def _per_success(row: ReportRow) -> Decimal | None:
    cps = row.cost_per_success
    return None if cps is None else cps.quantize(Decimal("1e-10"))
