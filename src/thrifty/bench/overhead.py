"""`thrifty bench overhead`: what thrifty adds over calling the upstream directly, in one run.

Every column is measured in the same run against the same local stub upstream, so the ratios
between them mean something even on a shared, noisy machine where absolute times drift:

  direct       the load generator straight to the stub: the floor.
  thrifty      `thrifty serve` in front of the stub: auth, pricing, token accounting, ledger.
  passthrough  a bare ASGI proxy on the same server stack: the ceiling for Python here.
  litellm      LiteLLM's proxy in front of the same stub, when asked for.
  base         thrifty from another source tree (`--base-src`, e.g. a git worktree of an older
               commit), same settings: what a change costs, as a ratio measured in the same run.

Each server runs in its own process on an ephemeral 127.0.0.1 port; concurrencies are measured
one after another with all targets interleaved at each level, so drift hits every column alike.
Afterwards thrifty's ledger is counted: a gateway that drops ledger rows under load must not look
fast.
"""

from __future__ import annotations

import os
import platform
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from thrifty.bench.loadgen import (
    BenchError,
    Generator,
    LoadResult,
    resolve_generator,
    run_load,
    wrk_version,
)
from thrifty.bench.servers import (
    LITELLM_START_TIMEOUT_S,
    REQUEST,
    START_TIMEOUT_S,
    Target,
    _chat_url,
    _cpu_seconds,
    _free_ports,
    _litellm_version,
    _Processes,
    _request,
    _settings_yaml,
    _sigterm_exits,
    _smoke,
    _start_litellm,
    _start_local_servers,
    _version,
    _wait_until,
)

TARGETS = ("direct", "thrifty", "base", "passthrough", "litellm")
DEFAULT_CONCURRENCIES = (1, 16, 64)
# Targets from the issue, for the pass/fail marks.
MAX_ADDED_P50_MS = 1.0
MIN_OVER_LITELLM = 30.0
MIN_OVER_PASSTHROUGH = 0.5
# A measurement with more failed requests than this is not a measurement.
MAX_ERROR_RATE = 0.001

# Only loopback traffic: never route the readiness probes through an environment proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _count_ledger(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        total, ok = conn.execute(
            "SELECT count(*), coalesce(sum(http_status = 200), 0) FROM ledger"
        ).fetchone()
    finally:
        conn.close()
    return int(total), int(ok)


