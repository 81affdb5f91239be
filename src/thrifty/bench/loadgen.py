"""Closed-loop load at a fixed concurrency for a fixed time: p50/p99 latency and requests/s.

`wrk` (C, one thread) is used when it is on PATH: on a 2-core machine a Python load generator
competes with the servers it measures for the same cores and caps the result. Without wrk, an
aiohttp generator runs in a separate process (`python -m thrifty.bench.loadgen`, a JSON job on
stdin, a JSON result on stdout) so at least it does not share the bench's interpreter.

The two count differently at the end of a run: the Python generator stops issuing at the
deadline and waits for the requests in flight, so its counts are exact; wrk closes its
connections at the deadline and does not count what was in flight (up to `concurrency`
requests the server may still have answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from thrifty.errors import ThriftyError

Generator = Literal["auto", "wrk", "python"]

# wrk's own timeout marks slow answers as errors and drops them from the latency histogram; a
# slow proxy at concurrency 64 (LiteLLM: ~1 s per request) must be measured, not discarded.
WRK_TIMEOUT = "60s"
_WRK_MARK = "THRIFTY_WRK"


class BenchError(ThriftyError):
    """A bench run that cannot produce a trustworthy result."""


@dataclass(frozen=True)
class LoadSpec:
    """What every request of a run sends: the same POST, with its Authorization header."""

    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class LoadResult:
    generator: str
    concurrency: int
    duration_s: float
    requests: int  # responses received, whatever their status
    ok: int  # 2xx responses
    non_2xx: int
    socket_errors: int  # connect, read, write failures and timeouts
    p50_ms: float
    p99_ms: float
    rps: float

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    path = wrk_path()
    if path is None:
        return None
    # `wrk -v` prints its banner and exits non-zero; the first line names the version.
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False, timeout=10)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].split("Copyright")[0].strip() if lines else "wrk"


def resolve_generator(generator: Generator) -> Literal["wrk", "python"]:
    if generator == "auto":
        return "wrk" if wrk_path() is not None else "python"
    if generator == "wrk" and wrk_path() is None:
        raise BenchError("wrk is not on PATH (apt-get install wrk), or use the python generator")
    return generator


def run_load(
    spec: LoadSpec, concurrency: int, duration: float, generator: Literal["wrk", "python"]
) -> LoadResult:
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if generator == "wrk":
        return _run_wrk(spec, concurrency, duration)
    return _run_python_subprocess(spec, concurrency, duration)


# -- wrk ---------------------------------------------------------------------------------------


def _lua_string(text: str) -> str:
    # A long bracket needs no escaping; pick a level whose closer the text (and its end) lacks.
    level = 0
    while f"]{'=' * level}]" in text + "]":
        level += 1
    eq = "=" * level
    # Lua drops a newline right after the opening bracket; give it one to drop.
    lead = "\n" if text.startswith("\n") else ""
    return f"[{eq}[{lead}{text}]{eq}]"


def wrk_script(spec: LoadSpec) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(spec.body.decode())}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in spec.headers.items()]
    # The summary in microseconds from wrk's own histogram: exact, where its printed
    # "Latency Distribution" rounds and switches units (us/ms/s).
    lines.append(
        "done = function(summary, latency, requests)\n"
        f'  io.write(string.format("{_WRK_MARK} %d %d %d %d %d %d %d %d %d\\n",\n'
        "    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,\n"
        "    summary.errors.write, summary.errors.timeout, summary.errors.status,\n"
        "    latency:percentile(50), latency:percentile(99)))\n"
        "end"
    )
    return "\n".join(lines) + "\n"


def parse_wrk(output: str, concurrency: int) -> LoadResult:
    match = re.search(rf"^{_WRK_MARK} ((?:\d+ ?){{9}})$", output, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk printed no summary; its output was:\n{output[-2000:]}")
    requests, duration_us, connect, read, write, timeout, status, p50_us, p99_us = (
        int(v) for v in match.group(1).split()
    )
    seconds = duration_us / 1e6
    return LoadResult(
        generator="wrk",
        concurrency=concurrency,
        duration_s=round(seconds, 3),
        requests=requests,
        ok=requests - status,
        non_2xx=status,
        socket_errors=connect + read + write + timeout,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
        rps=requests / seconds if seconds > 0 else 0.0,
    )


def _run_wrk(spec: LoadSpec, concurrency: int, duration: float) -> LoadResult:
    path = wrk_path()
    if path is None:
        raise BenchError("wrk is not on PATH")
    with tempfile.TemporaryDirectory(prefix="thrifty-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(wrk_script(spec), encoding="utf-8")
        # One thread: wrk's minimum is one connection per thread, and a second thread would take
        # a core from the servers under test on a small machine; one thread drives >50k req/s.
        cmd = [
            path,
            "-t1",
            f"-c{concurrency}",
            # wrk takes whole seconds only.
            f"-d{max(1, round(duration))}s",
            "--timeout",
            WRK_TIMEOUT,
            "--latency",
            "-s",
            str(script),
            spec.url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 120)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout[-2000:]}")
    return parse_wrk(out.stdout, concurrency)


# -- python (aiohttp, in its own process) ----------------------------------------------------------


def _run_python_subprocess(spec: LoadSpec, concurrency: int, duration: float) -> LoadResult:
    job = {
        "url": spec.url,
        "body": spec.body.decode(),
        "headers": spec.headers,
        "concurrency": concurrency,
        "duration": duration,
    }
    out = subprocess.run(
        [sys.executable, "-m", "thrifty.bench.loadgen"],
        input=orjson.dumps(job),
        capture_output=True,
        check=False,
        timeout=duration + 120,
    )
    if out.returncode != 0:
        raise BenchError(f"the python load generator failed: {out.stderr.decode()[-2000:]}")
    return LoadResult(**orjson.loads(out.stdout))


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


async def python_load(spec: LoadSpec, concurrency: int, duration: float) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    counts = {"ok": 0, "non_2xx": 0, "socket_errors": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            clock = time.perf_counter
            while clock() < deadline:
                t0 = clock()
                try:
                    async with session.post(spec.url, data=spec.body, headers=spec.headers) as resp:
                        await resp.read()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError, OSError):
                    counts["socket_errors"] += 1
                    continue
                latencies.append(clock() - t0)
                counts["ok" if 200 <= status < 300 else "non_2xx"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    requests = counts["ok"] + counts["non_2xx"]
    return LoadResult(
        generator="python",
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=requests,
        ok=counts["ok"],
        non_2xx=counts["non_2xx"],
        socket_errors=counts["socket_errors"],
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        rps=requests / elapsed if elapsed > 0 else 0.0,
    )


def main() -> None:
    job = orjson.loads(sys.stdin.buffer.read())
    spec = LoadSpec(url=job["url"], body=job["body"].encode(), headers=dict(job["headers"]))
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    # uvloop is Unix-only; asyncio's own loop still works, only slower.
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(python_load(spec, int(job["concurrency"]), float(job["duration"])))
    sys.stdout.buffer.write(orjson.dumps(asdict(result)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
