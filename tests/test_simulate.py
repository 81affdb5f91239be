"""`thrifty simulate`: the savings stack on a hand-made workload whose every layer is known to the
Decimal, the same traffic through a live `thrifty serve`, and malformed traffic lines."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.conftest import KEYS, ledger_rows
from tests.simulate_helpers import HISTORY, traffic_lines, write_workload
from thrifty.settings import load_settings
from thrifty.simulate.engine import simulate
from thrifty.simulate.layers import stack_steps
from thrifty.simulate.traffic import parse_line, read_traffic
from thrifty.stores.keys import hash_key
from thrifty.tokens import TokenCounter

# Big: $10 in / $30 out per million tokens, so 100 in + 20 out = $0.0016; half that in a batch.
BASELINE = Decimal("0.0016") * 4 + Decimal("0.0056") + Decimal("0.0008") * 3 + Decimal("0.0016")


def _thrifty(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    tmp = tmp_path_factory.mktemp("simulate")
    traffic, outputs, settings = write_workload(tmp)
    svg = tmp / "stack.svg"
    run = _thrifty(
        "simulate", "--traffic", str(traffic), "--settings", str(settings), "--outputs", str(outputs),
        "--format", "json", "--svg", str(svg), "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert svg.read_text().startswith("<svg") and "dedup of retries" in svg.read_text()
    return tmp, json.loads(run.stdout)


def test_every_layer_of_the_stack_saves_exactly_what_the_hand_computation_says(stack):
    _, report = stack
    layers = {layer["layer"]: layer for layer in report["layers"]}  # type: ignore[index]
    assert [layer["layer"] for layer in report["layers"]] == [  # type: ignore[index]
        "dedup", "exact_cache", "semantic_cache", "context", "routing", "batch",
    ]  # fmt: skip
    assert Decimal(report["baseline_cost_usd"]) == BASELINE == Decimal("0.016")  # type: ignore[arg-type]
    # dedup: the retry with the same Idempotency-Key is answered from the first (one 100/20 call).
    assert Decimal(layers["dedup"]["saving_usd"]) == Decimal("0.0016")
    assert layers["dedup"]["detail"] == {"answered_by_dedup": 1}
    # exact: the same question from another user; the retry is now an exact hit too (still $0).
    assert Decimal(layers["exact_cache"]["saving_usd"]) == Decimal("0.0016")
    assert layers["exact_cache"]["requests_affected"] == 1 and layers["exact_cache"]["detail"] == {"hits": 2}
    assert layers["exact_cache"]["quality"]["rate"] == 1.0
    # semantic: the same question in lower case, without its question mark.
    assert Decimal(layers["semantic_cache"]["saving_usd"]) == Decimal("0.0016")
    assert layers["semantic_cache"]["quality"]["text"] == "precision 100.00% on 1 labelled hits"
    # context: history trimmed to the newest turn; input counted from what is sent, output as recorded.
    kept = TokenCounter().count_messages([HISTORY[-1]], "big-1").tokens
    trimmed_cost = Decimal(kept) * Decimal("0.00001") + Decimal("0.0006")
    assert Decimal(layers["context"]["saving_usd"]) == Decimal("0.0056") - trimmed_cost
    assert layers["context"]["detail"]["requests_trimmed"] == 1
    assert layers["context"]["quality"]["measured"] is False
    # routing: 2+2 drafted by small and accepted ($0.00008 instead of $0.0008); 3+3's draft fails the
    # JSON gate and escalates ($0.00008 + $0.0008); 5+5 has no recorded small output: not guessed.
    assert Decimal(layers["routing"]["saving_usd"]) == Decimal("0.0008") - Decimal("0.00008") - Decimal(
        "0.00008"
    )
    assert layers["routing"]["uninformed_requests"] == 1
    assert layers["routing"]["uninformed_for_want_of"] == {"small": 1}
    assert layers["routing"]["quality"]["scored"] == 2 and layers["routing"]["quality"]["rate"] == 1.0
    assert layers["routing"]["detail"] == {"answered_by_another_model": 1, "escalated": 1}
    # batch: the nightly feature at the provider's batch discount (half of $0.0016).
    assert Decimal(layers["batch"]["saving_usd"]) == Decimal("0.0008")
    total = sum(Decimal(layer["saving_usd"]) for layer in layers.values())
    assert Decimal(report["final_cost_usd"]) == BASELINE - total  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_simulate_and_a_live_thrifty_serve_agree_on_the_ledger_total(stack):
    tmp, report = stack
    live = tmp / "live"
    live.mkdir()
    traffic, _, settings = write_workload(live, tenants={"acme": {"key_hashes": [hash_key(KEYS["acme"])]}})
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "thrifty", "serve", "--config", str(settings), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60  # a loaded machine starts slowly
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "thrifty serve did not start"
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        for line in read_traffic([traffic]).lines:
            headers = {"x-thrifty-route": line.route or "", "x-thrifty-feature": line.feature or ""}
            if line.user:
                headers["x-thrifty-user"] = line.user
            if line.idempotency_key:
                headers["Idempotency-Key"] = line.idempotency_key
            # 5+5: no recorded draft of the small model, a 404 here as in the replay.
            with contextlib.suppress(openai.NotFoundError):
                client.chat.completions.with_raw_response.create(extra_headers=headers, **line.body())
        deadline = time.monotonic() + 60
        while len(rows := ledger_rows(live / "live.db")) < 9 or not any(r["batch"] for r in rows):
            assert time.monotonic() < deadline, "the deferred request was not answered"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    live_total = sum(Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] is not None)
    simulated = report["ledger_totals_usd"]["batch offload"]  # type: ignore[index]
    # The report counts 5+5 at its previous cost ($0.0008); the ledgers both have it as a $0 error.
    assert len(rows) == 9 and live_total == Decimal(simulated) == Decimal("0.00406")
    assert sorted(r["cache"] for r in rows) == sorted(["miss"] * 6 + ["exact", "exact", "semantic"])


def test_bad_traffic_lines_are_named_and_fail_the_command_unless_skipped(tmp_path: Path):
    traffic, _, settings = write_workload(tmp_path)
    good = traffic.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        good.splitlines()[0] + "\n{not json\n" + '{"ts": 1, "tenant": "acme"}\n'
        + '{"ts": "yesterday", "tenant": "acme", "request": {"messages": [{"role": "user", "content": "x"}]}}'
        + "\n"
        + '{"ts": 1, "tenant": "acme", "request": {"model": "big", "messages": []}, "colour": "red"}\n'
    )  # fmt: skip
    run = _thrifty("simulate", "--traffic", str(bad), "--settings", str(settings), "--no-progress")
    assert run.returncode == 2, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert f"{bad}:2: not JSON" in out
    assert f"{bad}:3: missing required field(s): request" in out
    assert f"{bad}:4: 'ts' 'yesterday' is not an ISO 8601 time" in out
    assert f"{bad}:5: unknown field(s) colour" in out
    assert "4 bad traffic lines of 5" in out and "--skip-bad" in out and "Traceback" not in out
    skipped = _thrifty(
        "simulate", "--traffic", str(bad), "--settings", str(settings), "--no-progress", "--skip-bad",
        "--format", "json",
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    data = json.loads(skipped.stdout[skipped.stdout.index("{") :])
    assert data["requests"] == 1 and len(data["skipped_lines"]) == 4


def test_a_layer_the_candidate_leaves_as_the_baseline_is_not_replayed(tmp_path: Path):
    _, _, settings = write_workload(tmp_path)
    candidate = load_settings(settings)
    plain = candidate.model_copy(
        update={"routes": {"faq": candidate.routes["faq"].model_copy(update={"semantic_cache": None})}}
    )
    steps = stack_steps(plain)
    assert [(s.layer, s.changed) for s in steps] == [
        (None, True), ("dedup", True), ("exact_cache", True), ("semantic_cache", False),
        ("context", False), ("routing", False), ("batch", False),
    ]  # fmt: skip
    assert steps[-1].settings.routes == plain.routes  # the last step is the candidate itself
    # With the current settings as the baseline, the layers it already has save nothing more.
    steps = stack_steps(plain, baseline=plain)
    assert [s.changed for s in steps[1:]] == [False] * 6
    lines = read_traffic([tmp_path / "traffic.jsonl"]).lines
    unknown = parse_line(orjson.dumps({**traffic_lines()[0], "route": "nope", "ts": 99}), "x.jsonl:1")
    report = simulate(plain, [*lines[:4], unknown], baseline=plain).report
    assert report.failed == 1 and "nope" in (report.failed_example or "")
    assert all(not layer.configured and layer.saving == 0 for layer in report.layers)
    # Keys honoured and the exact cache on from the start: the first question and its lower-case
    # paraphrase (no semantic cache here) are the two calls.
    assert report.baseline_cost == Decimal("0.0016") * 2


def test_the_traffic_format_round_trips_and_orders_by_time(tmp_path: Path):
    rows = list(reversed(traffic_lines()))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    read = read_traffic([path])
    assert [line.ts for line in read.lines] == sorted(r["ts"] for r in rows) and not read.bad
    iso = tmp_path / "iso.jsonl"
    iso.write_text(json.dumps({**rows[0], "ts": "2026-12-01T00:00:00Z"}) + "\n")
    assert read_traffic([iso]).lines[0].ts == 1796083200.0
