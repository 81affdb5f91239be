"""The dashboard over a ledger with known rows: who sees what, and every number equals the report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KEYS
from tests.dashboard_helpers import ADMIN_KEY, XSS, dashboard_over_known_ledger, get
from thrifty.report import totals
from thrifty.settings import Settings
from thrifty.stores.reporting import SqliteReportingStore, Window
from thrifty.types import LedgerEntry

DIMS = ("tenant", "feature", "route", "prompt_version", "model", "user")


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings, list[LedgerEntry]]]:
    with dashboard_over_known_ledger(tmp_path_factory.mktemp("dash")) as served:
        yield served


def _scan(settings: Settings, by: str, window: dict[str, Any]) -> list[dict[str, Any]]:
    store = SqliteReportingStore(settings.storage.sqlite_path)
    rows = asyncio.run(store.spend_by(by, Window(window["since"], window["until"], window["tenant"])))
    return [r.to_json() for r in rows]


def test_no_key_or_an_unknown_key_is_401(dash):
    url, _, _ = dash
    page = get(url + "/dashboard")
    assert page.status_code == 401 and 'name="key"' in page.text  # the sign-in form, no data
    assert "acme" not in page.text
    api = get(url + "/dashboard/api/summary")
    assert api.status_code == 401 and api.json()["error"]["code"] == "invalid_api_key"
    assert get(url + "/dashboard/api/summary", "thr-not-a-key").status_code == 401
    cookie = httpx.get(url + "/dashboard", cookies={"thrifty_dashboard_key": "nope"}, timeout=10)
    assert cookie.status_code == 401 and "not an admin key" in cookie.text


@pytest.mark.parametrize("range_name", ["24h", "7d", "all"])
def test_admin_numbers_equal_the_ledger_scan_for_every_dimension(dash, range_name):
    url, settings, _ = dash
    for by in DIMS:
        body = get(url + "/dashboard/api/summary", ADMIN_KEY, by=by, range=range_name).json()
        expected = _scan(settings, by, body["window"])
        assert body["rows"] == expected, by
        assert body["total"]["cost_usd"] == sum_text(expected)


def sum_text(rows: list[dict[str, Any]]) -> str:
    from decimal import Decimal

    return format(sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0)), "f")


def test_numbers_equal_thrifty_report_json_for_the_same_filter(dash):
    url, settings, _ = dash
    body = get(url + "/dashboard/api/summary", ADMIN_KEY, by="feature", range="7d", tenant="acme").json()
    w = body["window"]
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "report", "--by", "feature", "--format", "json",
         "--db", str(settings.storage.sqlite_path), "--since", w["since_iso"], "--until", w["until_iso"],
         "--tenant", "acme"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert body["rows"] == json.loads(out.stdout)
    assert body["rows"] and all(r["requests"] for r in body["rows"])


def test_a_filter_changes_the_numbers(dash):
    url, _, entries = dash
    every = get(url + "/dashboard/api/summary", ADMIN_KEY, by="tenant", range="all").json()["total"]
    week = get(url + "/dashboard/api/summary", ADMIN_KEY, by="tenant", range="7d").json()["total"]
    acme = get(url + "/dashboard/api/summary", ADMIN_KEY, by="tenant", range="all", tenant="acme").json()
    assert every["requests"] == len(entries)
    assert week["requests"] == len(entries) - 6  # the six rows of 10 days ago
    assert [r["group"] for r in acme["rows"]] == ["acme"]
    assert acme["total"]["requests"] == sum(e.tenant_id == "acme" for e in entries)


def test_series_sum_to_the_summary_and_carry_429s(dash):
    url, _, _ = dash
    from decimal import Decimal

    series = get(url + "/dashboard/api/series", ADMIN_KEY, by="model", range="24h", bucket="hour").json()
    summary = get(url + "/dashboard/api/summary", ADMIN_KEY, by="model", range="24h").json()
    for s in series["series"]:
        assert s["total_cost_usd"] == format(sum((Decimal(v) for v in s["cost_usd"]), Decimal(0)), "f")
    assert {s["group"]: s["total_cost_usd"] for s in series["series"]} == {
        r["group"]: r["cost_usd"] for r in summary["rows"]
    }
    assert sum(series["budget_rejections"]) == summary["total"]["budget_rejections"] > 0


def test_a_tenant_key_sees_only_its_tenant(dash):
    url, _, entries = dash
    acme = KEYS["acme"]
    for name in ("summary", "series", "routes", "top", "requests", "page", "prompt_versions"):
        body = get(url + f"/dashboard/api/{name}", acme, by="tenant", range="all")
        assert body.status_code == 200, name
        assert "globex" not in body.text, name
    summary = get(url + "/dashboard/api/summary", acme, by="tenant", range="all").json()
    assert [r["group"] for r in summary["rows"]] == ["acme"]
    assert summary["total"]["requests"] == sum(e.tenant_id == "acme" for e in entries)
    requests = get(url + "/dashboard/api/requests", acme, range="all", limit=1000).json()["requests"]
    assert requests and {r["tenant_id"] for r in requests} == {"acme"}
    alerts = get(url + "/dashboard/api/alerts", acme, range="all").json()["alerts"]
    assert sorted(a["scope"] for a in alerts) == ["feature:acme/chat", "tenant:acme"]
    budgets = get(url + "/dashboard/api/budgets", acme).json()["budgets"]
    assert {b["scope"] for b in budgets} == {"tenant:acme", "feature:acme/chat"}  # no org or route budgets
    page = get(url + "/dashboard", acme, range="all")
    assert page.status_code == 200 and "globex" not in page.text and "tenant acme" in page.text
    # Asking for another tenant is refused, not silently answered.
    other = get(url + "/dashboard/api/summary", acme, tenant="globex")
    assert other.status_code == 403 and "own tenant" in other.json()["error"]["message"]
    assert get(url + "/dashboard", acme, tenant="globex").status_code == 403


def test_budgets_show_use_against_limit_and_reset_time(dash):
    url, _, entries = dash
    budgets = {
        b["scope"] + "/" + b["window"] + "/" + b["unit"]: b
        for b in get(url + "/dashboard/api/budgets", ADMIN_KEY).json()["budgets"]
    }
    from datetime import UTC, datetime
    from decimal import Decimal

    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    spent = sum(
        (e.cost_usd or Decimal(0) for e in entries if e.tenant_id == "acme" and e.ts >= today), Decimal(0)
    )
    acme = budgets["tenant:acme/day/usd"]
    assert Decimal(acme["used"]) == spent and acme["limit"] == "2.5"
    assert acme["resets_at_iso"] == datetime.fromtimestamp(today + 86400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert {"route:support/day/usd", "tenant:globex/day/usd", "feature:acme/chat/month/usd"} <= set(budgets)


def test_alerts_carry_their_delivery_status(dash):
    url, _, _ = dash
    alerts = {
        a["scope"]: a["delivery"] for a in get(url + "/dashboard/api/alerts", ADMIN_KEY).json()["alerts"]
    }
    assert alerts == {
        "tenant:acme": "delivered",
        "tenant:globex": "failed: HTTP 500",
        "feature:acme/chat": "stored (no webhook)",
    }


def test_request_explorer_lists_attempts_and_pages(dash):
    url, _, entries = dash
    first = get(url + "/dashboard/api/requests", ADMIN_KEY, range="all", limit=10).json()
    assert len(first["requests"]) == 10
    newest = sorted(entries, key=lambda e: -e.ts)
    assert [r["request_id"] for r in first["requests"]] == [e.request_id for e in newest[:10]]
    retried = next(r for r in first["requests"] if r["retries"])
    assert [a["status"] for a in retried["attempts"]] == [500, 200]
    second = get(
        url + "/dashboard/api/requests", ADMIN_KEY, range="all", limit=10, before=first["next_before"]
    )
    assert [r["request_id"] for r in second.json()["requests"]] == [e.request_id for e in newest[10:20]]


def test_the_page_renders_svg_charts_and_escapes_header_values(dash):
    url, _, _ = dash
    page = get(url + "/dashboard", ADMIN_KEY, range="all", by="feature")
    assert page.status_code == 200
    assert page.text.count("<svg") >= 3 and 'class="bar"' in page.text
    assert XSS not in page.text and "&lt;script&gt;" in page.text
    assert "<script" not in page.text  # no script of our own either
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_bad_parameters_are_400_with_what_to_send(dash):
    url, _, _ = dash
    bad = get(url + "/dashboard/api/summary", ADMIN_KEY, by="colour")
    assert bad.status_code == 400 and "by must be one of" in bad.json()["error"]["message"]
    assert get(url + "/dashboard/api/summary", ADMIN_KEY, range="1y").status_code == 400
    assert get(url + "/dashboard/api/summary", ADMIN_KEY, **{"from": "yesterday"}).status_code == 400
    assert get(url + "/dashboard/api/nope", ADMIN_KEY).status_code == 404


def test_sign_in_with_a_form_sets_a_cookie_that_works_without_javascript(dash):
    url, _, _ = dash
    with httpx.Client(base_url=url, timeout=10) as browser:
        wrong = browser.post("/dashboard/login", data={"key": "guess"})
        assert wrong.status_code == 401 and "not an admin key" in wrong.text
        signed = browser.post("/dashboard/login", data={"key": KEYS["globex"]})
        assert signed.status_code == 303 and "HttpOnly" in signed.headers["set-cookie"]
        page = browser.get("/dashboard", params={"range": "all"})
        assert page.status_code == 200 and "tenant globex" in page.text and "acme" not in page.text
        assert browser.get("/dashboard/logout").status_code == 303
        assert browser.get("/dashboard").status_code == 401


def test_totals_helper_matches(dash):
    # The TOTAL row the page shows is report.totals() of the same rows.
    url, settings, _ = dash
    body = get(url + "/dashboard/api/summary", ADMIN_KEY, by="route", range="all").json()
    store = SqliteReportingStore(settings.storage.sqlite_path)
    rows = asyncio.run(store.spend_by("route", Window()))
    assert body["total"] == totals(rows).to_json()


def test_the_gateway_serves_the_dashboard_over_its_own_ledger(tmp_path: Path, openai_upstream):
    import openai

    from tests.conftest import UPSTREAM_KEY, base_settings, openai_models
    from thrifty.server.run import BackgroundServer
    from thrifty.stores.keys import hash_key

    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "K"}},
        models=openai_models(),
        dashboard={"admin_key_hashes": [hash_key(ADMIN_KEY)]},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-thrifty-feature": "f1"},
        )
        cost = reply.headers["x-thrifty-cost-usd"]
        root = f"http://{server.host}:{server.port}"
        body = get(root + "/dashboard/api/summary", KEYS["acme"], by="feature", range="24h").json()
        assert [(r["group"], r["requests"], r["cost_usd"]) for r in body["rows"]] == [("f1", 1, cost)]
        assert get(root + "/dashboard", ADMIN_KEY).status_code == 200
        assert get(root + "/dashboard").status_code == 401


def test_the_demo_serves_its_dashboard_with_serve():
    from thrifty.demo import run_demo

    lines: list[str] = []
    seen: dict[str, Any] = {}

    def look() -> None:  # what a user does while the demo keeps the gateway up
        (line,) = [x for x in lines if x.startswith("dashboard: http://")]
        url, key = line.split()[1], line.split("admin key: ")[1].rstrip(")")
        seen["page"] = get(url, key, range="all")
        seen["anonymous"] = get(url)

    code = run_demo(None, 12, None, lambda x: lines.append(str(x)), cascade_prompts=0, support_lookups=0,
                    serve=True, wait=look, stack_requests=0)  # fmt: skip
    assert code == 0
    assert seen["page"].status_code == 200 and "acme" in seen["page"].text and "<svg" in seen["page"].text
    assert seen["anonymous"].status_code == 401


@pytest.mark.parametrize("range_name", ["24h", "all"])
def test_the_page_json_and_the_top_tables_equal_the_report(dash, range_name):
    url, settings, _ = dash
    page = get(url + "/dashboard/api/page", ADMIN_KEY, by="model", range=range_name).json()
    window = page["summary"]["window"]
    assert page["summary"]["rows"] == _scan(settings, "model", window)
    assert page["prompt_versions"]["rows"] == _scan(settings, "prompt_version", window)
    assert page["routes"]["rows"] == _scan(settings, "route", window)
    fields = ("group", "requests", "ok", "cost_usd", "cost_per_success_usd")
    for by in ("feature", "tenant", "user"):
        expected = [{k: r[k] for k in fields} for r in _scan(settings, by, window)[: page["top"]["n"]]]
        assert page["top"][by] == expected, by
