"""`thrifty report`, `thrifty keys` and `thrifty demo` as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import yaml

from tests.factories import ledger_entry
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry, RequestStatus, Usage

REPO = Path(__file__).resolve().parents[1]


def _thrifty(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _entry(
    i: int,
    tenant: str,
    feature: str,
    cost: str | None,
    status: RequestStatus = "ok",
    ts: float | None = None,
    attempts_costs: tuple[str, ...] = (),
) -> LedgerEntry:
    return ledger_entry(
        f"req_{i}",
        ts=ts,
        tenant=tenant,
        feature=feature,
        prompt_version="v1",
        cost=cost,
        status=status,
        usage=Usage(input_tokens=100 + i, cached_input_tokens=10, output_tokens=20),
        failed_attempt_costs=attempts_costs,
    )


def _ledger(path: Path) -> Path:
    conn = open_database(path)
    entries = [
        _entry(1, "acme", "chat", "0.1"),
        _entry(2, "acme", "chat", "0.2", attempts_costs=("0.05",)),
        _entry(3, "acme", "search", "0.000000001"),
        _entry(4, "globex", "chat", "0.3", status="error"),
        _entry(5, "globex", "chat", None),
        _entry(6, "globex", "chat", "1", ts=time.time() - 10 * 86400),
    ]
    for e in entries:
        conn.execute(INSERT_ENTRY_SQL, entry_row(e))
    conn.close()
    return path


def test_report_json_sums_exactly(tmp_path: Path):
    db = _ledger(tmp_path / "l.db")
    out = _thrifty("report", "--by", "tenant", "--format", "json", "--db", str(db))
    assert out.returncode == 0, out.stderr
    rows = {r["group"]: r for r in json.loads(out.stdout)}
    acme, globex = rows["acme"], rows["globex"]
    assert Decimal(acme["cost_usd"]) == Decimal("0.350000001")  # 0.1 + (0.2 + 0.05 retry) + 1e-9
    assert Decimal(acme["retry_cost_usd"]) == Decimal("0.05")
    assert acme["requests"] == 3 and acme["success_rate"] == 1.0
    assert Decimal(acme["cost_per_success_usd"]) == Decimal("0.116666667000")
    assert globex["requests"] == 3 and globex["ok"] == 2 and globex["unpriced_requests"] == 1
    assert Decimal(globex["error_cost_usd"]) == Decimal("0.3") and Decimal(globex["cost_usd"]) == Decimal(
        "1.3"
    )
    assert acme["input_tokens"] == 101 + 102 + 103 and acme["cached_input_tokens"] == 30
    assert acme["cached_input_share"] == round(30 / 306, 6)  # how much input the provider cache served


def test_report_since_and_csv_and_day(tmp_path: Path):
    db = _ledger(tmp_path / "l.db")
    out = _thrifty("report", "--by", "feature", "--since", "7d", "--format", "csv", "--db", str(db))
    rows = {r["group"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    assert rows["chat"]["requests"] == "4" and Decimal(rows["chat"]["cost_usd"]) == Decimal(
        "0.65"
    )  # 0.1 + 0.25 + 0.3, day-10 row excluded
    out = _thrifty("report", "--by", "day", "--format", "json", "--db", str(db))
    assert len(json.loads(out.stdout)) == 2
    table = _thrifty("report", "--by", "tenant", "--db", str(db))
    assert table.returncode == 0 and "acme" in table.stdout and "TOTAL" in table.stdout


def test_report_errors_are_one_clear_line(tmp_path: Path):
    out = _thrifty("report", "--by", "colour", "--db", str(tmp_path / "x.db"))
    assert out.returncode == 2 and "--by must be one of" in out.stderr
    db = _ledger(tmp_path / "l.db")
    for command in ("report", "alerts"):
        out = _thrifty(command, "--since", "yesterday", "--db", str(db))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "'yesterday' is not a time" in out.stderr and "YYYY-MM-DD" in out.stderr and "7d" in out.stderr
    out = _thrifty("report", "--db", str(tmp_path / "missing.db"))
    assert out.returncode == 2 and "no ledger at" in out.stderr


def test_keys_create_then_use_through_the_gateway(tmp_path: Path, openai_upstream):
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"url": "sqlite:///ledger.db"},
                "providers": {
                    "up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}
                },
                "models": {"gpt-4o-mini": {"provider": "up"}},
                "tenants": {"acme": {}},
            }
        )
    )
    created = _thrifty("keys", "create", "--tenant", "acme", "--config", str(config))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("thr-")
    assert _thrifty("keys", "create", "--tenant", "nobody", "--config", str(config)).returncode == 2
    listed = _thrifty("keys", "list", "--config", str(config)).stdout
    assert "acme" in listed and key not in listed

    from thrifty.server.run import BackgroundServer
    from thrifty.settings import load_settings

    with BackgroundServer(load_settings(config), secrets={"up": "sk-fake-upstream"}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
        assert client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    missing = _thrifty("keys", "revoke", "0123456789abcdef", "--config", str(config))
    assert missing.returncode == 1 and "no active key whose hash starts with" in missing.stderr
    prefix = listed.split()[0]
    revoked = _thrifty("keys", "revoke", prefix, "--config", str(config))
    assert revoked.returncode == 0 and "revoked 1 key" in revoked.stdout
    assert "revoked" in _thrifty("keys", "list", "--config", str(config)).stdout
    again = _thrifty("keys", "revoke", prefix, "--config", str(config))
    assert again.returncode == 1  # already revoked: nothing active matches


def test_demo_on_the_shared_data_or_synthetic(tmp_path: Path):
    data = REPO.parent / "shared" / "data" / "routing" / "zeroeval"
    args = [
        "demo",
        "--requests",
        "60",
        "--cascade-prompts",
        "20",
        "--support-seeds",
        "60",
        "--support-lookups",
        "20",
        "--stack-requests",
        "120",
    ]
    banking = REPO.parent / "shared" / "data" / "cache" / "banking77"
    if data.exists():
        # Enough first askers (past min_entries) for paraphrase hits, and so for verification.
        args[args.index("--support-seeds") + 1] = "1100"
        args[args.index("--support-lookups") + 1] = "100"
        out = _thrifty(*args, "--data", str(data), "--support-data", str(banking))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "real recorded outputs" in out.stdout and "real Banking77 queries" in out.stdout
        # 60 mixed, 20 prompts three times (two cascades and gpt-4o), 20 on the canary route, 1,100
        # seeds and 100 lookups, and the 20 prompts as a nightly batch and in real time; and one ledger
        # row per verification, which no client sent.
        verified = int(out.stdout.split("requests sent and ")[1].split(" verifications")[0])
        assert (
            f"ledger rows: {1380 + verified} for 1380 requests sent and {verified} verifications"
            in out.stdout
        )
        line = out.stdout.split("semantic verification: ")[1].split("\n\n")[0].replace("\n", " ")
        assert f"{verified} of the route's" in line and f"{verified} ledger rows <id>.verify" in line
        assert verified > 0 and "found wrong; the partition is learning at threshold" in line
        assert "trained router (" in out.stdout
    else:
        out = _thrifty(*args, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        # 60 mixed, 20 prompts twice (no recorded data to train a router on), 20 on the canary
        # route, the built-in FAQ's 6 seeds and 18 lookups, and the 20 prompts as a nightly batch
        # and in real time.
        assert "SYNTHETIC" in out.stdout and "trained router (" not in out.stdout
        assert "ledger rows: 184 for 184 requests sent" in out.stdout
    assert "spend by tenant" in out.stdout and "of its cost" in out.stdout
    assert "gpt-4o-mini → gpt-4o when gemini-1.5-flash disagrees" in out.stdout
    assert "later askers in other words" in out.stdout
    # The savings stack, layer by layer, on the demo workload.
    assert "savings stack on the demo workload: 12" in out.stdout
    for layer in (
        "dedup of retries",
        "exact cache",
        "semantic cache",
        "context budgets",
        "routing / cascades",
    ):
        assert layer in out.stdout
    assert "batch offload" in out.stdout and "candidate" in out.stdout
    # The canary: both arms with their feedback-joined success rate, and the stop rule's verdict.
    assert "canary on route:answers" in out.stdout and "stop rule: " in out.stdout
    assert "control (gpt-4o): " in out.stdout


def test_demo_without_data_says_synthetic(tmp_path: Path):
    out = _thrifty(
        "demo", "--requests", "30", "--cascade-prompts", "12", "--stack-requests", "80", cwd=tmp_path
    )  # no ../shared/data
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SYNTHETIC" in out.stdout and "SYNTHETIC FAQ" in out.stdout
    # The data line says once what the data is and why.
    assert "data: SYNTHETIC built-in workload (../shared/data/routing/zeroeval not found)" in out.stdout
    assert "SYNTHETIC stand-ins for support" in out.stdout and "savings stack:" in out.stdout
    # globex runs into its daily budget on the built-in workload too: refused before any spend.
    refused = int(out.stdout.split("budgets: ")[1].split(" requests refused")[0])
    assert refused > 0 and f"'429 RateLimitError': {refused}" in out.stdout
    # 30 mixed, 12 prompts twice (24), 12 on the canary route, 6 synthetic first askers and 18
    # later askers (6 of them repeats), and the 12 prompts as a nightly batch job and in real time (24).
    assert "ledger rows: 114 for 114 requests sent" in out.stdout
    # gpt-4o-mini's batch price is half its real-time price, to the digit.
    assert "as one batch job (completed, 12 answered)" in out.stdout and "saving 50.0%" in out.stdout
    # Six entries are below the floor: only the six repeats are answered, none wrongly.
    assert "of 18 later askers in other words, 33.3% answered from the cache at 100.00%" in out.stdout
    # Every sixth synthetic sum is wrong on gpt-4o-mini: the voter disagrees and gpt-4o answers.
    assert "always-gpt-4o: accuracy 100.0%" in out.stdout
    assert "when gemini-1.5-flash disagrees: accuracy 100.0%" in out.stdout


def test_serve_with_invalid_settings_fails_at_start_naming_the_field(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("providers: {up: {kind: openai}}\nmodels: {m: {provider: up}}\n")
    out = _thrifty("serve", "--config", str(config))
    assert out.returncode == 2
    assert "providers.up" in out.stderr and "base_url is required" in out.stderr


def test_example_settings_are_valid():
    from thrifty.settings import load_settings

    settings = load_settings(REPO / "examples" / "thrifty.yaml")
    assert {"openai", "anthropic", "replay"} <= {p.kind for p in settings.providers.values()}
    if (REPO.parent / "shared" / "data" / "routing" / "zeroeval").exists():  # its replay provider's data
        from thrifty.gateway import Gateway

        Gateway(settings)  # every stage builds: gates, semantic settings, cascades


def test_cache_tune_cli_learns_parameters_from_labelled_queries(tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="the semantic extra is installed by scripts/test.sh")
    rows = ["text,category"]
    intents = {
        "card_lost": [
            "I lost my card",
            "my card is lost",
            "where is my lost card",
            "I can't find my card",
            "card went missing",
            "I misplaced my bank card",
            "lost debit card",
            "my card was lost today",
        ],
        "exchange_rate": [
            "what is the exchange rate",
            "how much is the euro rate",
            "current exchange rates",
            "rate for dollars to euros",
            "what rate do you use to exchange",
            "exchange rate today",
            "which exchange rate applies",
            "tell me the currency rate",
        ],
        "top_up_failed": [
            "my top up failed",
            "top-up did not work",
            "why did my top up fail",
            "I couldn't top up",
            "top up was declined",
            "failed to add money",
            "adding money failed",
            "my top-up got rejected",
        ],
    }
    for label, texts in intents.items():
        rows += [f"{t},{label}" for t in texts]
    data = tmp_path / "labelled.csv"
    data.write_text("\n".join(rows) + "\n")
    out = _thrifty(
        "cache", "tune", "--data", str(data), "--target-precision", "0.9", "--out", str(tmp_path / "p.json")
    )
    assert out.returncode == 0, out.stderr
    assert "fit (cross-fitted, leave-one-out lookups)" in out.stdout
    from thrifty.cache.semantic.decision import DecisionParams

    params = DecisionParams.from_dict(json.loads((tmp_path / "p.json").read_text()))
    # The learned scorer round-trips into the cache's own type, one weight per (expanded) feature.
    assert len(params.weights) == len(params.mean) == len(params.scale) > 0
    # 24 queries cannot show 90% precision: the tuner says so, and "never hit" survives JSON.
    assert params.threshold == float("inf") and "never answers" in out.stderr


@pytest.mark.parametrize("columns", [80, 120, 160])
def test_report_table_never_cuts_a_name_or_an_amount(tmp_path: Path, columns: int):
    conn = open_database(tmp_path / "l.db")
    costs = ["0.021", "0.00472", "0.0105", "12.5"]
    for i, cost in enumerate(costs):
        entry = ledger_entry(
            f"req_{i}",
            tenant="acme",
            feature=f"a-rather-long-feature-name-{i}",
            cost=cost,
            usage=Usage(input_tokens=1000, output_tokens=20),
        )
        conn.execute(INSERT_ENTRY_SQL, entry_row(entry))
    conn.execute(INSERT_ENTRY_SQL, entry_row(ledger_entry("req_x", tenant="acme", feature=None, cost="0.1")))
    conn.close()
    env_out = subprocess.run(
        [sys.executable, "-m", "thrifty", "report", "--by", "feature", "--db", str(tmp_path / "l.db")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": str(columns)},
        timeout=60,
    )
    out = env_out.stdout
    assert env_out.returncode == 0, env_out.stderr
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= columns
    for i in range(4):
        assert f"a-rather-long-feature-name-{i}" in out
    # One format per money column: as many decimals as the most precise amount needs, for all.
    for cost in ("0.02100", "0.00472", "0.01050", "12.50000", "12.63622", "0.10000"):
        assert cost in out, cost
    assert "0.010500000000" not in out and "(none)" in out
    if columns < 120:
        assert "not shown:" in out  # the least important columns made room


def test_report_null_group_is_empty_in_csv_and_null_in_json(tmp_path: Path):
    conn = open_database(tmp_path / "l.db")
    conn.execute(INSERT_ENTRY_SQL, entry_row(ledger_entry("req_x", tenant="acme", feature=None, cost="0.1")))
    conn.close()
    db = str(tmp_path / "l.db")
    (row,) = json.loads(_thrifty("report", "--by", "feature", "--format", "json", "--db", db).stdout)
    assert row["group"] is None
    (record,) = csv.DictReader(
        io.StringIO(_thrifty("report", "--by", "feature", "--format", "csv", "--db", db).stdout)
    )
    assert record["group"] == ""