def run_overhead_bench(
    *,
    json_out: Path | None,
    duration: float,
    litellm_url: str | None,
    console: Console,
    litellm_venv: Path | None = None,
    litellm_key: str | None = None,
    generator: Generator = "auto",
    concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES,
    warmup: float | None = None,
    base_src: Path | None = None,
    base_set: Sequence[str] = (),
    ab_rounds: int = 0,
    ab_duration: float | None = None,
) -> dict[str, Any]:
    """Run the bench, print the table and ratios, write JSON; return the report.

    `ab_rounds` (with a base): after the table, that many rounds per concurrency of thrifty and
    the base measured back to back (`ab_duration` seconds each, default `duration`), in ABBA order;
    the CPU-per-request ratio of each round, and their median and spread, are reported: a change
    smaller than the drift between two single runs is measured that way, not guessed.

    `base_src`: a source tree (its `src/` holds the package) whose thrifty runs as the `base`
    column, for the CPU and latency a change adds (`thrifty_over_base_*` ratios); `base_set`:
    settings of the base (`metrics.enabled=false`), on this tree unless `base_src` is given.

    `litellm_url` measures a LiteLLM proxy already running (its key from `litellm_key` or
    $LITELLM_MASTER_KEY); `litellm_venv` starts `VENV/bin/litellm` against this run's own stub.
    """
    if litellm_url and litellm_venv:
        raise BenchError("give either a running LiteLLM (litellm_url) or a venv to start it, not both")
    if duration <= 0:
        raise BenchError("duration must be positive")
    if ab_rounds and base_src is None and not base_set:
        raise BenchError("A/B rounds compare thrifty with a base: give --base-set or --base-src")
    gen = resolve_generator(generator)
    levels = sorted(set(concurrencies))
    warm = min(2.0, duration) if warmup is None else warmup
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-") as tmp, _sigterm_exits():
        procs = _Processes(Path(tmp))
        try:
            report = _run(
                procs,
                Path(tmp),
                gen,
                duration,
                levels,
                warm,
                litellm_url,
                litellm_venv,
                litellm_key,
                console,
                base_src,
                base_set,
                ab_rounds,
                duration if ab_duration is None else ab_duration,
            )
        finally:
            procs.stop_all()
    _print_report(report, console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        console.print(f"wrote {json_out}")
    return report


@dataclass
class _Tally:
    """Requests thrifty answered 200, which its ledger must hold, and how many more it may hold:
    wrk does not count the requests in flight when it stops, which the gateway may still finish."""

    answered_200: int = 0
    uncounted_max: int = 0


@dataclass(frozen=True)
class _Cell:
    target: str
    result: LoadResult
    cpu_us_per_req: float | None


def _measure(
    target: Target, concurrency: int, seconds: float, gen: Literal["wrk", "python"], tally: _Tally
) -> _Cell:
    cpu_before = _cpu_seconds(target.pid)
    result = run_load(target.spec(), concurrency, seconds, gen)
    cpu_after = _cpu_seconds(target.pid)
    if target.name == "thrifty":
        tally.answered_200 += result.ok
        tally.uncounted_max += concurrency if gen == "wrk" else 0
    cpu = None
    if cpu_before is not None and cpu_after is not None and result.requests:
        cpu = (cpu_after - cpu_before) / result.requests * 1e6
    return _Cell(target.name, result, cpu)


def _run(
    procs: _Processes,
    workdir: Path,
    gen: Literal["wrk", "python"],
    duration: float,
    levels: list[int],
    warm: float,
    litellm_url: str | None,
    litellm_venv: Path | None,
    litellm_key: str | None,
    console: Console,
    base_src: Path | None = None,
    base_set: Sequence[str] = (),
    ab_rounds: int = 0,
    ab_duration: float = 0.0,
) -> dict[str, Any]:
    stub_port, thrifty_port, pass_port, litellm_port, base_port = _free_ports(5)
    key = "thr-bench-" + secrets.token_urlsafe(24)
    versions: dict[str, str | None] = {"thrifty": _version("thrifty"), "python": platform.python_version()}

    litellm: subprocess.Popen[bytes] | None = None
    litellm_target: Target | None = None
    if litellm_venv is not None:
        # Absolute: the servers run in the temporary directory. Started first: it is the
        # slowest to come up (~8 s), and the others start meanwhile.
        litellm_venv = litellm_venv.absolute()
        litellm, master = _start_litellm(procs, workdir, litellm_venv, stub_port, litellm_port)
        litellm_target = Target(
            "litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions", master, litellm.pid
        )
        versions["litellm"] = _litellm_version(litellm_venv)
    elif litellm_url:
        master = litellm_key or os.environ.get("LITELLM_MASTER_KEY", "")
        if not master:
            raise BenchError("a running LiteLLM needs its master key: --litellm-key or $LITELLM_MASTER_KEY")
        litellm_target = Target("litellm", _chat_url(litellm_url), master, None)

    console.print(f"[dim]starting the stub, the pass-through and thrifty in {workdir}...[/dim]")
    targets, db = _start_local_servers(procs, workdir, stub_port, thrifty_port, pass_port, key)
    if base_src is not None or base_set:
        src = None if base_src is None else base_src.absolute()
        targets.insert(2, _start_base(procs, workdir, src, base_set, stub_port, base_port, key))
        versions["base"] = " ".join([str(base_src or "this tree"), *base_set])
    if litellm is not None:
        console.print("[dim]waiting for LiteLLM's proxy to start...[/dim]")
        liveliness = f"http://127.0.0.1:{litellm_port}/health/liveliness"
        _wait_until(
            procs, "litellm", litellm, lambda: _request(liveliness)[0] == 200, LITELLM_START_TIMEOUT_S
        )
    if litellm_target is not None:
        targets.append(litellm_target)

    tally = _Tally()
    for target in targets:
        _smoke(procs, target)
    tally.answered_200 += 1  # thrifty's smoke request

    loadavg_start = os.getloadavg()
    if warm > 0:
        console.print(f"[dim]warming up each target for {warm:g} s at concurrency {levels[-1]}...[/dim]")
        for target in targets:
            _measure(target, levels[-1], warm, gen, tally)

    # Every target at one level before the next level: drift on a shared machine then hits all
    # columns of a row alike, and the ratios within a row stay fair.
    cells: list[_Cell] = []
    for concurrency in levels:
        for target in targets:
            cell = _measure(target, concurrency, duration, gen, tally)
            cells.append(cell)
            r = cell.result
            console.print(
                f"  c={concurrency:<3} {target.name:<12} p50 {r.p50_ms:8.3f} ms  "
                f"p99 {r.p99_ms:8.3f} ms  {r.rps:9,.0f} req/s"
                + (f"  [red]{r.errors} errors[/red]" if r.errors else ""),
                highlight=False,
            )
            # Let the closed connections drain before the next column starts.
            time.sleep(0.3)
    ab = _ab_rounds(targets, levels, ab_rounds, ab_duration, gen, tally, console) if ab_rounds else []
    loadavg_end = os.getloadavg()

    # Stop thrifty before counting: its shutdown flushes whatever the writer still holds.
    procs.stop("thrifty")
    rows, rows_200 = _count_ledger(db)
    ledger_ok = tally.answered_200 <= rows_200 <= tally.answered_200 + tally.uncounted_max

    entries = [
        {
            "target": c.target,
            "concurrency": c.result.concurrency,
            "p50_ms": round(c.result.p50_ms, 3),
            "p99_ms": round(c.result.p99_ms, 3),
            "rps": round(c.result.rps, 1),
            "errors": c.result.errors,
            "requests": c.result.requests,
            "non_2xx": c.result.non_2xx,
            "socket_errors": c.result.socket_errors,
            "duration_s": c.result.duration_s,
            # The server process's CPU (all threads) per request: less sensitive to a noisy
            # neighbour than req/s, since time spent descheduled does not count.
            "server_cpu_us_per_req": None if c.cpu_us_per_req is None else round(c.cpu_us_per_req, 1),
        }
        for c in cells
    ]
    worst_error_rate = max(
        (c.result.errors / max(1, c.result.requests + c.result.socket_errors) for c in cells), default=0.0
    )
    ratios, targets_met = _ratios(entries, levels)
    return {
        "generator": wrk_version() if gen == "wrk" else "python (aiohttp, separate process)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": [round(v, 2) for v in loadavg_start],
            "loadavg_end": [round(v, 2) for v in loadavg_end],
        },
        "versions": versions,
        "duration_s": duration,
        "warmup_s": warm,
        "concurrencies": levels,
        "request": REQUEST,
        "results": entries,
        "ratios": ratios,
        "ab_rounds": ab,
        "ab_summary": _ab_summary(ab, levels),
        "targets_met": targets_met,
        "ledger": {
            "rows": rows,
            "rows_http_200": rows_200,
            "answered_200": tally.answered_200,
            "uncounted_in_flight_max": tally.uncounted_max,
            "ok": ledger_ok,
        },
        "worst_error_rate": round(worst_error_rate, 6),
        "ok": ledger_ok and worst_error_rate <= MAX_ERROR_RATE,
    }


