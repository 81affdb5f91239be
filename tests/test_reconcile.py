"""`thrifty reconcile` on sample exports built from the providers' documentation
(tests/data/exports/), against a ledger that agrees with them except where a discrepancy is planted.

The ledger, per UTC day (USD as recorded; tokens in / out; "local" is an OpenAI-compatible server):
  11-03  mini x3 $1 each (1000/100)  big $10 (10000/1000, after a failed retry)  haiku $2 (5000/500)
         llama on "local" $0.50 (100/10), and a cache hit (no upstream call)
  11-04  big $10 (10000/1000)  mini $1 (1000/100)  mystery: unpriced (2000/200)  haiku $1 (4000/400)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
import yaml

from tests.inprocess_cli import Cli, cli  # noqa: F401 (a fixture)
from thrifty.errors import InvalidData
from thrifty.planning.reconcile.exports import read_export, split_line_item
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database
from thrifty.types import Attempt, LedgerEntry, Usage

EXPORTS = Path(__file__).parent / "data" / "exports"


def _thrifty(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )


def _entry(
    rid: str,
    day: int,
    alias: str,
    provider: str,
    cost: str | None,
    inp: int,
    out: int,
    *,
    retry: bool = False,
) -> LedgerEntry:
    usage = Usage(input_tokens=inp, output_tokens=out)
    answer = Attempt(alias, provider, 200, usage, None if cost is None else D(cost), 5.0)
    failed = (Attempt(alias, provider, 500, Usage(), None, 1.0, "boom"),) if retry else ()
    return LedgerEntry(
        request_id=rid,
        ts=datetime(2026, 11, day, 9, tzinfo=UTC).timestamp(),
        tenant_id="acme",
        user=None,
        feature="support",
        route=None,
        prompt_version=None,
        model=alias,
        provider=provider,
        attempts=(*failed, answer),
        usage=usage,
        cost_usd=None if cost is None else D(cost),
        saved_usd=None,
        cache="miss",
        escalated=False,
        retries=len(failed),
        status="ok",
        error=None,
        http_status=200,
        latency_ms=5.0,
        ttft_ms=None,
        idempotency_key=None,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reconcile")
    settings = {
        "storage": {"url": f"sqlite:///{root / 'ledger.db'}"},
        "providers": {
            "oai": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
            "ant": {"kind": "anthropic", "base_url": "http://127.0.0.1:9"},
            "local": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},  # a local server
        },
        "models": {
            "mini": {"provider": "oai", "upstream": "gpt-4o-mini"},
            "big": {"provider": "oai", "upstream": "gpt-4o"},
            "mystery": {"provider": "oai", "upstream": "ft:gpt-4o-mini-2024-07-18:acme::abc123"},
            "haiku": {"provider": "ant", "upstream": "claude-3-5-haiku-20241022"},
            "llama": {"provider": "local", "upstream": "llama-3.1-8b"},
        },
    }
    path = root / "thrifty.yaml"
    path.write_text(yaml.safe_dump(settings))
    conn = open_database(root / "ledger.db")
    entries = [
        *(_entry(f"m3{i}", 3, "mini", "oai", "1.00", 1000, 100) for i in range(3)),
        _entry("b3", 3, "big", "oai", "10.00", 10000, 1000, retry=True),
        _entry("h3", 3, "haiku", "ant", "2.00", 5000, 500),
        _entry("b4", 4, "big", "oai", "10.00", 10000, 1000),
        _entry("m4", 4, "mini", "oai", "1.00", 1000, 100),
        _entry("x4", 4, "mystery", "oai", None, 2000, 200),
        _entry("h4", 4, "haiku", "ant", "1.00", 4000, 400),
        _entry("late", 6, "big", "oai", "99", 1, 1),  # outside the exports' days
        _entry("l3", 3, "llama", "local", "0.50", 100, 10),  # OpenAI-compatible, not OpenAI's bill
    ]
    hit = _entry("c3", 3, "mini", "oai", "0", 0, 0)
    entries.append(
        LedgerEntry(
            **{**{f: getattr(hit, f) for f in hit.__dataclass_fields__}, "cache": "exact", "attempts": ()}
        )
    )
    for e in entries:
        conn.execute(INSERT_ENTRY_SQL, entry_row(e))
    conn.close()
    return path


@pytest.fixture
def run(cli: Cli):  # noqa: F811
    def reconcile(config: Path, provider: str, export: Path, *extra: str) -> tuple[int, dict, str]:
        code, out, err = cli(
            "reconcile",
            "--provider",
            provider,
            "--export",
            str(export),
            "--config",
            str(config),
            "--format",
            "json",
            *extra,
        )
        return code, json.loads(out) if out.strip() else {}, err

    return reconcile


def _rows(doc: dict) -> dict[tuple, dict]:
    return {(r["day"], r["model"], r["scope"]): r for r in doc["rows"]}


def test_openai_costs_per_day_and_model_with_planted_differences(config: Path, run):
    code, doc, err = run(config, "openai", EXPORTS / "openai-costs.json")
    assert code == 1, err  # over tolerance: for a scheduled job
    assert doc["format"] == "openai-costs" and doc["compared_by"] == ["day", "model"]
    rows = _rows(doc)
    # Dated snapshots in line items are the ledger's models; input and output items summed.
    mini3 = rows[("2026-11-03", "gpt-4o-mini", None)]
    assert (mini3["provider"]["cost_usd"], mini3["ledger"]["cost_usd"]) == ("3.5", "3.00")
    assert mini3["over_tolerance"]  # proj_other's $0.50: summed in without --scope
    big3 = rows[("2026-11-03", "gpt-4o", None)]
    assert big3["difference"] == "0.20" and big3["difference_share"] == "0.019608"  # 0.2 / 10.2
    assert not big3["over_tolerance"] and big3["ledger"]["calls"] == 2  # the failed retry is a call
    big4 = rows[("2026-11-04", "gpt-4o", None)]
    assert big4["over_tolerance"] and big4["difference"] == "4.00"
    assert any("bypassed the gateway" in c for c in big4["likely_causes"])
    mini4 = rows[("2026-11-04", "gpt-4o-mini", None)]
    assert mini4["provider"]["cost_usd"] == "1.0" and not mini4["over_tolerance"]
    ft = rows[("2026-11-04", "ft:gpt-4o-mini-2024-07-18:acme::abc123", None)]
    assert ft["over_tolerance"] and ft["ledger"]["unpriced_calls"] == 1
    assert ft["likely_causes"][0].startswith(
        "unpriced model: 1 gateway call recorded with cost NULL (mystery)"
    )
    nano = rows[("2026-11-04", "gpt-4.1-nano-2025-04-14", None)]
    assert nano["ledger"]["calls"] == 0 and "no gateway calls" in " ".join(nano["likely_causes"])
    # Anthropic's calls and the day outside the export are not in an OpenAI reconciliation.
    assert not any("claude" in m for _, m, _ in rows) and doc["provider_total"] == "35.7"
    # The local OpenAI-compatible server's calls are of the kind, so counted, until left out:
    local = rows[("2026-11-03", "llama-3.1-8b", None)]
    assert local["over_tolerance"] and "the export has nothing" in local["likely_causes"][0]
    assert doc["ledger_total"] == "24.50" and doc["over_tolerance"] == 5
    code, doc, _ = run(config, "openai", EXPORTS / "openai-costs.json", "--gateway-provider", "oai")
    assert doc["ledger_total"] == "24.00" and doc["over_tolerance"] == 4
    assert ("2026-11-03", "llama-3.1-8b", None) not in _rows(doc)


def test_scope_maps_a_provider_to_its_project(config: Path, run):
    code, doc, _ = run(config, "openai", EXPORTS / "openai-costs.json", "--scope", "oai=proj_gw")
    assert code == 1 and doc["compared_by"] == ["day", "model", "scope"]
    rows = _rows(doc)
    assert not rows[("2026-11-03", "gpt-4o-mini", "proj_gw")]["over_tolerance"]
    other = rows[("2026-11-03", "gpt-4o-mini", "proj_other")]
    assert (
        other["over_tolerance"] and "proj_other is not a key/project/workspace" in other["likely_causes"][0]
    )


def test_the_dashboard_csv_reads_as_the_api_json(config: Path, run):
    _, from_json, _ = run(config, "openai", EXPORTS / "openai-costs.json")
    code, from_csv, err = run(config, "openai", EXPORTS / "openai-costs.csv")
    assert code == 1, err and from_csv["format"] == "openai-costs-csv"
    assert from_csv["rows"] == from_json["rows"]


def test_tolerance_and_floor_decide_what_is_flagged(config: Path, run):
    code, doc, _ = run(config, "openai", EXPORTS / "openai-costs.json", "--tolerance", "1%")
    assert _rows(doc)[("2026-11-03", "gpt-4o", None)]["over_tolerance"]  # 1.96% > 1%
    code, doc, _ = run(config, "openai", EXPORTS / "openai-costs.json", "--min-diff-usd", "100")
    assert code == 0 and doc["over_tolerance"] == 0


def test_anthropic_cost_report_cents_cache_reads_and_non_token_charges(config: Path, run):
    code, doc, err = run(config, "anthropic", EXPORTS / "anthropic-cost-report.json")
    assert code == 1, err
    rows = _rows(doc)
    ok = rows[("2026-11-03", "claude-3-5-haiku-20241022", None)]
    assert ok["provider"]["cost_usd"] == "2.00" and not ok["over_tolerance"]  # "150.00" + "50.00" cents
    cached = rows[("2026-11-04", "claude-3-5-haiku-20241022", None)]
    assert cached["provider"]["cost_usd"] == "1.40" and cached["over_tolerance"]
    assert any(c.startswith("cached-token pricing") for c in cached["likely_causes"])
    search = rows[("2026-11-04", "(non-token charges)", None)]
    assert search["provider"]["cost_usd"] == "1.00" and search["likely_causes"][0].startswith("non-token")


def test_usage_exports_compare_tokens(config: Path, run):
    code, doc, err = run(config, "anthropic", EXPORTS / "anthropic-usage-report.json")
    assert code == 1, err and doc["measure"] == "tokens"
    rows = _rows(doc)
    assert not rows[("2026-11-03", "claude-3-5-haiku-20241022", None)]["over_tolerance"]
    # 3000 uncached + 1000 cache reads = the ledger's 4000 input, but the bill differs: flagged.
    same_total = rows[("2026-11-04", "claude-3-5-haiku-20241022", None)]
    assert same_total["difference"] == "0" and same_total["over_tolerance"]
    assert "1,000 cached input tokens, the ledger 0" in same_total["likely_causes"][0]
    code, doc, err = run(config, "openai", EXPORTS / "openai-usage.json")
    assert code == 1, err
    rows = _rows(doc)
    assert not rows[("2026-11-03", "gpt-4o-mini", None)]["over_tolerance"]
    batch = rows[("2026-11-04", "gpt-4o-mini", None)]
    assert batch["difference"] == "1100" and batch["provider"]["batch"] == 1
    assert any(
        c.startswith("batch pricing: the provider billed batch-API work") for c in batch["likely_causes"]
    )


def test_a_clean_export_exits_zero_with_a_table(config: Path, tmp_path: Path):
    page = {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": 1793664000,
                "end_time": 1793750400,
                "results": [
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": 10.0, "currency": "usd"},
                        "line_item": "gpt-4o-2024-08-06, input",
                        "project_id": None,
                    },
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": 3.0, "currency": "usd"},
                        "line_item": "gpt-4o-mini-2024-07-18, output",
                        "project_id": None,
                    },
                ],
            }
        ],
    }
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(page))
    out = _thrifty(
        "reconcile",
        "--provider",
        "openai",
        "--export",
        str(clean),
        "--config",
        str(config),
        "--gateway-provider",
        "oai",
    )
    assert out.returncode == 0, out.stderr
    assert "0 of 2 rows differ by more than 5%" in out.stdout and "totals: provider $13.00" in out.stdout


def test_malformed_rows_name_file_and_line_and_need_skip_bad(config: Path, tmp_path: Path, run):
    text = (EXPORTS / "openai-costs.json").read_text()
    lines = text.splitlines()
    # The third result of the first bucket: its amount becomes text, its object starts a line above.
    value_line = next(i for i, line in enumerate(lines) if '"value": 0.5' in line)
    lines[value_line] = lines[value_line].replace("0.5", '"lots"')
    start = max(i for i in range(value_line) if lines[i].strip() == "{") + 1
    bad = tmp_path / "bad.json"
    bad.write_text("\n".join(lines) + "\n")
    out = _thrifty("reconcile", "--provider", "openai", "--export", str(bad), "--config", str(config))
    assert out.returncode == 2
    assert f"{bad}:{start}: amount.value 'lots' is not a number" in out.stderr
    assert "1 malformed row in" in out.stderr and "--skip-bad" in out.stderr and "Traceback" not in out.stderr
    code, doc, err = run(config, "openai", bad, "--skip-bad")
    assert code == 1 and doc["skipped_rows"] == [f"{bad}:{start}: amount.value 'lots' is not a number"]
    assert "skipped 1 malformed row (--skip-bad)" in err
    # Without the bad $0.50 row the gateway's project agrees on 11-03.
    assert not _rows(doc)[("2026-11-03", "gpt-4o-mini", None)]["over_tolerance"]


def test_malformed_csv_rows_and_unreadable_exports(config: Path, tmp_path: Path, run):
    rows = (EXPORTS / "openai-costs.csv").read_text().splitlines()
    rows[2] = rows[2].replace(",1.0,", ",one,")
    rows.insert(4, '1793664000,1793750400,1.0,eur,"gpt-4o-2024-08-06, input",proj_gw,o,p,q')
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(rows) + "\n")
    code, _, err = run(config, "openai", bad)
    assert code == 2 and f"{bad}:3: amount_value 'one' is not a number" in err
    assert f"{bad}:5: currency 'eur'" in err and "2 malformed rows" in err
    for content, message in [
        ("", "the export is empty"),
        ('{"object": "page", "data": [', "not JSON (line 1, column"),
        ('{"data": []}', "no usage or cost results found"),
        ("start_time,end_time\n1,2\n", "needs the columns start_time, amount_value, line_item"),
    ]:
        path = tmp_path / "x.json"
        path.write_text(content)
        code, _, err = run(config, "openai", path)
        assert code == 2 and message in err, (content, err)
    code, _, err = run(config, "openai", EXPORTS / "anthropic-cost-report.json")
    assert code == 2 and "is an anthropic export (anthropic-costs); pass --provider anthropic" in err
    code, _, err = run(config, "openai", tmp_path / "missing.json")
    assert code == 2 and "cannot read the export" in err
    code, _, err = run(config, "openai", EXPORTS / "openai-costs.json", "--scope", "nope=proj")
    assert code == 2 and "no provider 'nope' in the settings" in err


def test_jsonl_pages_and_line_items():
    page = json.loads((EXPORTS / "openai-usage.json").read_text())
    first, second = dict(page, data=page["data"][:1]), dict(page, data=page["data"][1:])
    second["data"][0]["results"][0]["output_tokens"] = -1
    export = read_export(json.dumps(first) + "\n\n" + json.dumps(second) + "\n", "pages.jsonl", "openai")
    assert len(export.records) == 3
    assert [str(b) for b in export.bad] == ["pages.jsonl:3: output_tokens is -1, not a token count"]
    assert split_line_item("gpt-4o-2024-08-06, cached input") == ("gpt-4o-2024-08-06", "cached input")
    assert split_line_item("gpt-4o") == ("gpt-4o", None) and split_line_item(None) == (None, None)
    with pytest.raises(InvalidData, match=r"pages\.jsonl:2: not JSON"):
        read_export(json.dumps(first) + "\n{oops\n", "pages.jsonl", "openai")


def test_an_export_not_grouped_by_model_is_compared_per_day(config: Path, tmp_path: Path, run):
    page = {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": 1793664000,
                "end_time": 1793750400,
                "results": [
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": 13.5, "currency": "usd"},
                        "line_item": None,
                        "project_id": None,
                    }
                ],
            },
            {"object": "bucket", "start_time": 1793750400, "end_time": 1793836800, "results": []},
        ],
    }
    path = tmp_path / "daily.json"
    path.write_text(json.dumps(page))
    code, doc, err = run(config, "openai", path, "--gateway-provider", "oai")
    assert doc["compared_by"] == ["day"], err
    rows = _rows(doc)
    # 11-03: mini $3 + big $10 in the ledger against $13.50 billed: 3.7%, within 5%.
    assert rows[("2026-11-03", "*", None)]["ledger"]["cost_usd"] == "13.00"
    assert not rows[("2026-11-03", "*", None)]["over_tolerance"]
    # 11-04 has an empty bucket: the gateway's $11 there is unbilled.
    assert rows[("2026-11-04", "*", None)]["over_tolerance"] and code == 1
