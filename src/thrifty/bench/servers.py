"""Processes for `thrifty bench overhead`: the stub, the gateway, the pass-through, LiteLLM.

Starting, smoke-testing, and stopping each server on its own loopback port, and their settings.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import yaml

from thrifty.bench.loadgen import (
    BenchError,
    LoadSpec,
)
from thrifty.stores.keys import hash_key

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