def _ab_rounds(
    targets: list[Target],
    levels: list[int],
    rounds: int,
    seconds: float,
    gen: Literal["wrk", "python"],
    tally: _Tally,
    console: Console,
) -> list[dict[str, Any]]:
    """Rounds of thrifty and base back to back at each level, ABBA (a drift within a round then
    favours neither); each round's ratio of server CPU per request."""
    mine = next(t for t in targets if t.name == "thrifty")
    base = next(t for t in targets if t.name == "base")
    out = []
    for concurrency in levels:
        for n in range(rounds):
            order = (mine, base) if n % 2 == 0 else (base, mine)
            cells = {}
            for target in order:
                cells[target.name] = _measure(target, concurrency, seconds, gen, tally)
                time.sleep(0.3)
            a, b = cells["thrifty"], cells["base"]
            if a.cpu_us_per_req is None or not b.cpu_us_per_req:
                raise BenchError("A/B rounds need each server's CPU time (/proc), which is not readable here")
            ratio = a.cpu_us_per_req / b.cpu_us_per_req
            out.append(
                {
                    "concurrency": concurrency,
                    "round": n,
                    "thrifty_cpu_us_per_req": round(a.cpu_us_per_req, 1),
                    "base_cpu_us_per_req": round(b.cpu_us_per_req, 1),
                    "thrifty_rps": round(a.result.rps, 1),
                    "base_rps": round(b.result.rps, 1),
                    "cpu_ratio": round(ratio, 4),
                }
            )
            console.print(
                f"  A/B c={concurrency:<3} round {n + 1}/{rounds}: CPU per request thrifty "
                f"{a.cpu_us_per_req:,.0f} µs, base {b.cpu_us_per_req:,.0f} µs, {ratio:.3f}x",
                highlight=False,
            )
    return out


