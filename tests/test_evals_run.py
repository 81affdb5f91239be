"""`thrifty eval run` through the in-process gateway: priced and in the ledger, reproducing recorded
accuracies exactly, resumable after SIGKILL without calling a finished item again; `eval gate`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from tests.conftest import UPSTREAM_KEY, base_settings
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.errors import InvalidData
from thrifty.evals.command import run_command
from thrifty.evals.gate import gate
from thrifty.routing.train.data import load_rows

ZEROEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "zeroeval"


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=160)


def _ledger(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY ts")]


@pytest.mark.skipif(not ZEROEVAL.is_dir(), reason="the shared ZeroEval data is not here")
def test_replay_reproduces_each_models_recorded_accuracy_and_its_cost_is_the_ledgers(tmp_path: Path):
    lines = (ZEROEVAL / "gsm.jsonl").read_bytes().splitlines()[:25] + (
        ZEROEVAL / "crux.jsonl"
    ).read_bytes().splitlines()[:20]
    golden = tmp_path / "slice.jsonl"
    golden.write_bytes(b"\n".join(lines) + b"\n")
    upstreams = {
        "mini": "gpt-4o-mini-2024-07-18",
        "haiku": "claude-3-haiku-20240307",
        "g35": "gpt-3.5-turbo-0125",
    }
    settings = base_settings(
        tmp_path,
        providers={"replay": {"kind": "replay", "data": [str(golden)]}},
        models={alias: {"provider": "replay", "upstream": up} for alias, up in upstreams.items()},
    )
    out = tmp_path / "results.json"
    results = run_command(
        settings, golden_path=golden, models="mini,haiku,g35", route=None, out=out, tenant="acme",
        concurrency=4, confidence=0.95, labelled_out=None, console=_quiet(),
    )  # fmt: skip
    rows = [orjson.loads(line) for line in lines]
    ledger = _ledger(tmp_path / "ledger.db")
    assert len(ledger) == 3 * 45 and {r["feature"] for r in ledger} == {"eval"}
    for alias, upstream in upstreams.items():
        summary = results["models"][alias]
        assert summary["passed"] == sum(r["responses"][upstream]["correct"] for r in rows)
        assert (summary["items"], summary["failures"]) == (45, 0)
        low, high = summary["ci"]
        assert low < summary["accuracy"] < high or summary["accuracy"] == 1.0
        # The eval's cost is the ledger's, to the exact Decimal.
        spent = sum((Decimal(r["cost_usd"]) for r in ledger if r["model"] == alias), Decimal(0))
        assert Decimal(summary["cost_usd"]) == spent > 0
        assert Decimal(summary["cost_per_success_usd"]) == spent / summary["passed"]
    # The labelled outputs are ZeroEval rows under the upstream ids, which `route train` loads.
    labelled = load_rows([tmp_path / "results.zeroeval.jsonl"])
    assert len(labelled) == 45
    assert set(labelled[0].calls) == set(upstreams.values())
    by_id = {r["id"]: r for r in rows}
    for row in labelled:
        for model, call in row.calls.items():
            assert call.correct is bool(by_id[row.id]["responses"][model]["correct"])


def test_the_judge_is_called_through_the_gateway_and_its_cost_is_the_evals(
    tmp_path: Path, openai_upstream: OpenAIWireServer, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    openai_upstream.by_model["gpt-4o-mini"] = [Reply(text="Paris is the capital"), Reply(text="Lyon")]
    openai_upstream.by_model["gpt-4o-2024-08-06"] = [
        Reply(text="PASS", prompt_tokens=100, completion_tokens=1),
        Reply(text="FAIL: wrong city", prompt_tokens=100, completion_tokens=4),
    ]
    golden = tmp_path / "set.jsonl"
    judge = {"model": "judge", "rubric": "Names the capital of France"}
    golden.write_bytes(
        b"".join(
            orjson.dumps({"id": i, "prompt": f"Capital of France ({i})?", "scorer": "judge", "judge": judge})
            + b"\n"
            for i in ("a", "b")
        )
    )
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}},
        models={
            "mini": {"provider": "up", "upstream": "gpt-4o-mini"},
            "judge": {"provider": "up", "upstream": "gpt-4o-2024-08-06"},
        },
    )
    results = run_command(
        settings, golden_path=golden, models="mini", route=None, out=tmp_path / "r.json", tenant="acme",
        concurrency=1, confidence=0.95, labelled_out=None, console=_quiet(),
    )  # fmt: skip
    summary = results["models"]["mini"]
    assert (summary["passed"], summary["items"]) == (1, 2)
    judged = [r for r in _ledger(tmp_path / "ledger.db") if r["feature"] == "eval-judge"]
    assert len(judged) == 2
    # gpt-4o at $2.50 / $10 per 1M: 2 x 100 input tokens, 1 + 4 output tokens.
    expected = (200 * Decimal("2.5") + 5 * Decimal(10)) / 10**6
    assert Decimal(summary["judge_cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in judged) == expected
    assert Decimal(summary["eval_cost_usd"]) == Decimal(summary["cost_usd"]) + expected
    # The judge saw the rubric and the answer it grades.
    judge_prompt = openai_upstream.requests[1]["messages"][1]["content"]
    assert "Names the capital of France" in judge_prompt and "Paris is the capital" in judge_prompt


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args], capture_output=True, text=True, cwd=cwd, timeout=60,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
    )  # fmt: skip


def test_a_run_killed_midway_resumes_without_calling_a_finished_item_again(
    tmp_path: Path, openai_upstream: OpenAIWireServer
):
    openai_upstream.default = Reply(text="the answer is 42", delay_s=0.1)
    items = 16
    (tmp_path / "set.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"id": f"q{i}", "prompt": f"question {i}", "scorer": "contains", "expected": "42"})
            + b"\n"
            for i in range(items)
        )
    )
    (tmp_path / "thrifty.yaml").write_text(
        "storage: {url: 'sqlite:///ledger.db'}\n"
        f"providers: {{up: {{kind: openai, base_url: '{openai_upstream.base_url}', api_key_env: UP_KEY}}}}\n"
        "models: {mini: {provider: up, upstream: gpt-4o-mini}}\n"
        "tenants: {acme: {key_hashes: []}}\n"
        "idempotency: {lease_s: 1.5}\n"
    )
    args = ("eval", "run", "--set", "set.jsonl", "--models", "mini", "--out", "r.json", "--concurrency", "2")
    env = {**os.environ, "UP_KEY": UPSTREAM_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "thrifty", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    journal = tmp_path / "r.json.journal"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1 + 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {
        orjson.loads(line)["id"] for line in journal.read_bytes().splitlines()[1:] if line.endswith(b"}")
    }
    assert 5 <= len(finished) < items
    time.sleep(1.6)  # calls in flight at the kill are refused (409) until their idempotency lease ends
    out = _cli(*args, cwd=tmp_path, env={"UP_KEY": UPSTREAM_KEY})
    assert out.returncode == 0, out.stderr
    calls: dict[str, int] = {}
    for request in openai_upstream.requests:
        prompt = request["messages"][-1]["content"]
        calls[prompt] = calls.get(prompt, 0) + 1
    assert all(calls[f"question {i[1:]}"] == 1 for i in finished)
    assert len(calls) == items and max(calls.values()) <= 2  # only calls cut by the kill are made again
    results = orjson.loads((tmp_path / "r.json").read_bytes())
    assert (results["models"]["mini"]["items"], results["models"]["mini"]["passed"]) == (items, items)
    # A third run finds everything done and calls nothing.
    before = len(openai_upstream.requests)
    assert _cli(*args, cwd=tmp_path, env={"UP_KEY": UPSTREAM_KEY}).returncode == 0
    assert len(openai_upstream.requests) == before


def _results(
    items: dict[str, bool], cps: str | None, fingerprint: str = "f1", model: str = "m"
) -> dict[str, Any]:
    return {
        "thrifty_eval_results": 1,
        "set": "set.jsonl",
        "set_fingerprint": fingerprint,
        "models": {model: {"cost_per_success_usd": cps}},
        "items": {model: items},
    }


def _items(passed: int, n: int = 200) -> dict[str, bool]:
    return {f"q{i}": i < passed for i in range(n)}


def test_the_gate_fails_only_a_confident_drop_beyond_the_margin():
    base = _results(_items(180), "0.001")
    assert gate(base, _results(_items(180), "0.001"), max_drop=0.01).passed
    assert gate(base, _results(_items(178), "0.001"), max_drop=0.01).passed  # 1 pp, within the margin
    verdict = gate(base, _results(_items(160), "0.001"), max_drop=0.01)  # 10 pp, on the same items
    assert not verdict.passed and "quality dropped by more than 1 pp" in verdict.reasons[0]
    # A small set cannot be confident of a 2-item drop: it passes and says what it measured.
    small = gate(_results(_items(9, 10), None), _results(_items(8, 10), None), max_drop=0.01)
    assert small.passed and "change -10.00 pp" in small.notes[0]
    costly = gate(base, _results(_items(180), "0.0013"), max_drop=0.01, max_cost_ratio=1.2)
    assert not costly.passed and "x1.300" in costly.reasons[0]
    assert gate(base, _results(_items(180), "0.0011"), max_drop=0.01, max_cost_ratio=1.2).passed


def test_gate_exit_codes(tmp_path: Path):
    files = {
        "base": _results(_items(180), "0.001"),
        "same": _results(_items(181), "0.001"),
        "worse": _results(_items(150), "0.001"),
        "dearer": _results(_items(180), "0.002"),
        "other": _results(_items(180), "0.001", fingerprint="f2"),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_bytes(orjson.dumps(data))

    def run(candidate: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return _cli("eval", "gate", "--baseline", "base.json", "--candidate", f"{candidate}.json",
                    "--max-drop", "1pp", *extra, cwd=tmp_path)  # fmt: skip

    assert run("same").returncode == 0
    worse = run("worse")
    assert worse.returncode == 1 and "FAIL: quality dropped by more than 1 pp" in worse.stdout
    dearer = run("dearer", "--max-cost-ratio", "1.5")
    assert dearer.returncode == 1 and "cost per successful task rose x2.000" in dearer.stdout
    other = run("other")
    assert (
        other.returncode == 2 and "different golden sets" in other.stderr and "Traceback" not in other.stderr
    )
    bad = _cli("eval", "gate", "--baseline", "base.json", "--candidate", "nope.json", cwd=tmp_path)
    assert bad.returncode == 2 and "cannot read results file nope.json" in bad.stderr


def test_run_refuses_unknown_models_routes_tenants_and_a_journal_of_another_set(tmp_path: Path):
    golden = tmp_path / "set.jsonl"
    golden.write_bytes(orjson.dumps({"id": "a", "prompt": "q", "scorer": "exact", "expected": "x"}) + b"\n")
    recorded = tmp_path / "recorded.jsonl"
    row = {
        "id": "r",
        "prompt": "other",
        "reference": "x",
        "responses": {"gpt-4o-mini-2024-07-18": {"output": "x"}},
    }
    recorded.write_bytes(orjson.dumps(row) + b"\n")
    settings = base_settings(
        tmp_path,
        providers={"replay": {"kind": "replay", "data": [str(recorded)]}},
        models={"mini": {"provider": "replay", "upstream": "gpt-4o-mini-2024-07-18"}},
    )
    out = tmp_path / "r.json"

    def run(**kw: Any) -> Any:
        args: dict[str, Any] = {
            "golden_path": golden, "models": "mini", "route": None, "out": out, "tenant": "acme",
            "concurrency": 1, "confidence": 0.95, "labelled_out": None, "console": _quiet(),
        }  # fmt: skip
        return run_command(settings, **{**args, **kw})

    for kw, message in [
        ({"models": "mini,gpt-5"}, "there is no model 'gpt-5'"),
        ({"route": "cheap"}, "there is no route 'cheap'"),
        ({"tenant": None}, "name the one to bill with --tenant"),
        ({"tenant": "initech"}, "there is no tenant 'initech'"),
        ({"models": None}, "give the models to evaluate"),
        ({"concurrency": 0}, "--concurrency must be at least 1"),
    ]:
        with pytest.raises(InvalidData, match=message):
            run(**kw)
    assert not out.with_name("r.json.journal").exists()  # nothing started
    assert run()["models"]["mini"]["failures"] == 1  # the prompt is not recorded: a failure, not a crash
    golden.write_bytes(orjson.dumps({"id": "a", "prompt": "q2", "scorer": "exact", "expected": "x"}) + b"\n")
    with pytest.raises(InvalidData, match="this journal is of another golden set"):
        run()


def test_an_answer_that_reached_the_gateway_but_not_the_journal_is_not_generated_again(
    tmp_path: Path, openai_upstream: OpenAIWireServer, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    openai_upstream.default = Reply(text="42", prompt_tokens=1000, completion_tokens=10)
    golden = tmp_path / "set.jsonl"
    golden.write_bytes(
        b"".join(
            orjson.dumps({"id": f"q{i}", "prompt": f"question {i}", "scorer": "exact", "expected": "42"})
            + b"\n"
            for i in range(3)
        )
    )
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}},
        models={"mini": {"provider": "up", "upstream": "gpt-4o-mini"}},
    )
    out = tmp_path / "r.json"

    def run() -> dict[str, Any]:
        return run_command(
            settings, golden_path=golden, models="mini", route=None, out=out, tenant="acme",
            concurrency=1, confidence=0.95, labelled_out=None, console=_quiet(),
        )  # fmt: skip

    first = run()["models"]["mini"]
    journal = out.with_name("r.json.journal")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # the last line cut mid-write
    again = run()["models"]["mini"]
    assert len(openai_upstream.requests) == 3  # the cut item was answered by the idempotency store
    assert (again["passed"], again["items"]) == (3, 3)
    # It still costs what its one call cost, which is what the ledger holds.
    ledger = _ledger(tmp_path / "ledger.db")
    assert (
        Decimal(again["cost_usd"])
        == Decimal(first["cost_usd"])
        == sum(Decimal(r["cost_usd"]) for r in ledger)
    )
    assert [r["cache"] for r in ledger].count("dedup") == 1


def test_a_scheduled_run_whose_pass_rate_drops_raises_one_drift_alert(tmp_path: Path):
    recorded = tmp_path / "recorded.jsonl"
    golden = tmp_path / "set.jsonl"
    mini = "gpt-4o-mini-2024-07-18"
    rows = [
        {"id": f"q{i}", "task": "gsm", "prompt": f"q{i}?", "reference": "1",
         "responses": {mini: {"output": '{"answer": "1"}' if i < 2 else "no", "correct": int(i < 2)}}}
        for i in range(4)
    ]  # fmt: skip
    recorded.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    golden.write_bytes(recorded.read_bytes())
    settings = base_settings(
        tmp_path,
        providers={"replay": {"kind": "replay", "data": [str(recorded)]}},
        models={"mini": {"provider": "replay", "upstream": mini}},
    )

    def run(out: str, **kw: Any) -> dict[str, Any]:
        return run_command(
            settings, golden_path=golden, models="mini", route=None, out=tmp_path / out, tenant="acme",
            concurrency=2, confidence=0.95, labelled_out=None, console=_quiet(), **kw,
        )  # fmt: skip

    first = run("first.json")
    base = {**first, "items": {"mini": dict.fromkeys(first["items"]["mini"], True)}}  # it used to pass all 4
    (tmp_path / "base.json").write_bytes(orjson.dumps(base))

    def alerts() -> list[tuple[str, str]]:
        with sqlite3.connect(tmp_path / "ledger.db") as conn:
            return list(conn.execute("SELECT kind, message FROM alerts WHERE kind = 'eval_drift'"))

    assert run("ok.json", baseline=tmp_path / "base.json", alert_drop="60pp")["drift"] == []
    assert alerts() == []
    drifted = run("nightly.json", baseline=tmp_path / "base.json", alert_drop="10pp")
    assert drifted["drift"] == [{"model": "mini", "items": 4, "baseline_rate": 1.0, "rate": 0.5}]
    assert alerts() == [
        ("eval_drift", f"eval of mini on {golden}: pass rate 50.0% vs the baseline's 100.0% on 4 items")
    ]
    run("nightly.json", baseline=tmp_path / "base.json", alert_drop="10pp")  # the same run, resumed
    assert len(alerts()) == 1
    with pytest.raises(InvalidData, match="--baseline and --alert-drop go together"):
        run("x.json", baseline=tmp_path / "base.json")
