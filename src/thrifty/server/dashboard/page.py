"""The dashboard page: one server-rendered HTML document with inline SVG charts and plain tables.

No script at all: filters are a GET form, request details are <details> elements, so the page
works with JavaScript off. Every value put in the page is HTML-escaped (feature names, users and
prompt versions come from request headers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from thrifty.server.dashboard.cache_section import cache_section
from thrifty.server.dashboard.data import DIMENSIONS, MAX_STACKS, RANGES, day_or_hour
from thrifty.server.dashboard.svg import legend, meter, stacked_bars

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center;
flex-wrap:wrap}
header h1{font-size:18px;margin:0}header a{color:#cde}
form.filters{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
main{padding:10px 20px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:10px 14px}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;font-size:13px}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:140px}
.card b{display:block;font-size:18px}.card span{color:#666;font-size:12px}
.chart .grid{stroke:#e5e5e5}.chart .tick{font-size:11px;fill:#555}
.legend{list-style:none;display:flex;gap:12px;flex-wrap:wrap;padding:0;margin:6px 0}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px}.cols>div{overflow-x:auto}
.muted{color:#777}details summary{cursor:pointer}.error{color:#b00}
"""

_REPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("requests", "requests"),
    ("ok", "ok"),
    ("cost_usd", "cost USD"),
    ("cost_per_success_usd", "USD / success"),
    ("error_cost_usd", "error USD"),
    ("retry_cost_usd", "retry USD"),
    ("cache_hits", "cache hits"),
    ("exact_cache_hits", "exact"),
    ("semantic_cache_hits", "semantic"),
    ("saved_usd", "saved USD"),
    ("escalation_rate", "escalation rate"),
    ("budget_rejections", "429s"),
    ("batch_share", "batch share"),
    ("context_tokens_saved", "ctx tok saved"),
    ("input_tokens", "input tok"),
    ("cached_input_tokens", "cached tok"),
    ("output_tokens", "output tok"),
)


def _name(group: Any) -> str:
    return "(none)" if group is None else str(group)


def _cell(field: str, value: Any) -> str:
    shown = "-" if value is None else str(value)
    return f'<td data-field="{field}">{escape(shown)}</td>'


