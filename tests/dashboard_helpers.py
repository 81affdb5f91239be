"""A ledger with known rows and the dashboard serving it on loopback (dashboard and browser tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.conftest import KEYS
from tests.test_rollups import varied_entries
from thrifty.server.dashboard.standalone import DashboardServer
from thrifty.server.run import server_options
from thrifty.settings import Settings, settings_from_mapping
from thrifty.stores.keys import hash_key
from thrifty.stores.ledger import LedgerWriter
from thrifty.stores.sqlite_db import open_database
from thrifty.types import LedgerEntry

ADMIN_KEY = "thr-admin-test-key-0000000000000000"
XSS = "<script>alert(1)</script>"


def dashboard_settings(db: Path) -> Settings:
    return settings_from_mapping(
        {
            "storage": {"url": f"sqlite:///{db}"},
            "providers": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9"}},
            "models": {"a": {"provider": "up"}, "b": {"provider": "up"}},
            "routes": {"support": {"model": "a", "budget": {"usd_per_day": "50"}}},
            "tenants": {
                "acme": {
                    "key_hashes": [hash_key(KEYS["acme"])],
                    "budget": {"usd_per_day": "2.5", "tokens_per_month": 1000000},
                    "features": {"chat": {"budget": {"usd_per_month": "10"}}},
                },
                "globex": {"key_hashes": [hash_key(KEYS["globex"])], "budget": {"usd_per_day": "7"}},
            },
            "dashboard": {"admin_key_hashes": [hash_key(ADMIN_KEY)]},
        }
    )


def known_entries(now: float) -> list[LedgerEntry]:
    """Rows over the last ~6 hours, and a few from 10 days ago (outside a 7-day range)."""
    recent = varied_entries(120, t0=(now // 3600 - 6) * 3600)
    old = [
        dataclasses.replace(e, request_id=f"old_{i}", ts=now - 10 * 86400 + i)
        for i, e in enumerate(varied_entries(6))
    ]
    marked = dataclasses.replace(recent[3], request_id="req_xss", feature=XSS, tenant_id="globex")
    return [*old, *recent[:3], marked, *recent[4:]]


def write_ledger(db: Path, entries: list[LedgerEntry]) -> None:
    conn = open_database(db)
    conn.executemany(
        "INSERT INTO alerts (alert_key, ts, kind, scope, message, payload, delivered_at, delivery_error) "
        "VALUES (?, ?, ?, ?, ?, '{}', ?, ?)",
        [
            ("k1", time.time() - 60, "budget_threshold", "tenant:acme", "acme used 80%", time.time(), None),
            (
                "k2",
                time.time() - 30,
                "budget_threshold",
                "tenant:globex",
                "globex used 50%",
                None,
                "HTTP 500",
            ),
            (
                "k3",
                time.time() - 20,
                "feature_spend_spike",
                "feature:acme/chat",
                "acme chat spike",
                None,
                None,
            ),
        ],
    )
    conn.close()

    async def write() -> None:
        writer = LedgerWriter(db)
        writer.start(asyncio.get_running_loop())
        await asyncio.gather(*(writer.submit(e) for e in entries))
        writer.close()

    asyncio.run(write())


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on an ephemeral loopback port; yield its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, host="127.0.0.1", port=sock.getsockname()[1], **server_options())  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def dashboard_over_known_ledger(tmp_path: Path) -> Iterator[tuple[str, Settings, list[LedgerEntry]]]:
    db = tmp_path / "ledger.db"
    settings = dashboard_settings(db)
    entries = known_entries(time.time())
    write_ledger(db, entries)
    with serve_asgi(DashboardServer(settings, db)) as url:
        yield url, settings, entries


def get(url: str, key: str | None = None, **params: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, params=params, headers=headers, timeout=20)
