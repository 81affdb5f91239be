"""`thrifty bench overhead` end to end, tiny: real processes on 127.0.0.1, the Python generator."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
from rich.console import Console

from thrifty.bench.loadgen import LoadSpec, _lua_string, parse_wrk, percentile, wrk_script
from thrifty.bench.overhead import run_overhead_bench
from thrifty.bench.servers import _chat_url
from thrifty.bench.stub import answer


def test_bench_overhead_runs_all_targets_and_keeps_the_ledger(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    printed = io.StringIO()
    console = Console(file=printed, width=160)
    report = run_overhead_bench(
        json_out=out,
        duration=0.5,
        litellm_url=None,
        console=console,
        generator="python",
        concurrencies=(1, 4),
        warmup=0.2,
        base_set=["metrics.enabled=false"],
        ab_rounds=2,
        ab_duration=0.3,
    )
    written = orjson.loads(out.read_bytes())
    assert written == orjson.loads(orjson.dumps(report))
    assert written["generator"].startswith("python")
    assert written["machine"]["cpus"] >= 1
    cells = {(r["target"], r["concurrency"]): r for r in written["results"]}
    assert set(cells) == {(t, c) for t in ("direct", "thrifty", "base", "passthrough") for c in (1, 4)}
    # Interleaved A/B rounds against the base: each round's ratio, then their median and spread.
    rounds = written["ab_rounds"]
    assert [(r["concurrency"], r["round"]) for r in rounds] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    for r in rounds:
        assert r["cpu_ratio"] == round(r["thrifty_cpu_us_per_req"] / r["base_cpu_us_per_req"], 4) or (
            abs(r["cpu_ratio"] - r["thrifty_cpu_us_per_req"] / r["base_cpu_us_per_req"]) < 0.01
        )
    c1 = written["ab_summary"]["c1"]
    assert c1["rounds"] == 2 and c1["min"] <= c1["median_cpu_ratio"] <= c1["max"]
    for cell in cells.values():
        assert cell["rps"] > 0
        assert cell["errors"] == 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
    # The Python generator waits for every request in flight, so the count is exact.
    ledger = written["ledger"]
    assert ledger["uncounted_in_flight_max"] == 0
    assert ledger["rows_http_200"] == ledger["answered_200"] > 0
    assert ledger["ok"] and written["ok"]
    assert {"thrifty_added_p50_ms_c1", "thrifty_over_passthrough_rps_c4"} <= set(written["ratios"])
    text = printed.getvalue()
    assert "thrifty ledger" in text and "passthrough" in text
    assert "median of 2 interleaved rounds" in text


def test_stub_answers_like_openai() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    raw = answer(b"POST", b"/v1/chat/completions", body, keep_alive=True)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    completion = orjson.loads(payload)
    assert completion["object"] == "chat.completion" and completion["model"] == "m"
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0

    stream = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    raw = answer(b"POST", b"/chat/completions", stream, keep_alive=True)
    assert b"transfer-encoding: chunked" in raw and raw.endswith(b"0\r\n\r\n")
    events = [line.strip() for line in raw.split(b"\r\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    usage_chunk = orjson.loads(events[-2][len(b"data: ") :])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0

    assert answer(b"GET", b"/nowhere", b"", keep_alive=True).startswith(b"HTTP/1.1 404")
    assert answer(b"POST", b"/v1/chat/completions", b"{", keep_alive=False).startswith(b"HTTP/1.1 400")


def test_wrk_script_and_summary() -> None:
    spec = LoadSpec("http://127.0.0.1:1/v1/chat/completions", b'{"a":"]]"}', {"Authorization": "Bearer k]"})
    script = wrk_script(spec)
    assert 'wrk.body = [=[{"a":"]]"}]=]' in script
    assert "wrk.headers[ [[Authorization]] ] = [=[Bearer k]]=]" in script
    assert _lua_string("x]") == "[=[x]]=]"
    result = parse_wrk("Running 1s test\nTHRIFTY_WRK 1000 2000000 0 1 0 0 3 250 1200\n", concurrency=8)
    assert (result.requests, result.ok, result.non_2xx, result.socket_errors) == (1000, 997, 3, 1)
    assert (result.p50_ms, result.p99_ms, result.rps, result.errors) == (0.25, 1.2, 500.0, 4)


def test_percentile_and_chat_url() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0
    assert _chat_url("http://127.0.0.1:4000") == "http://127.0.0.1:4000/v1/chat/completions"
    assert _chat_url("http://127.0.0.1:4000/v1/") == "http://127.0.0.1:4000/v1/chat/completions"
