"""`thrifty batch submit|status|results|cancel` against a running gateway, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from tests import test_batch
from tests.conftest import KEYS
from tests.test_batch import _jsonl, _line

# The gateway and fake-provider fixtures of the batch tests.
oa, an, make_gateway, backend = test_batch.oa, test_batch.an, test_batch.make_gateway, test_batch.backend


def _thrifty(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", "batch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120", **env},
    )


def test_submit_wait_results_and_a_second_submit_resumes(make_gateway, oa, tmp_path: Path):
    server = make_gateway(routes={"evals": {"model": "gpt-4o-mini", "max_output_tokens": 64}})
    env = {"THRIFTY_BASE_URL": server.base_url, "THRIFTY_API_KEY": KEYS["acme"]}
    data = tmp_path / "nightly.jsonl"
    data.write_bytes(_jsonl([_line(f"n{i}", "gpt-4o") for i in range(3)] + [b"oops"]))

    oa.hold = True
    first = _thrifty("submit", str(data), "--route", "evals", env=env)  # then "the laptop crashes"
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.split()[1]
    assert batch_id.startswith("batch_")
    oa.release()
    again = _thrifty("submit", str(data), "--wait", env=env)
    assert again.returncode == 0, again.stderr
    assert f"resuming {batch_id}" in again.stdout and "completed (3 answered, 1 failed of 4)" in again.stdout
    assert oa.batch_creations == 1
    # --route put every line on the route: its model and its output cap.
    (sent,) = oa.batches.values()
    assert {line["body"]["model"] for line in sent.lines} == {"gpt-4o-mini"}
    assert {line["body"]["max_tokens"] for line in sent.lines} == {64}

    status = _thrifty("status", batch_id, env=env)
    assert status.returncode == 0 and "output file: file-" in status.stdout
    assert "error file: file-" in status.stdout
    out = tmp_path / "out.jsonl"
    results = _thrifty("results", batch_id, "--out", str(out), env=env)
    assert results.returncode == 0 and "3 lines" in results.stdout
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["n0", "n1", "n2"]
    errors = _thrifty("results", batch_id, "--errors", env=env)
    assert "line 4" in errors.stdout

    cancel = _thrifty("cancel", batch_id, env=env)
    assert cancel.returncode == 2 and "completed already" in cancel.stderr
    assert len(cancel.stderr.splitlines()) == 1
    unknown = _thrifty("status", "batch_nope", "--key", KEYS["globex"], env=env)
    assert unknown.returncode == 2 and "batch_nope" in unknown.stderr
    down = _thrifty("status", batch_id, "--base-url", "http://127.0.0.1:9/v1", env=env)
    assert down.returncode == 2 and "cannot reach the gateway" in down.stderr
    assert "Traceback" not in down.stderr


def test_bench_batch_runs_each_provider_through_its_wire_fake_at_exactly_half(tmp_path: Path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "thrifty", "bench", "batch", "--lines", "100", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "160"},
    )
    report = json.loads(out.read_text())
    # Speed is the bench's to measure, not this test's to assert: exit 1 only for the CPU target.
    assert run.returncode == 0 or (run.returncode == 1 and not report["cpu_ok"]), run.stdout + run.stderr
    assert report["cost_ratio_exact"]
    openai_run, anthropic_run = report["results"]
    assert openai_run["provider"] == "openai" and anthropic_run["provider"] == "anthropic"
    for result in (openai_run, anthropic_run):
        assert result["lines"] == 100 and Decimal(result["cost_ratio"]) == Decimal("0.5")
        assert result["ratio_exact"] and result["gateway_cpu_us_per_item"] > 0
        assert result["submit_s"] > 0 and result["collect_s"] >= 0
    M = Decimal(1_000_000)
    # 100 x (60 input x $0.075 + 20 output x $0.30 per 1M tokens) at gpt-4o-mini's batch price.
    assert Decimal(openai_run["batch_cost_usd"]) == 100 * (60 * Decimal("0.075") + 20 * Decimal("0.3")) / M
    assert Decimal(openai_run["realtime_cost_usd"]) == 100 * (60 * Decimal("0.15") + 20 * Decimal("0.6")) / M
    # claude-3-5-haiku: $0.80 / $4 per 1M tokens in real time, batch_discount 0.5.
    realtime = 100 * (60 * Decimal("0.8") + 20 * Decimal(4)) / M
    assert Decimal(anthropic_run["realtime_cost_usd"]) == realtime
    assert Decimal(anthropic_run["batch_cost_usd"]) == realtime / 2
    assert "CPU per item" in run.stdout and "exactly 0.5" in run.stdout