def _ab_summary(rounds: list[dict[str, Any]], levels: list[int]) -> dict[str, dict[str, float]]:
    """Per level: the median of the rounds' CPU ratios, their quartiles and range."""
    out = {}
    for concurrency in levels:
        ratios = sorted(r["cpu_ratio"] for r in rounds if r["concurrency"] == concurrency)
        if not ratios:
            continue
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[f"c{concurrency}"] = {
            "rounds": len(ratios),
            "median_cpu_ratio": round(statistics.median(ratios), 4),
            "q1": round(q1, 4),
            "q3": round(q3, 4),
            "min": ratios[0],
            "max": ratios[-1],
        }
    return out


def _start_base(
    procs: _Processes,
    workdir: Path,
    src: Path | None,
    overrides: Sequence[str],
    stub_port: int,
    port: int,
    key: str,
) -> Target:
    """thrifty from another source tree and/or with other settings, with its own ledger."""
    if src is not None and not (src / "src" / "thrifty").is_dir():
        raise BenchError(f"--base-src {src}: no src/thrifty there (give a checkout, e.g. a git worktree)")
    data = yaml.safe_load(_settings_yaml(stub_port, port, workdir / "base.db", key))
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted:
            raise BenchError(f"--base-set {item!r}: give SECTION.KEY=VALUE, e.g. metrics.enabled=false")
        *path, last = dotted.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    settings = workdir / "base.yaml"
    settings.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    env = {**os.environ} if src is None else {**os.environ, "PYTHONPATH": str(src / "src")}
    proc = procs.start(
        "base",
        [sys.executable, "-c", "from thrifty.cli import main; main()", "serve", "--config", str(settings)],
        env=env,
    )
    health = f"http://127.0.0.1:{port}/healthz"
    _wait_until(procs, "base", proc, lambda: _request(health)[0] == 200, START_TIMEOUT_S)
    return Target("base", f"http://127.0.0.1:{port}/v1/chat/completions", key, proc.pid)


