"""The estimate as tables that fit the terminal (amounts never cut)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from thrifty.planning.estimate import EstimateReport
from thrifty.tables import Column, fit_table, money_text


def _num(value: Decimal | None, places: int = 0) -> str:
    if value is None:
        return "never"
    return f"{value:,.{places}f}"


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def estimate_tables(report: EstimateReport, width: int) -> list[Any]:
    """Lines and tables, in order, for console.print."""
    spec, m, p = report.spec, report.monthly, report.prices.realtime
    out: list[Any] = []
    name = spec.feature or "feature"
    out.append(
        f"{name}: {_num(spec.avg_input_tokens)} in / {_num(spec.avg_output_tokens)} out tokens x "
        f"{_num(spec.requests_per_day)} requests/day x {_num(spec.days_per_month)} days on {spec.model} at "
        f"${p.input}/${p.output} per Mtok in/out ({report.prices.source}); "
        f"${money_text([m.cost_per_request])[0]} a request, ${money_text([m.daily_usd])[0]} a day"
    )
    rows = [("list price", m.monthly_usd, None), *((s.name, s.monthly_usd, s.delta_usd) for s in m.steps)]
    if m.steps:
        rows.append(("estimate", m.adjusted_monthly_usd, m.adjusted_monthly_usd - m.monthly_usd))
    month = money_text([r[1] for r in rows])
    delta = money_text([r[2] for r in rows])
    out.append(
        fit_table(
            [Column("month", "left"), Column("USD/month"), Column("change USD")],
            [[r[0], month[i], delta[i]] for i, r in enumerate(rows)],
            width=width,
            title=f"monthly cost ({_num(spec.days_per_month)} days)",
            section_after=len(rows) - 2 if m.steps else None,
        )
    )
    if report.cascade is not None and spec.cascade is not None:
        c = report.cascade
        per = money_text(
            [
                c.cheap_cost_per_request,
                c.escalation_cost_per_request,
                c.blended_cost_per_request,
                c.strong_only_cost_per_request,
            ]
        )
        monthly = money_text([None, None, c.blended_monthly_usd, c.strong_only_monthly_usd])
        labels = [
            f"{spec.cascade.cheap_model} (every request)",
            f"{spec.model} escalation ({_pct(1 - spec.cascade.cheap_success_rate)} of requests)",
            "cascade, blended",
            f"{spec.model} alone",
        ]
        out.append(
            fit_table(
                [Column("tier", "left"), Column("USD/request"), Column("USD/month")],
                [[labels[i], per[i], monthly[i]] for i in range(4)],
                width=width,
                title=f"cascade: saves ${money_text([c.saving_usd])[0]} a month ({_pct(c.saving_share)})",
            )
        )
    if report.break_even:
        b = report.break_even
        api = money_text([x.api_monthly_usd for x in b])
        own = money_text([x.self_hosted_monthly_usd for x in b])
        rate = money_text([x.api_usd_per_mtok for x in b])
        out.append(
            fit_table(
                [
                    Column("API model", "left"),
                    Column("USD/Mtok"),
                    Column("API USD/month"),
                    Column("self-hosted USD/month"),
                    Column("GPUs", priority=1),
                    Column("break-even Mtok/month"),
                    Column("break-even requests/day"),
                ],
                [
                    [
                        x.model,
                        rate[i],
                        api[i],
                        own[i],
                        str(x.self_hosted_gpus),
                        _num(
                            None
                            if x.break_even_tokens_per_month is None
                            else x.break_even_tokens_per_month / 1_000_000,
                            1,
                        ),
                        _num(x.break_even_requests_per_day),
                    ]
                    for i, x in enumerate(b)
                ],
                width=width,
                title="self-hosting break-even (at the feature's in/out mix)",
            )
        )
    if report.payback is not None:
        f = report.payback
        cells = money_text([f.cost_per_call_before, f.cost_per_call_after, f.saving_per_call])
        payback = "never (no saving per call)" if f.payback_days is None else f"{f.payback_days:,.1f} days"
        out.append(
            f"fine-tuning: ${cells[0]} -> ${cells[1]} a call (saves ${cells[2]}); setup "
            f"${money_text([f.setup_usd])[0]} pays back after {_num(f.break_even_calls)} calls: {payback}; "
            f"then ${money_text([f.monthly_saving_usd])[0]} a month"
        )
    if report.forecasts:
        rows_f = report.forecasts
        mtd = money_text([r.forecast.month_to_date_usd for r in rows_f])
        fc = money_text([r.forecast.forecast_usd for r in rows_f])
        budget = money_text([r.forecast.budget_usd for r in rows_f])
        out.append(
            fit_table(
                [
                    Column("tenant", "left"),
                    Column("month to date USD"),
                    Column("forecast USD"),
                    Column("budget USD"),
                    Column("of budget"),
                    Column("flag", "left"),
                ],
                [
                    [
                        r.tenant,
                        mtd[i],
                        fc[i],
                        budget[i] or "-",
                        _pct(r.forecast.budget_share),
                        "OVER BUDGET (>20%)" if r.forecast.over_budget else "",
                    ]
                    for i, r in enumerate(rows_f)
                ],
                width=width,
                title=f"{spec.feature}: the month forecast from "
                f"{rows_f[0].forecast.elapsed_days:.2f} of {rows_f[0].forecast.days_in_month} days",
            )
        )
    if report.ledger_note:
        out.append(report.ledger_note)
    return out
