"""The dashboard in a real browser: Debian's headless Chromium, JavaScript switched off.

Chromium comes from apt (scripts/test.sh installs it); browser downloads do not work here. When it
is missing this test fails: a dashboard nobody has seen render is not tested.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import KEYS
from tests.dashboard_helpers import ADMIN_KEY, dashboard_over_known_ledger, get
from thrifty.report import totals
from thrifty.stores.reporting import SqliteReportingStore, Window

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(
    os.environ.get("THRIFTY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "Chromium is not installed: apt-get install -y chromium chromium-driver (scripts/test.sh does)"
        )
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,2600",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # The page must work without script: the whole test runs with JavaScript off.
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(driver: WebDriver, url: str, key: str) -> None:
    driver.get(url + "/dashboard/logout")
    assert driver.find_element(By.NAME, "key")  # the sign-in form (401)
    driver.find_element(By.NAME, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 20).until(expected_conditions.presence_of_element_located((By.ID, "viewer")))
    driver.get_log("browser")  # the sign-in page's 401 is expected; what follows must be clean


def _cells(driver: WebDriver, table: str, field: str) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[data-group]")
    return {
        r.get_attribute("data-group") or "": r.find_element(By.CSS_SELECTOR, f'td[data-field="{field}"]').text
        for r in rows
    }


def _report(db: Path, by: str, window: dict) -> dict[str, dict]:
    store = SqliteReportingStore(db)
    rows = asyncio.run(store.spend_by(by, Window(window["since"], window["until"], window["tenant"])))
    out = {("(none)" if r.group is None else r.group): r.to_json() for r in rows}
    out["TOTAL"] = totals(rows).to_json()
    return out


def test_the_dashboard_in_headless_chromium(tmp_path: Path, browser: WebDriver):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with dashboard_over_known_ledger(tmp_path) as (url, settings, _):
        db = settings.storage.sqlite_path
        _sign_in(browser, url, ADMIN_KEY)
        browser.get(url + "/dashboard?by=feature&range=7d&bucket=hour")
        assert browser.find_element(By.ID, "viewer").text == "admin"
        # Charts render: SVG bars in the spend and prompt-version charts, and the 429 chart.
        assert len(browser.find_elements(By.CSS_SELECTOR, "#spend-chart svg rect.bar")) > 5
        assert browser.find_elements(By.CSS_SELECTOR, "#prompt-chart svg rect.bar")
        assert browser.find_elements(By.CSS_SELECTOR, "#rejections-chart svg")
        assert browser.find_element(By.CSS_SELECTOR, "#spend-chart svg").size["height"] > 100
        browser.save_screenshot(str(ARTIFACTS / "dashboard-admin.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        # The numbers shown are the report's for the same window.
        window = get(url + "/dashboard/api/summary", ADMIN_KEY, by="feature", range="7d").json()["window"]
        report = _report(db, "feature", window)
        fields = ("cost_usd", "requests", "error_cost_usd", "retry_cost_usd", "saved_usd", "cache_hits")
        for field in (*fields, "batch_share", "context_tokens_saved"):
            assert _cells(browser, "summary", field) == {g: str(r[field]) for g, r in report.items()}, field
        total = browser.find_element(By.CSS_SELECTOR, '#totals [data-field="cost_usd"] b').text
        assert total == report["TOTAL"]["cost_usd"]
        batch = browser.find_element(By.CSS_SELECTOR, '#totals [data-field="batch_share"] b').text
        t = report["TOTAL"]
        assert batch == f"{t['batch_share']} ({t['batch_cost_usd']} / {t['batch_realtime_usd']})"
        assert t["batch_requests"] > 0
        # A filter (the form, no script) changes them.
        Select(browser.find_element(By.NAME, "tenant")).select_by_value("acme")
        browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
        WebDriverWait(browser, 20).until(expected_conditions.url_contains("tenant=acme"))
        WebDriverWait(browser, 20).until(expected_conditions.presence_of_element_located((By.ID, "summary")))
        acme = _report(db, "feature", {**window, "tenant": "acme"})
        assert _cells(browser, "summary", "cost_usd") == {g: r["cost_usd"] for g, r in acme.items()}
        assert acme["TOTAL"]["cost_usd"] != report["TOTAL"]["cost_usd"]
        # A tenant's key sees its tenant and nothing of another.
        _sign_in(browser, url, KEYS["acme"])
        browser.get(url + "/dashboard?by=tenant&range=all")
        assert browser.find_element(By.ID, "viewer").text == "tenant acme"
        assert "globex" not in browser.page_source
        assert set(_cells(browser, "summary", "requests")) == {"acme", "TOTAL"}
        browser.save_screenshot(str(ARTIFACTS / "dashboard-tenant.png"))
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        browser.get(url + "/dashboard?tenant=globex")
        assert "own tenant" in browser.page_source and "globex used" not in browser.page_source