def _ratios(entries: list[dict[str, Any]], levels: list[int]) -> tuple[dict[str, float], dict[str, bool]]:
    def get(target: str, concurrency: int) -> dict[str, Any] | None:
        for e in entries:
            if e["target"] == target and e["concurrency"] == concurrency:
                return e
        return None

    lo, hi = levels[0], levels[-1]
    ratios: dict[str, float] = {}
    met: dict[str, bool] = {}
    direct_lo, direct_hi = get("direct", lo), get("direct", hi)
    for name in ("thrifty", "passthrough", "litellm"):
        at_lo, at_hi = get(name, lo), get(name, hi)
        if at_lo is not None and direct_lo is not None:
            ratios[f"{name}_added_p50_ms_c{lo}"] = round(at_lo["p50_ms"] - direct_lo["p50_ms"], 3)
        if at_hi is not None and direct_hi is not None and direct_hi["rps"] > 0:
            ratios[f"{name}_over_direct_rps_c{hi}"] = round(at_hi["rps"] / direct_hi["rps"], 4)
    thrifty_hi = get("thrifty", hi)
    for other in ("passthrough", "litellm"):
        other_hi = get(other, hi)
        if thrifty_hi is not None and other_hi is not None and other_hi["rps"] > 0:
            ratios[f"thrifty_over_{other}_rps_c{hi}"] = round(thrifty_hi["rps"] / other_hi["rps"], 3)
    pass_hi = get("passthrough", hi)
    if thrifty_hi is not None and pass_hi is not None:
        mine, theirs = thrifty_hi["server_cpu_us_per_req"], pass_hi["server_cpu_us_per_req"]
        if mine is not None and theirs:
            ratios[f"thrifty_over_passthrough_cpu_per_req_c{hi}"] = round(mine / theirs, 3)
    for concurrency in levels:
        mine, base = get("thrifty", concurrency), get("base", concurrency)
        if mine is None or base is None:
            continue
        if mine["server_cpu_us_per_req"] and base["server_cpu_us_per_req"]:
            ratios[f"thrifty_over_base_cpu_per_req_c{concurrency}"] = round(
                mine["server_cpu_us_per_req"] / base["server_cpu_us_per_req"], 3
            )
        if base["rps"] > 0:
            ratios[f"thrifty_over_base_rps_c{concurrency}"] = round(mine["rps"] / base["rps"], 3)
    added = ratios.get(f"thrifty_added_p50_ms_c{lo}")
    if added is not None:
        met[f"thrifty_added_p50_c{lo}_le_{MAX_ADDED_P50_MS:g}ms"] = added <= MAX_ADDED_P50_MS
    vs_pass = ratios.get(f"thrifty_over_passthrough_rps_c{hi}")
    if vs_pass is not None:
        met[f"thrifty_rps_c{hi}_ge_{MIN_OVER_PASSTHROUGH:g}x_passthrough"] = vs_pass >= MIN_OVER_PASSTHROUGH
    vs_litellm = ratios.get(f"thrifty_over_litellm_rps_c{hi}")
    if vs_litellm is not None:
        met[f"thrifty_rps_c{hi}_ge_{MIN_OVER_LITELLM:g}x_litellm"] = vs_litellm >= MIN_OVER_LITELLM
    return ratios, met


