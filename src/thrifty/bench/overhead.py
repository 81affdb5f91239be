"""`thrifty bench overhead`: what thrifty adds over calling the upstream directly, in one run.

Every column is measured in the same run against the same local stub upstream, so the ratios
between them mean something even on a shared, noisy machine where absolute times drift:

  direct       the load generator straight to the stub: the floor.
  thrifty      `thrifty serve` in front of the stub: auth, pricing, token accounting, ledger.
  passthrough  a bare ASGI proxy on the same server stack: the ceiling for Python here.
  litellm      LiteLLM's proxy in front of the same stub, when asked for.

Each server runs in its own process on an ephemeral 127.0.0.1 port; concurrencies are measured
one after another with all targets interleaved at each level, so drift hits every column alike.
Afterwards thrifty's ledger is counted: a gateway that drops ledger rows under load must not look
fast.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import os
import platform
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
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
    LoadSpec,
    resolve_generator,
    run_load,
    wrk_version,
)
from thrifty.stores.keys import hash_key

TARGETS = ("direct", "thrifty", "passthrough", "litellm")
DEFAULT_CONCURRENCIES = (1, 16, 64)
MODEL = "gpt-4o-mini"
# A small but real chat request: system + user message and a max_tokens, as SDKs send it.
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France, and why is it the capital?"},
    ],
    "max_tokens": 64,
    "temperature": 0,
}
# Targets from the issue, for the pass/fail marks.
MAX_ADDED_P50_MS = 1.0
MIN_OVER_LITELLM = 30.0
MIN_OVER_PASSTHROUGH = 0.5
# A measurement with more failed requests than this is not a measurement.
MAX_ERROR_RATE = 0.001
START_TIMEOUT_S = 60.0
LITELLM_START_TIMEOUT_S = 180.0

# Only loopback traffic: never route the readiness probes through an environment proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # the chat completions URL
    key: str  # sent as the Bearer key
    pid: int | None  # the server process, for its CPU time; None when it is not ours

    def spec(self) -> LoadSpec:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        return LoadSpec(url=self.url, body=orjson.dumps(REQUEST), headers=headers)


class _Processes:
    """The servers this run started; each in its own session so its whole group can be ended."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()  # the child holds its own descriptor
        self._procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str, timeout: float = 30.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM first: uvicorn then runs its lifespan shutdown, which flushes thrifty's ledger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self._procs):
            self.stop(name, timeout=10.0)


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is picked, so the n ports differ.
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP exchange; (0, reason) when nothing answered."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        return 0, str(err).encode()


def _wait_until(
    procs: _Processes, name: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode} while starting:\n{procs.log_tail(name)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not answer within {timeout:.0f} s:\n{procs.log_tail(name)}")
        time.sleep(0.1)


def _smoke(procs: _Processes, target: Target) -> None:
    """One real request: a wrong key or model must fail here, not as 100% errors in the table."""
    spec = target.spec()
    status, body = _request(spec.url, spec.body, spec.headers, timeout=60)
    if status != 200:
        raise BenchError(
            f"{target.name} answered {status} to the bench request: {body[:500].decode(errors='replace')}\n"
            f"{procs.log_tail(target.name)}"
        )


def _settings_yaml(stub_port: int, port: int, db: Path, key: str) -> str:
    return yaml.safe_dump(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "storage": {"url": f"sqlite:///{db}"},
            "providers": {"stub": {"kind": "openai", "base_url": f"http://127.0.0.1:{stub_port}/v1"}},
            # upstream gpt-4o-mini so genai-prices prices it: the pricing path is part of the cost.
            "models": {MODEL: {"provider": "stub", "upstream": MODEL}},
            "tenants": {"bench": {"key_hashes": [hash_key(key)]}},
        },
        sort_keys=False,
    )