def report_table(
    table_id: str,
    by: str,
    rows: Sequence[Mapping[str, Any]],
    total: Mapping[str, Any] | None,
    columns: Sequence[tuple[str, str]] = _REPORT_COLUMNS,
) -> str:
    head = "".join(f"<th>{escape(label)}</th>" for _, label in columns)
    body = []
    for row in rows:
        cells = "".join(_cell(f, row.get(f)) for f, _ in columns)
        body.append(
            f'<tr data-group="{escape(_name(row["group"]))}">'
            f"<td>{escape(_name(row['group']))}</td>{cells}</tr>"
        )
    if total is not None:
        cells = "".join(_cell(f, total.get(f)) for f, _ in columns)
        body.append(f'<tr class="total" data-group="TOTAL"><th>TOTAL</th>{cells}</tr>')
    if not rows:
        body.append(
            f'<tr><td colspan="{len(columns) + 1}" class="muted">no requests in this window</td></tr>'
        )
    return (
        f'<table id="{table_id}"><thead><tr><th>{escape(by)}</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _stacks(series: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list[Decimal]]]]:
    labels = [day_or_hour(b, series["bucket"]) for b in series["buckets"]]
    groups = series["series"]
    shown = [(_name(g["group"]), [Decimal(v) for v in g["cost_usd"]]) for g in groups[:MAX_STACKS]]
    rest = groups[MAX_STACKS:]
    if rest:
        other = [sum((Decimal(g["cost_usd"][i]) for g in rest), Decimal(0)) for i in range(len(labels))]
        shown.append((f"other ({len(rest)})", other))
    return labels, shown


def spend_chart(chart_id: str, series: Mapping[str, Any], title: str) -> str:
    labels, stacks = _stacks(series)
    return (
        f'<figure id="{chart_id}">{stacked_bars(labels, stacks, title=title)}'
        f"{legend([name for name, _ in stacks])}</figure>"
    )


def _select(
    name: str, options: Iterable[str], current: str | None, labels: Mapping[str, str] | None = None
) -> str:
    opts = "".join(
        f'<option value="{escape(o)}"{" selected" if o == current else ""}>'
        f"{escape((labels or {}).get(o, o))}</option>"
        for o in options
    )
    return f'<label>{escape(name)} <select name="{escape(name)}">{opts}</select></label>'


def _cards(total: Mapping[str, Any]) -> str:
    items = [
        ("spend USD", "cost_usd"),
        ("requests", "requests"),
        ("USD per success", "cost_per_success_usd"),
        ("error USD", "error_cost_usd"),
        ("retry USD", "retry_cost_usd"),
        ("cache hits (exact / semantic)", None),
        ("saved USD (exact / semantic)", None),
        ("budget 429s", "budget_rejections"),
        ("escalation rate", "escalation_rate"),
        ("batch share (batch USD / same in real time)", None),
        ("context tokens saved", "context_tokens_saved"),
    ]
    out = []
    for label, field in items:
        if field is None and label.startswith("cache"):
            value = f"{total['cache_hits']} ({total['exact_cache_hits']} / {total['semantic_cache_hits']})"
            field = "cache_hits"
        elif field is None and label.startswith("batch"):
            value = f"{total['batch_share']} ({total['batch_cost_usd']} / {total['batch_realtime_usd']})"
            field = "batch_share"
        elif field is None:
            value = f"{total['saved_usd']} ({total['exact_saved_usd']} / {total['semantic_saved_usd']})"
            field = "saved_usd"
        else:
            value = "-" if total.get(field) is None else str(total[field])
        out.append(
            f'<div class="card" data-field="{field}"><b>{escape(value)}</b><span>{escape(label)}</span></div>'
        )
    return f'<div class="cards" id="totals">{"".join(out)}</div>'


def _rejections_chart(series: Mapping[str, Any]) -> str:
    labels = [day_or_hour(b, series["bucket"]) for b in series["buckets"]]
    values = [Decimal(v) for v in series["budget_rejections"]]
    rows = "".join(
        f'<tr><td>{escape(label)}</td><td data-field="budget_rejections">{int(v)}</td></tr>'
        for label, v in zip(labels, values, strict=True)
        if v
    )
    return (
        '<figure id="rejections-chart">'
        + stacked_bars(labels, [("429s", values)], title="budget rejections", unit="requests", height=160)
        + "</figure>"
        + f'<details><summary>429s per {escape(series["bucket"])}</summary><table id="rejections">'
        f"<thead><tr><th>{escape(series['bucket'])}</th><th>429s</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )


def _budgets(budgets: Sequence[Mapping[str, Any]]) -> str:
    if not budgets:
        return '<p class="muted">no budgets in the settings for this view</p>'
    rows = "".join(
        f'<tr data-scope="{escape(b["scope"])}"><td>{escape(b["scope"])}</td><td>{escape(b["window"])}</td>'
        f'<td>{escape(b["unit"])}</td><td data-field="used">{escape(b["used"])}</td>'
        f'<td data-field="limit">{escape(b["limit"])}</td><td>{meter(b["used_share"])}</td>'
        f"<td>{escape(b['resets_at_iso'])}</td></tr>"
        for b in budgets
    )
    return (
        '<table id="budgets"><thead><tr><th>scope</th><th>window</th><th>unit</th><th>used</th><th>limit</th>'
        f"<th>use</th><th>resets at</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _alerts(alerts: Sequence[Mapping[str, Any]]) -> str:
    if not alerts:
        return '<p class="muted">no alerts in this window</p>'
    rows = "".join(
        f"<tr><td>{escape(a['ts_iso'])}</td><td>{escape(a['kind'])}</td><td>{escape(a['scope'])}</td>"
        f'<td style="text-align:left">{escape(a["message"])}</td><td>{escape(a["delivery"])}</td></tr>'
        for a in alerts
    )
    return (
        '<table id="alerts"><thead><tr><th>time</th><th>kind</th><th>scope</th><th>message</th>'
        f"<th>delivery</th></tr></thead><tbody>{rows}</tbody></table>"
    )


_ATTEMPT_COLUMNS = (
    "role",
    "model",
    "status",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
    "gate",
    "error",
)


def _requests(data: Mapping[str, Any], link: str) -> str:
    rows = []
    for r in data["requests"]:
        attempts = "".join(
            "<tr>" + "".join(_cell(c, a.get(c)) for c in _ATTEMPT_COLUMNS) + "</tr>" for a in r["attempts"]
        )
        head = "".join(f"<th>{c}</th>" for c in _ATTEMPT_COLUMNS)
        rows.append(
            f'<tr data-request="{escape(r["request_id"])}"><td>{escape(r["ts_iso"])}</td>'
            f"<td>{escape(r['tenant_id'])}</td><td>{escape(_name(r['feature']))}</td>"
            f"<td>{escape(_name(r['route']))}</td><td>{escape(_name(r['model']))}</td>"
            f"<td>{escape(r['status'])} {r['http_status']}</td><td>{escape(r['cache'])}</td>"
            f"{_cell('cost_usd', r['cost_usd'])}<td>{r['latency_ms']:.1f}</td>"
            f"<td><details><summary>{len(r['attempts'])} attempt(s)</summary><table><thead><tr>{head}</tr>"
            f"</thead><tbody>{attempts}</tbody></table></details></td></tr>"
        )
    more = (
        f'<p><a id="older" href="{escape(link)}&amp;before={data["next_before"]}'
        f'&amp;before_id={escape(quote(data["next_before_id"]))}">older requests</a></p>'
        if data["next_before"] is not None
        else ""
    )
    return (
        '<table id="requests"><thead><tr><th>time</th><th>tenant</th><th>feature</th><th>route</th>'
        "<th>model</th>"
        "<th>status</th><th>cache</th><th>cost USD</th><th>ms</th><th>attempts</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{more}"
    )


def _top(top: Mapping[str, Any]) -> str:
    cols = (("requests", "requests"), ("cost_usd", "cost USD"), ("cost_per_success_usd", "USD / success"))
    return (
        '<div class="cols">'
        + "".join(
            f"<div><h3>{escape(by)}</h3>{report_table(f'top-{by}', by, top[by], None, cols)}</div>"
            for by in ("feature", "tenant", "user")
        )
        + "</div>"
    )


def render_page(data: Mapping[str, Any]) -> str:
    q = data["query"]
    summary = data["summary"]
    window = summary["window"]
    viewer = data["viewer"]
    tenant_options = ["", *data["tenants"]] if viewer["admin"] else data["tenants"]
    filters = (
        '<form class="filters" method="get" action="/dashboard">'
        + _select("by", DIMENSIONS, q["by"])
        + _select("range", [*RANGES, *(["custom"] if q["range"] == "custom" else [])], q["range"])
        + _select("bucket", ("hour", "day"), q["bucket"])
        + _select("tenant", tenant_options, window["tenant"] or "", {"": "all tenants"})
        + '<button type="submit">show</button></form>'
    )
    who = "admin" if viewer["admin"] else f"tenant {viewer['tenant']}"
    span = f"{window['since_iso'] or 'the beginning'} to {window['until_iso'] or 'now'}"
    link = "/dashboard?" + urlencode(
        {"by": q["by"], "range": q["range"], "bucket": q["bucket"], "tenant": window["tenant"] or ""}
    )
    routes = data["routes"]
    pv = data["prompt_versions"]
    sections = [
        f'<section id="overview"><h2>Spend {escape(span)}</h2>{_cards(summary["total"])}</section>',
        f"<section><h2>Spend per {escape(q['bucket'])} by {escape(q['by'])}</h2>"
        f"{spend_chart('spend-chart', data['series'], 'spend over time by ' + q['by'])}"
        f"{report_table('summary', q['by'], summary['rows'], summary['total'])}</section>",
        "<section><h2>Routes</h2>"
        + report_table("routes", "route", routes["rows"], routes["total"])
        + "</section>",
        f"<section><h2>Budgets</h2>{_budgets(data['budgets']['budgets'])}"
        f"<h3>Budget rejections (429s)</h3>{_rejections_chart(data['series'])}</section>",
        f"<section><h2>Alerts</h2>{_alerts(data['alerts']['alerts'])}</section>",
        "<section><h2>Prompt versions</h2>"
        + spend_chart("prompt-chart", data["prompt_series"], "spend by prompt version")
        + f"{report_table('prompt-versions', 'prompt_version', pv['rows'], pv['total'])}</section>",
        f"<section><h2>Most expensive (top {data['top']['n']})</h2>{_top(data['top'])}</section>",
        f"<section><h2>Requests</h2>{_requests(data['requests'], link)}</section>",
        cache_section(data.get("cache", {}).get("partitions", ())),
    ]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>thrifty dashboard</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<style>{_CSS}</style></head><body>"
        f'<header><h1>thrifty</h1><span id="viewer">{escape(who)}</span>{filters}'
        '<a href="/dashboard/logout">sign out</a></header>'
        f"<main>{''.join(sections)}</main></body></html>"
    )


def login_page(message: str | None = None) -> str:
    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>thrifty dashboard: sign in</title>'
        f'<link rel="icon" href="data:,"><style>{_CSS}</style></head>'
        f"<body><main><section><h2>thrifty dashboard</h2>{note}"
        '<form method="post" action="/dashboard/login"><label>key <input type="password" name="key" '
        'autocomplete="current-password" size="50"></label> <button type="submit">sign in</button></form>'
        '<p class="muted">An admin key sees every tenant; a tenant\'s virtual key sees its own.</p>'
        "</section></main></body></html>"
    )
