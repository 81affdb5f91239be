"""`thrifty bench replicas`: what shared state costs, against the stub.

One replica on SQLite (the embedded default) against one and three replicas on Redis +
PostgreSQL, each with the same settings (a tenant budget and a rate limit, so both guards do their
work on every request): p50/p99 and req/s at each concurrency, CPU per request, Redis round trips
per request (EVAL/EVALSHA calls seen by Redis), ledger rows against 200s, and how long until an
exact-cache entry, and a semantic-cache entry (when the semantic extra is installed), written on
one replica answers on another. On a 2-core machine three replicas
cannot show throughput scaling (they share the cores with the load generator and the servers);
the report says so and gives CPU per request instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.console import Console
from rich.table import Table

from thrifty.bench.loadgen import BenchError, LoadResult, LoadSpec, resolve_generator, run_load
from thrifty.bench.servers import (
    MODEL,
    REQUEST,
    START_TIMEOUT_S,
    _cpu_seconds,
    _free_ports,
    _Processes,
    _request,
    _wait_until,
)
from thrifty.stores.keys import hash_key

KEY = "thr-bench-replicas-key-0001"
SERVICES = Path(__file__).resolve().parents[3] / "scripts" / "services.sh"


@dataclass
class _Setup:
    name: str
    replicas: int
    shared: bool


SETUPS = (_Setup("sqlite x1", 1, False), _Setup("shared x1", 1, True), _Setup("shared x3", 3, True))


def _semantic_installed() -> bool:
    """The semantic cache's model is here: the bench adds a semantic route to measure its delay."""
    try:
        from thrifty.cache.semantic.embedder import default_model_path, default_tokenizer_path

        return default_model_path().is_file() and default_tokenizer_path().is_file()
    except Exception:  # noqa: BLE001 - ImportError, ModelNotInstalledError: not installed
        return False


def _settings(
    stub_port: int, port: int, storage: dict[str, Any], shared: dict[str, Any] | None, semantic: bool
) -> str:
    routes: dict[str, Any] = {"faq": {"model": MODEL, "cache": {"ttl_s": 600}}}
    if semantic:
        routes["support"] = {"model": MODEL, "semantic_cache": {"ttl_s": 600}}
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": storage,
        "providers": {"stub": {"kind": "openai", "base_url": f"http://127.0.0.1:{stub_port}/v1"}},
        "models": {MODEL: {"provider": "stub", "upstream": MODEL}},
        "routes": routes,
        "tenants": {
            "bench": {
                "key_hashes": [hash_key(KEY)],
                "budget": {"usd_per_day": "1000000"},
                "rate_limit": {"requests_per_minute": 10_000_000},
            }
        },
    }
    if shared is not None:
        data["shared_state"] = shared
    return yaml.safe_dump(data, sort_keys=False)