def _mark(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def _print_report(report: dict[str, Any], console: Console) -> None:
    entries: list[dict[str, Any]] = report["results"]
    names = [t for t in TARGETS if any(e["target"] == t for e in entries)]
    levels: list[int] = report["concurrencies"]
    machine = report["machine"]
    table = Table(
        title=(
            f"thrifty bench overhead: {report['duration_s']:g} s per cell, {escape(report['generator'])}, "
            f"{machine['cpus']} CPUs, load avg {machine['loadavg_start'][0]:.2f}"
        ),
        title_justify="left",
    )
    table.add_column("conc", justify="right")
    for name in names:
        table.add_column(f"{name}\np50 ms", justify="right")
        table.add_column(f"{name}\np99 ms", justify="right")
        table.add_column(f"{name}\nreq/s", justify="right")
    for concurrency in levels:
        cells = [str(concurrency)]
        for name in names:
            e = next(x for x in entries if x["target"] == name and x["concurrency"] == concurrency)
            rps = f"{e['rps']:,.0f}"
            if e["errors"]:
                rps += f" [red]({e['errors']} err)[/red]"
            cells += [f"{e['p50_ms']:.3f}", f"{e['p99_ms']:.3f}", rps]
        table.add_row(*cells)
    console.print(table)

    ratios: dict[str, float] = report["ratios"]
    met: dict[str, bool] = report["targets_met"]
    lo, hi = levels[0], levels[-1]
    for name in ("thrifty", "passthrough", "litellm"):
        added = ratios.get(f"{name}_added_p50_ms_c{lo}")
        if added is None:
            continue
        line = f"added p50 at c={lo} vs direct: {name} {added:+.3f} ms"
        if name == "thrifty":
            line += f"  (target ≤ {MAX_ADDED_P50_MS:g} ms) " + _mark(added <= MAX_ADDED_P50_MS)
        console.print(line, highlight=False)
    for other, minimum in (("passthrough", MIN_OVER_PASSTHROUGH), ("litellm", MIN_OVER_LITELLM)):
        ratio = ratios.get(f"thrifty_over_{other}_rps_c{hi}")
        if ratio is not None:
            console.print(
                f"thrifty / {other} req/s at c={hi}: {ratio:.2f}x  (target ≥ {minimum:g}x) "
                + _mark(ratio >= minimum),
                highlight=False,
            )
    cpu_ratio = ratios.get(f"thrifty_over_passthrough_cpu_per_req_c{hi}")
    if cpu_ratio is not None:
        cpu = {
            e["target"]: e["server_cpu_us_per_req"]
            for e in entries
            if e["concurrency"] == hi and e["server_cpu_us_per_req"] is not None
        }
        console.print(
            f"server CPU per request at c={hi}: "
            + ", ".join(f"{name} {cpu[name]:,.0f} µs" for name in names if name in cpu)
            + f"  (thrifty / passthrough {cpu_ratio:.2f}x)",
            highlight=False,
        )
    for concurrency in levels:
        cpu_vs_base = ratios.get(f"thrifty_over_base_cpu_per_req_c{concurrency}")
        if cpu_vs_base is not None:
            console.print(
                f"thrifty / base at c={concurrency}: CPU per request {cpu_vs_base:.3f}x, "
                f"req/s {ratios[f'thrifty_over_base_rps_c{concurrency}']:.3f}x",
                highlight=False,
            )
    for level, summary in report.get("ab_summary", {}).items():
        median = summary["median_cpu_ratio"]
        console.print(
            f"thrifty / base CPU per request at c={level[1:]}, median of {summary['rounds']} interleaved "
            f"rounds: {median:.3f}x ({median - 1:+.1%}; quartiles {summary['q1']:.3f}-{summary['q3']:.3f}, "
            f"range {summary['min']:.3f}-{summary['max']:.3f})",
            highlight=False,
        )
    for name in ("thrifty", "passthrough", "litellm"):
        ratio = ratios.get(f"{name}_over_direct_rps_c{hi}")
        if ratio is not None:
            console.print(f"{name} / direct req/s at c={hi}: {ratio:.3f}x", highlight=False)
    ledger = report["ledger"]
    slack = ledger["uncounted_in_flight_max"]
    console.print(
        f"thrifty ledger: {ledger['rows_http_200']} rows with HTTP 200 ({ledger['rows']} in all) for "
        f"{ledger['answered_200']} answered 200"
        + (f" (+ up to {slack} in flight when wrk stopped)" if slack else "")
        + " "
        + _mark(ledger["ok"]),
        highlight=False,
    )
    if report["worst_error_rate"] > 0:
        console.print(
            f"[yellow]worst error rate of a measurement: {report['worst_error_rate']:.4%}[/yellow]"
            + ("" if report["worst_error_rate"] <= MAX_ERROR_RATE else " [red](too many)[/red]")
        )
    if not all(met.values()):
        console.print(
            "[yellow]targets missed: " + ", ".join(k for k, v in met.items() if not v) + "[/yellow]"
        )
