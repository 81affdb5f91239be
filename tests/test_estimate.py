"""`thrifty estimate`: every calculator against a hand computation, to the exact Decimal, and the
command as a user runs it (flags, a YAML spec, the ledger's month to date, bad input)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
import yaml

from tests.factories import ledger_entry
from tests.inprocess_cli import Cli, cli  # noqa: F401 (a fixture)
from thrifty.errors import InvalidData
from thrifty.planning import calculators as calc
from thrifty.planning.estimate import build_estimate
from thrifty.planning.prices import model_prices
from thrifty.planning.spec import build_spec
from thrifty.settings import settings_from_mapping
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database
from thrifty.types import Usage

MINI = calc.TokenPrices(D("0.15"), D("0.60"), D("0.075"))


def _thrifty(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


# -- the calculators ------------------------------------------------------------------------------


def test_the_seeds_worked_example_is_441_dollars_a_month():
    # 20,000 requests/day x (3,500 x $0.15 + 350 x $0.60) / 1M = $14.70 a day; 30 days: $441.
    est = calc.monthly_cost(calc.Workload(D(3500), D(350), D(20000)), MINI)
    assert est.cost_per_request == D("0.000735")
    assert est.daily_usd == D("14.7")
    assert est.monthly_usd == D("441")
    assert est.steps == () and est.adjusted_monthly_usd == D("441")


def test_the_price_source_gives_the_worked_examples_prices():
    prices = model_prices("gpt-4o-mini", None, prompt_tokens=3500)
    assert (prices.realtime.input, prices.realtime.output) == (D("0.15"), D("0.6"))
    assert prices.source == "genai-prices"
    assert prices.batch is not None and prices.batch.input == D("0.075")  # genai-prices' batch price


def test_the_stack_applies_retries_caches_and_batch_in_order():
    work = calc.Workload(D(1000), D(100), D(1000), D(30))
    # one call: (1000 x 0.15 + 100 x 0.6) / 1M = 0.00021; 30,000 requests: $6.30
    adj = calc.Adjustments(
        retry_factor=D("1.1"),
        cache_hit_rate=D("0.2"),
        semantic_hit_rate=D("0.25"),
        prompt_cache_share=D("0.5"),
        batch_share=D("0.5"),
    )
    batch = calc.TokenPrices(D("0.075"), D("0.3"), D("0.0375"))
    est = calc.monthly_cost(work, MINI, adj, batch)
    steps = {s.name: (s.monthly_usd, s.delta_usd) for s in est.steps}
    assert est.monthly_usd == D("6.3")
    assert steps["retries"] == (D("6.93"), D("0.63"))  # 33,000 calls
    assert steps["exact cache hits"] == (D("5.544"), D("-1.386"))  # 26,400 calls
    assert steps["semantic cache hits"] == (D("4.158"), D("-1.386"))  # 19,800 calls
    # prompt cache: (500 x 0.15 + 500 x 0.075 + 100 x 0.6) / 1M = 0.0001725 a call
    assert steps["provider prompt cache"] == (D("3.4155"), D("-0.7425"))
    # batch half: 0.5 x 0.0001725 + 0.5 x (500 x .075 + 500 x .0375 + 100 x .3) / 1M = 0.000129375
    assert steps["batch API"] == (D("2.561625"), D("-0.853875"))
    assert est.adjusted_monthly_usd == D("2.561625")
    assert list(steps) == [
        "retries",
        "exact cache hits",
        "semantic cache hits",
        "provider prompt cache",
        "batch API",
    ]


def test_a_batch_share_without_batch_prices_is_refused():
    with pytest.raises(ValueError):
        calc.monthly_cost(calc.Workload(D(1), D(1), D(1)), MINI, calc.Adjustments(batch_share=D("0.5")))


def test_cascade_blends_the_cheap_tier_and_the_escalations():
    strong = calc.TokenPrices(D("2.5"), D(10), D("1.25"))
    work = calc.Workload(D(1000), D(200), D(100), D(30))
    c = calc.cascade_cost(work, MINI, strong, D("0.8"), D(300), D(0))
    # cheap: (1000 x .15 + 200 x .6)/1M = 0.00027; escalation: (1300 x 2.5 + 200 x 10)/1M = 0.00525
    assert c.cheap_cost_per_request == D("0.00027")
    assert c.escalation_cost_per_request == D("0.00525")
    assert c.blended_cost_per_request == D("0.00027") + D("0.2") * D("0.00525")  # 0.00132
    assert c.strong_only_cost_per_request == D("0.0045")
    assert c.blended_monthly_usd == D("3.96") and c.strong_only_monthly_usd == D("13.5")
    assert c.saving_usd == D("9.54")


def test_self_hosting_break_even_counts_whole_gpus():
    # 1,000 tokens a request at $0.01: $10 per Mtok. A GPU: $1/h -> $720 a 30-day month; 100 tok/s
    # at utilisation 0.5 -> 129.6M tokens a month. API for one GPU's capacity: $1,296.
    host = calc.SelfHosting(D(1), D(100), D("0.5"), D(2000))
    work = calc.Workload(D(900), D(100), D(1000), D(30))  # 30M tokens a month
    be = calc.break_even("api", work, D("0.01"), host)
    assert be.api_usd_per_mtok == D(10)
    assert be.api_monthly_usd == D(300)
    assert (be.self_hosted_gpus, be.self_hosted_monthly_usd) == (1, D(2720))
    # margin per GPU 1,296 - 720 = 576; n* = ceil(2000 / 576) = 4; (2000 + 4 x 720) / $10/Mtok
    assert be.break_even_gpus == 4
    assert be.break_even_tokens_per_month == D("488000000")
    assert be.break_even_requests_per_day == D("488000000") / 1000 / 30
    # Below n* x capacity (518.4M) and above 3 GPUs' (388.8M): that is where the crossing is.
    assert D("388800000") < be.break_even_tokens_per_month <= D("518400000")


def test_self_hosting_never_breaks_even_when_a_gpu_costs_more_than_it_serves():
    host = calc.SelfHosting(D(10), D(100), D("0.5"), D(0))  # $7,200 a month for $1,296 of API tokens
    be = calc.break_even("api", calc.Workload(D(900), D(100), D(10)), D("0.01"), host)
    assert be.break_even_tokens_per_month is None and be.break_even_gpus is None


def test_fine_tuning_payback():
    work = calc.Workload(D(1000), D(100), D(2000), D(30))
    p = calc.fine_tuning_payback(work, D("0.003"), D("0.001"), D(400))
    assert p.saving_per_call == D("0.002")
    assert p.break_even_calls == D(200000)
    assert p.payback_days == D(100)  # $4 saved a day
    assert p.monthly_saving_usd == D(120)
    never = calc.fine_tuning_payback(work, D("0.001"), D("0.002"), D(400))
    assert never.payback_days is None and never.break_even_calls is None


def test_forecast_flags_only_more_than_twenty_percent_over():
    at_margin = calc.month_forecast(D(40), D(10), 30, D(100))  # 120: exactly 20% over
    assert at_margin.forecast_usd == D(120) and not at_margin.over_budget
    over = calc.month_forecast(D("40.01"), D(10), 30, D(100))
    assert over.over_budget
    assert not calc.month_forecast(D(40), D(10), 30, None).over_budget


# -- prices and specs -----------------------------------------------------------------------------


def _settings(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "storage": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "batch_discount": "0.4"}},
        "models": {
            "m": {"provider": "p", "price": {"input_per_mtok": "1", "output_per_mtok": "2"}},
            "mini": {"provider": "p", "upstream": "gpt-4o-mini"},
        },
        **extra,
    }


def test_settings_models_are_priced_as_the_gateway_prices_them(tmp_path: Path):
    settings = settings_from_mapping(_settings(tmp_path))
    override = model_prices("m", settings, prompt_tokens=10)
    assert override.source == "settings override"
    assert (override.realtime.input, override.realtime.output) == (D(1), D(2))
    # No batch price in an override: the provider's batch_discount gives one.
    assert override.batch is not None and override.batch.input == D("0.6")
    assert model_prices("mini", settings, prompt_tokens=10).realtime.input == D("0.15")


def test_tiered_prices_are_read_at_the_features_prompt_length():
    short = model_prices("claude-sonnet-4-5", None, prompt_tokens=10_000).realtime
    long = model_prices("claude-sonnet-4-5", None, prompt_tokens=250_000).realtime
    assert (short.input, short.output, short.cached_input) == (D(3), D(15), D("0.3"))
    assert (long.input, long.output, long.cached_input) == (D(6), D("22.5"), D("0.6"))


def test_spec_errors_name_the_field_and_the_flag():
    with pytest.raises(InvalidData, match=r"cache_hit_rate \(--cache-hit-rate\)"):
        build_spec(
            {
                "model": "m",
                "avg_input_tokens": 1,
                "avg_output_tokens": 1,
                "requests_per_day": 1,
                "cache_hit_rate": "1.5",
            },
            "flags",
        )
    with pytest.raises(InvalidData, match="latency_class: deferrable"):
        build_spec(
            {
                "model": "m",
                "avg_input_tokens": 1,
                "avg_output_tokens": 1,
                "requests_per_day": 1,
                "batch_share": "0.5",
            },
            "flags",
        )
    with pytest.raises(InvalidData, match="colour"):
        build_spec(
            {
                "model": "m",
                "avg_input_tokens": 1,
                "avg_output_tokens": 1,
                "requests_per_day": 1,
                "colour": "red",
            },
            "f.yaml",
        )


def test_a_deferrable_feature_goes_to_batch_and_needs_a_batch_price(tmp_path: Path):
    base = {"avg_input_tokens": 1000, "avg_output_tokens": 100, "requests_per_day": 1000}
    spec = build_spec({**base, "model": "gpt-4o-mini", "latency_class": "deferrable"}, "t")
    report = build_estimate(spec, None)
    assert report.monthly.adjusted_monthly_usd == D("3.15")  # all at half price: 6.30 / 2
    no_batch = build_spec({**base, "model": "claude-3-5-haiku-latest", "latency_class": "deferrable"}, "t")
    with pytest.raises(Exception, match="no batch price is known"):
        build_estimate(no_batch, None)
    discounted = build_spec(
        {**base, "model": "claude-3-5-haiku-latest", "latency_class": "deferrable", "batch_discount": "0.5"},
        "t",
    )
    # (1000 x 0.8 + 100 x 4) / 1M x 30,000 x 0.5
    assert build_estimate(discounted, None).monthly.adjusted_monthly_usd == D("18")


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture
def run(cli: Cli):  # noqa: F811
    def go(*args: str) -> subprocess.CompletedProcess[str]:
        code, out, err = cli(*args)
        return subprocess.CompletedProcess(list(args), code, out, err)

    return go


def test_estimate_flags_json_is_the_worked_example():
    out = _thrifty(
        "estimate",
        "--model",
        "gpt-4o-mini",
        "--avg-input-tokens",
        "3500",
        "--avg-output-tokens",
        "350",
        "--requests-per-day",
        "20000",
        "--format",
        "json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["monthly_usd"] == "441"
    assert doc["prices_usd_per_mtok"]["input"] == "0.15" and doc["price_source"] == "genai-prices"


def test_estimate_spec_file_with_every_section_and_flags_overriding(tmp_path: Path, run):
    spec = tmp_path / "feature.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "feature": "support",
                "model": "gpt-4o",
                "avg_input_tokens": 1000,
                "avg_output_tokens": 200,
                "requests_per_day": 50,  # overridden below
                "cascade": {"cheap_model": "gpt-4o-mini", "cheap_success_rate": 0.8},
                "self_hosting": {
                    "gpu_usd_per_hour": 1,
                    "gpu_tokens_per_second": 100,
                    "utilisation": 0.5,
                    "compare": ["gpt-4o-mini"],
                },
                "fine_tuning": {"setup_usd": 100, "usd_per_call": "0.001"},
            }
        )
    )
    out = run("estimate", "--spec", str(spec), "--requests-per-day", "100", "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # gpt-4o: (1000 x 2.5 + 200 x 10)/1M = 0.0045 a request; 3,000 a month
    assert doc["cost_per_request_usd"] == "0.0045" and doc["monthly_usd"] == "13.5"
    assert doc["cascade"]["blended_cost_per_request_usd"] == "0.00117"  # 0.00027 + 0.2 x 0.0045
    assert [b["model"] for b in doc["self_hosting"]] == ["gpt-4o", "gpt-4o-mini"]
    assert doc["fine_tuning"]["payback_days"] == "285.714286"  # 100 / (0.0035 x 100)
    table = run("estimate", "--spec", str(spec))
    assert table.returncode == 0, table.stderr
    for text in ("6.75", "cascade", "self-hosting break-even", "fine-tuning"):
        assert text in table.stdout


def test_estimate_bad_input_is_one_line_exit_2(tmp_path: Path, run):
    bad = _thrifty(
        "estimate",
        "--model",
        "gpt-4o-mini",
        "--avg-input-tokens",
        "lots",
        "--avg-output-tokens",
        "1",
        "--requests-per-day",
        "1",
    )
    assert bad.returncode == 2 and "avg_input_tokens (--avg-input-tokens)" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run("estimate", "--model", "gpt-4o-mini")
    assert missing.returncode == 2 and "avg_input_tokens" in missing.stderr
    unknown = run(
        "estimate",
        "--model",
        "no-such-model-x",
        "--avg-input-tokens",
        "1",
        "--avg-output-tokens",
        "1",
        "--requests-per-day",
        "1",
    )
    assert unknown.returncode == 2 and "no price known for model 'no-such-model-x'" in unknown.stderr
    (tmp_path / "s.yaml").write_text("- a list\n")
    listed = run("estimate", "--spec", str(tmp_path / "s.yaml"))
    assert listed.returncode == 2 and "is a mapping" in listed.stderr


def _ts(day: int, hour: int = 12) -> float:
    return datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()


def test_from_ledger_takes_the_averages_and_flags_a_forecast_over_budget(tmp_path: Path, run):
    settings = _settings(
        tmp_path,
        tenants={
            "acme": {"features": {"support": {"budget": {"usd_per_month": "100"}}}},
            "globex": {"features": {"support": {"budget": {"usd_per_month": "100"}}}},
        },
    )
    config = tmp_path / "thrifty.yaml"
    config.write_text(yaml.safe_dump(settings))
    conn = open_database(tmp_path / "ledger.db")
    entries = []
    for i in range(4):  # acme: $10 each, 1,000 in (100 cached) / 100 out, one retry among them
        e = ledger_entry(
            f"a{i}",
            ts=_ts(2 + i),
            tenant="acme",
            feature="support",
            cost="10",
            usage=Usage(input_tokens=1000, cached_input_tokens=100, output_tokens=100),
        )
        entries.append(dataclasses.replace(e, retries=1 if i == 0 else 0))
    # globex: $50 upstream, and a cache hit (no upstream call, no cost)
    entries.append(
        ledger_entry(
            "g0",
            ts=_ts(3),
            tenant="globex",
            feature="support",
            cost="50",
            usage=Usage(input_tokens=3000, output_tokens=300),
        )
    )
    hit = ledger_entry("g1", ts=_ts(4), tenant="globex", feature="support", cost="0", usage=Usage())
    entries.append(dataclasses.replace(hit, cache="exact", attempts=()))
    entries.append(ledger_entry("x", ts=_ts(4), tenant="acme", feature="other", cost="999"))
    entries.append(ledger_entry("old", ts=_ts(1) - 86400, tenant="acme", feature="support", cost="999"))
    entries.append(ledger_entry("later", ts=_ts(20), tenant="acme", feature="support", cost="999"))
    for e in entries:
        conn.execute(INSERT_ENTRY_SQL, entry_row(e))
    conn.close()
    out = run(
        "estimate",
        "--from-ledger",
        "--feature",
        "support",
        "--config",
        str(config),
        "--as-of",
        "2026-11-11T00:00:00+00:00",
        "--format",
        "json",
    )
    assert out.returncode == 1, out.stderr  # globex is forecast 50% over its budget
    doc = json.loads(out.stdout)
    forecast = {f["tenant"]: f for f in doc["forecast"]}
    # 10 of 30 days gone: acme $40 -> $120 (exactly +20%: not flagged); globex $50 -> $150
    assert forecast["acme"]["forecast_usd"] == "120" and not forecast["acme"]["over_budget"]
    assert forecast["globex"]["forecast_usd"] == "150" and forecast["globex"]["over_budget"]
    assert doc["over_budget"] is True
    # averages over the 5 upstream requests: (4 x 1000 + 3000) / 5 = 1400 in, 140 out
    assert doc["model"] == "m" and doc["avg_input_tokens"] == "1400" and doc["avg_output_tokens"] == "140"
    assert doc["requests_per_day"] == "0.6"  # 6 requests in 10 days
    assert doc["adjustments"]["cache_hit_rate"] == "0.1666666666666666666666666667"  # 1 of 6
    assert doc["adjustments"]["semantic_hit_rate"] == "0"
    assert doc["adjustments"]["retry_factor"] == "1.2"
    # m at $1/$2: (1400 + 280)/1M = 0.00168 a request, x 0.6 x 30
    assert doc["cost_per_request_usd"] == "0.00168" and doc["monthly_usd"] == "0.03024"
    table = run(
        "estimate",
        "--from-ledger",
        "--feature",
        "support",
        "--config",
        str(config),
        "--as-of",
        "2026-11-11T00:00:00+00:00",
        "--tenant",
        "acme",
    )
    assert table.returncode == 0, table.stderr
    assert "120.00" in table.stdout and "OVER BUDGET" not in table.stdout
    none = run(
        "estimate",
        "--from-ledger",
        "--feature",
        "nope",
        "--config",
        str(config),
        "--as-of",
        "2026-11-11T00:00:00+00:00",
    )
    assert none.returncode == 2 and "no requests of feature 'nope'" in none.stderr


def test_ledger_rates_split_exact_repeats_and_semantic_hits():
    from thrifty.planning.ledger_usage import spec_values, summarise

    def row(cache: str, cost: str | None = "1", batch: int = 0, retries: int = 0) -> tuple:
        # (ts, tenant, feature, model, cache, batch, status, cost, in, cached, out, retries, attempts)
        return (0.0, "t", "f", "m", cache, batch, "ok", cost, 100, 25, 10, retries, "[]")

    rows = [
        row("miss", retries=1),
        row("miss", batch=1),
        row("miss", cost=None),
        row("exact", "0"),
        row("dedup", "0"),
        row("semantic", "0"),
    ]
    usage = summarise(rows)
    assert (usage.requests, usage.upstream, usage.semantic, usage.unpriced) == (6, 3, 1, 1)
    values = spec_values(usage, D(2), 30)
    assert values["cache_hit_rate"] == D(2) / 6  # the exact hit and the repeat
    assert values["semantic_hit_rate"] == D(1) / 4  # of the 4 the exact cache did not answer
    assert values["requests_per_day"] == D(3) and values["retry_factor"] == D(1) + D(1) / 3
    assert values["prompt_cache_share"] == D("0.25") and values["batch_share"] == D(1) / 3
    assert values["latency_class"] == "deferrable" and values["model"] == "m"
    assert usage.cost_usd == D(2)