def _services(workdir: Path) -> tuple[str, str, Callable[[], None]]:
    if not SERVICES.exists():
        raise BenchError(
            "scripts/services.sh not found: run from a thrifty checkout, "
            "or pass --redis-url and --postgres-url"
        )
    svc = Path(tempfile.mkdtemp(prefix="thrifty-bench-svc-"))
    out = subprocess.run(
        ["bash", str(SERVICES), "start", str(svc)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise BenchError(f"could not start Redis and PostgreSQL: {out.stderr.strip()}")
    urls = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def stop() -> None:
        subprocess.run(
            ["bash", str(SERVICES), "stop", str(svc)], capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(svc, ignore_errors=True)

    return urls["REDIS_URL"], urls["POSTGRES_URL"], stop


def _fresh_database(postgres_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def _redis_evals(redis_url: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def _ledger_rows(storage_url: str) -> int:
    if storage_url.startswith("sqlite:///"):
        import sqlite3

        db = sqlite3.connect(storage_url.removeprefix("sqlite:///"))
        try:
            return int(db.execute("SELECT count(*) FROM ledger WHERE http_status = 200").fetchone()[0])
        finally:
            db.close()
    import psycopg

    with psycopg.connect(storage_url) as conn:
        row = conn.execute("SELECT count(*) FROM ledger WHERE http_status = 200").fetchone()
        return int(row[0]) if row else 0


def _load(urls: list[str], concurrency: int, duration: float, generator: Any) -> LoadResult:
    """Spread `concurrency` over the replicas, each with its own generator, at the same time."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = orjson.dumps(REQUEST)
    shares = [concurrency // len(urls) + (1 if i < concurrency % len(urls) else 0) for i in range(len(urls))]
    jobs = [(url, share) for url, share in zip(urls, shares, strict=True) if share]
    results: list[LoadResult] = []
    lock = threading.Lock()

    def run(url: str, share: int) -> None:
        result = run_load(LoadSpec(f"{url}/v1/chat/completions", body, headers), share, duration, generator)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) == 1:
        return results[0]
    # Percentiles do not add up across generators: the worst replica's are reported.
    return LoadResult(
        generator=results[0].generator,
        concurrency=concurrency,
        duration_s=max(r.duration_s for r in results),
        requests=sum(r.requests for r in results),
        ok=sum(r.ok for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        rps=sum(r.rps for r in results),
    )


def _cache_delay_ms(urls: list[str], kind: str = "exact") -> tuple[float | None, int]:
    """Write a cache entry through replica A; the time from A's answer until replica B answers
    from the entry. Also returns how many 200s the probe got (they are in the ledger too).

    exact: the same request again. semantic: the same question up to case and punctuation (served
    without a vote, so the delay measured is the entry's way to B, not the decision rule's mood);
    B's probes say `Cache-Control: no-store`, so its own misses do not become entries."""
    if len(urls) < 2:
        return None, 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    route = "route:faq" if kind == "exact" else "route:support"
    answered = 0
    for url in urls[:2]:  # warm both replicas' path (the embedder's first run is slow), storing nothing
        warm = [{"role": "user", "content": f"warm-up {time.time_ns()}"}]
        answered += (
            _post(
                f"{url}/v1/chat/completions",
                orjson.dumps({**REQUEST, "model": route, "messages": warm}),
                {**headers, "Cache-Control": "no-store"},
            )
            is not None
        )
    asked = f"cache probe {time.time_ns()}"
    body = orjson.dumps({**REQUEST, "model": route, "messages": [{"role": "user", "content": asked}]})
    if _post(f"{urls[0]}/v1/chat/completions", body, headers) is None:
        raise BenchError("the cache probe was refused")
    if kind == "semantic":
        again = [{"role": "user", "content": asked.upper() + "?"}]
        body = orjson.dumps({**REQUEST, "model": route, "messages": again})
        headers = {**headers, "Cache-Control": "no-store"}
    answered += 1
    start = time.perf_counter()
    while time.perf_counter() - start < 5:
        cache = _post(f"{urls[1]}/v1/chat/completions", body, headers)
        answered += cache is not None
        if cache == kind:
            return (time.perf_counter() - start) * 1000, answered
    return None, answered


def _post(url: str, body: bytes, headers: dict[str, str]) -> str | None:
    """POST; the x-thrifty-cache header of a 200, None otherwise."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout=10
        ) as resp:
            return str(resp.headers.get("x-thrifty-cache") or "miss")
    except (urllib.error.URLError, OSError):
        return None


def _healthy(url: str) -> Callable[[], bool]:
    return lambda: _request(f"{url}/healthz")[0] == 200


def _nothing() -> None:
    pass


def run_replicas_bench(
    *,
    duration: float,
    concurrencies: list[int],
    json_out: Path | None,
    console: Console,
    generator: Any = "auto",
    redis_url: str | None = None,
    postgres_url: str | None = None,
) -> dict[str, Any]:
    gen = resolve_generator(generator)
    workdir = Path(tempfile.mkdtemp(prefix="thrifty-bench-replicas-"))
    procs = _Processes(workdir)
    stop_services: Callable[[], None] = _nothing
    entries: list[dict[str, Any]] = []
    semantic = _semantic_installed()
    try:
        if redis_url is None or postgres_url is None:
            redis_url, postgres_url, stop_services = _services(workdir)
        stub_port, *ports = _free_ports(1 + sum(s.replicas for s in SETUPS))
        python = sys.executable
        stub = procs.start("stub", [python, "-m", "thrifty.bench.stub", "--port", str(stub_port)])
        _wait_until(
            procs,
            "stub",
            stub,
            lambda: _request(f"http://127.0.0.1:{stub_port}/healthz")[0] == 200,
            START_TIMEOUT_S,
        )
        for setup in SETUPS:
            if setup.shared:
                storage: dict[str, Any] = {
                    "url": _fresh_database(postgres_url, f"bench_{setup.replicas}"),
                    "spool_path": str(workdir / f"spool-{setup.replicas}.jsonl"),
                    "local_path": str(workdir / f"local-{setup.replicas}.db"),
                }
                shared: dict[str, Any] | None = {"url": redis_url, "prefix": f"bench{time.time_ns()}:"}
            else:
                storage, shared = {"url": f"sqlite:///{workdir / 'ledger.db'}"}, None
            urls, pids = [], []
            for i in range(setup.replicas):
                port = ports.pop()
                config = workdir / f"{setup.name.replace(' ', '-')}-{i}.yaml"
                config.write_text(_settings(stub_port, port, storage, shared, semantic))
                name = f"{setup.name}-{i}"
                proc = procs.start(
                    name,
                    [python, "-c", "from thrifty.cli import main; main()", "serve", "--config", str(config)],
                )
                url = f"http://127.0.0.1:{port}"
                _wait_until(procs, name, proc, _healthy(url), START_TIMEOUT_S)
                urls.append(url)
                pids.append(proc.pid)
            answered = _load(urls, 4, min(duration, 1.0), gen).ok  # warm-up
            delay, probes = _cache_delay_ms(urls)
            answered += probes
            semantic_delay = None
            if semantic:
                semantic_delay, probes = _cache_delay_ms(urls, "semantic")
                answered += probes
            for concurrency in concurrencies:
                evals = _redis_evals(redis_url) if setup.shared else 0
                cpu = sum(_cpu_seconds(pid) or 0.0 for pid in pids)
                result = _load(urls if concurrency > 1 else urls[:1], concurrency, duration, gen)
                cpu = sum(_cpu_seconds(pid) or 0.0 for pid in pids) - cpu
                evals = (_redis_evals(redis_url) - evals) if setup.shared else 0
                entries.append(
                    {
                        "setup": setup.name,
                        "replicas": setup.replicas,
                        **result.to_json(),
                        "cpu_ms_per_request": round(cpu * 1000 / result.requests, 3)
                        if result.requests
                        else None,
                        "redis_round_trips_per_request": round(evals / result.requests, 3)
                        if result.requests
                        else None,
                        "cache_delay_ms": None if delay is None else round(delay, 2),
                        "semantic_cache_delay_ms": None
                        if semantic_delay is None
                        else round(semantic_delay, 2),
                    }
                )
                answered += result.ok
            for i in range(setup.replicas):
                procs.stop(f"{setup.name}-{i}")  # SIGTERM: the ledger is flushed
            # Every 200 of the setup (warm-up and cache probes included) against its ledger rows.
            rows = _ledger_rows(storage["url"])
            for entry in entries:
                if entry["setup"] == setup.name:
                    entry["ledger_rows_200"] = rows
                    entry["responses_200"] = answered
    finally:
        procs.stop_all()
        stop_services()
    report = _report(entries, concurrencies, semantic)
    _print(report, console)
    if json_out is not None:
        json_out.write_text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return report


def _report(entries: list[dict[str, Any]], concurrencies: list[int], semantic: bool) -> dict[str, Any]:
    base = {e["concurrency"]: e for e in entries if e["setup"] == "sqlite x1"}
    added: dict[str, float] = {}
    for e in entries:
        if e["setup"] == "shared x1" and e["concurrency"] in base:
            added[str(e["concurrency"])] = round(e["p50_ms"] - base[e["concurrency"]]["p50_ms"], 3)
    trips = [e["redis_round_trips_per_request"] for e in entries if e["setup"] != "sqlite x1"]
    lost = {e["setup"]: e["responses_200"] - e["ledger_rows_200"] for e in entries}
    c1 = added.get("1")
    return {
        "entries": entries,
        "added_p50_ms_shared_vs_sqlite": added,
        "targets": {
            "added_p50_at_c1_le_1ms": None if c1 is None else c1 <= 1.0,
            # One before the call (rate admission and budget reserve in one script), the settle after.
            "redis_round_trips_le_2": all(t is not None and t <= 2.05 for t in trips),
            "ledger_rows_lost": sum(max(n, 0) for n in lost.values()),
        },
        "note": (
            f"{os.cpu_count()} CPU cores: replicas, load generators, Redis, PostgreSQL and the stub "
            "share them, "
            "so throughput scaling across replicas cannot be shown here; compare CPU per request instead. "
            "Round trips per request include the settle, which runs after the response is sent "
            "(one before the call, one after). Cache delay: from replica A's answer to the first answer "
            "replica B serves from A's entry (B's probes are back to back, each a few ms)."
            + ("" if semantic else " The semantic extra is not installed: no semantic-cache delay.")
        ),
    }


def _print(report: dict[str, Any], console: Console) -> None:
    table = Table(title="thrifty bench replicas (stub upstream)", title_justify="left")
    for column in (
        "setup",
        "c",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "CPU ms/req",
        "Redis RT/req",
        "exact delay ms",
        "semantic delay ms",
    ):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for e in report["entries"]:
        table.add_row(
            e["setup"],
            str(e["concurrency"]),
            f"{e['rps']:.0f}",
            f"{e['p50_ms']:.2f}",
            f"{e['p99_ms']:.2f}",
            str(e["errors"]),
            "-" if e["cpu_ms_per_request"] is None else f"{e['cpu_ms_per_request']:.2f}",
            "-" if not e["redis_round_trips_per_request"] else f"{e['redis_round_trips_per_request']:.2f}",
            "-" if e["cache_delay_ms"] is None else f"{e['cache_delay_ms']:.1f}",
            "-" if e["semantic_cache_delay_ms"] is None else f"{e['semantic_cache_delay_ms']:.1f}",
        )
    console.print(table)
    console.print(f"added p50 (shared x1 - sqlite x1), ms: {report['added_p50_ms_shared_vs_sqlite']}")
    console.print(report["note"])


__all__ = ["run_replicas_bench"]