def _litellm_config(stub_port: int) -> str:
    # No database_url: the proxy runs without Postgres. The master key is read from the
    # environment because the proxy refuses weak literal keys.
    return yaml.safe_dump(
        {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"http://127.0.0.1:{stub_port}/v1",
                        "api_key": "dummy",
                    },
                }
            ],
            "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        },
        sort_keys=False,
    )


def _litellm_version(venv: Path) -> str | None:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.stdout.strip() or None


def _chat_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the bench runs, so `finally` ends its servers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
) -> dict[str, Any]:
    """Run the bench, print the table and ratios, write JSON; return the report.

    `litellm_url` measures a LiteLLM proxy already running (its key from `litellm_key` or
    $LITELLM_MASTER_KEY); `litellm_venv` starts `VENV/bin/litellm` against this run's own stub.
    """
    if litellm_url and litellm_venv:
        raise BenchError("give either a running LiteLLM (litellm_url) or a venv to start it, not both")
    if duration <= 0:
        raise BenchError("duration must be positive")
    gen = resolve_generator(generator)
    levels = sorted(set(concurrencies))
    warm = min(2.0, duration) if warmup is None else warmup
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-") as tmp, _sigterm_exits():
        procs = _Processes(Path(tmp))
        try:
            report = _run(
                procs, Path(tmp), gen, duration, levels, warm, litellm_url, litellm_venv, litellm_key, console
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


def _cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, all its threads (Linux /proc); None where unavailable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_litellm(
    procs: _Processes, workdir: Path, venv: Path, stub_port: int, port: int
) -> tuple[subprocess.Popen[bytes], str]:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        raise BenchError(f"no {exe}; create the venv with bench/litellm.sh install")
    config = workdir / "litellm.yaml"
    config.write_text(_litellm_config(stub_port), encoding="utf-8")
    master = "sk-" + secrets.token_hex(24)
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master,
        # The bundled price map, instead of fetching it from GitHub at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return procs.start("litellm", cmd, env), master


def _start_local_servers(
    procs: _Processes, workdir: Path, stub_port: int, thrifty_port: int, pass_port: int, key: str
) -> tuple[list[Target], Path]:
    """The stub, the pass-through and thrifty, each answering; returns their targets and the ledger."""
    python = sys.executable
    stub = procs.start("direct", [python, "-m", "thrifty.bench.stub", "--port", str(stub_port)])
    upstream = f"http://127.0.0.1:{stub_port}"
    passthrough = procs.start(
        "passthrough",
        [python, "-m", "thrifty.bench.passthrough", "--port", str(pass_port), "--upstream", upstream],
    )
    db = workdir / "ledger.db"
    settings = workdir / "thrifty.yaml"
    settings.write_text(_settings_yaml(stub_port, thrifty_port, db, key), encoding="utf-8")
    thrifty = procs.start(
        "thrifty", [python, "-c", "from thrifty.cli import main; main()", "serve", "--config", str(settings)]
    )
    targets = [
        Target("direct", f"{upstream}/v1/chat/completions", key, stub.pid),
        Target("thrifty", f"http://127.0.0.1:{thrifty_port}/v1/chat/completions", key, thrifty.pid),
        Target("passthrough", f"http://127.0.0.1:{pass_port}/v1/chat/completions", key, passthrough.pid),
    ]
    _wait_until(procs, "direct", stub, lambda: _request(f"{upstream}/healthz")[0] == 200, START_TIMEOUT_S)
    thrifty_health = f"http://127.0.0.1:{thrifty_port}/healthz"
    _wait_until(procs, "thrifty", thrifty, lambda: _request(thrifty_health)[0] == 200, START_TIMEOUT_S)
    # The pass-through has no routes of its own: a forwarded request is its health check.
    probe = targets[2].spec()
    _wait_until(
        procs,
        "passthrough",
        passthrough,
        lambda: _request(probe.url, probe.body, probe.headers)[0] == 200,
        START_TIMEOUT_S,
    )
    return targets, db


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
) -> dict[str, Any]:
    stub_port, thrifty_port, pass_port, litellm_port = _free_ports(4)
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
