"""`thrifty bench simulate` on a small demo workload: every replayed step timed, the whole run's CPU
and peak memory reported (what the numbers say is measured by running it at 100,000 requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_bench_simulate_times_every_step_and_reports_cpu_and_memory(tmp_path: Path):
    out, work = tmp_path / "bench.json", tmp_path / "work"
    run = subprocess.run(
        [
            sys.executable, "-m", "thrifty", "bench", "simulate", "--requests", "120",
            "--workdir", str(work), "--json", str(out), "--no-progress",
        ],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert [s["step"] for s in report["steps"]] == [
        "baseline", "dedup of retries", "exact cache", "semantic cache", "context budgets",
        "routing / cascades", "batch offload",
    ]  # fmt: skip
    assert all(s["requests"] == report["requests"] and s["requests_per_s"] > 0 for s in report["steps"])
    assert report["requests_through_the_pipeline"] == 7 * report["requests"]
    assert report["simulate_cpu_s"] > 0 and report["peak_rss_mb"]["largest_step_process"] > 0
    assert "steps replayed" in report["phases_s"] and "queries embedded (batched)" in report["phases_s"]
    assert "requests x 7 steps" in run.stdout
    assert 0 < float(report["candidate_usd"]) < float(report["baseline_usd"])
