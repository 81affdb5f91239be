"""Alerts fire once per window, reach a webhook, and are listed by `thrifty alerts`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import KEYS, UPSTREAM_KEY, LoopThread, base_settings, openai_models
from tests.factories import ledger_entry
from tests.fakes.openai_wire import Reply
from thrifty.alerts.service import AlertService
from thrifty.server.run import BackgroundServer
from thrifty.settings import AlertSettings
from thrifty.stores.keys import hash_key
from thrifty.stores.ledger import INSERT_ENTRY_SQL, entry_row
from thrifty.stores.sqlite_db import open_database
from thrifty.types import Usage


class Webhook:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(text="ok")

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
def webhook(loop_thread: LoopThread) -> Iterator[Webhook]:
    hook = Webhook()
    loop_thread.run(hook.start())
    yield hook
    loop_thread.run(hook.stop())


def test_budget_thresholds_alert_once_each_and_reach_the_webhook(tmp_path: Path, openai_upstream, webhook):
    # Each request costs (42 x 0.15 + 9 x 0.6) / 1e6 = $0.0000117; the budget is 10 of them.
    openai_upstream.default = Reply()
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        tenants={"acme": {"key_hashes": [hash_key(KEYS["acme"])], "budget": {"usd_per_day": "0.000117"}}},
        alerts={"webhook_url": f"http://127.0.0.1:{webhook.port}/hook"},
    )
    msg = [{"role": "user", "content": "hi"}]
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        answered = 0
        for _ in range(12):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=msg, max_tokens=1)
                answered += 1
            except openai.RateLimitError:
                pass
        deadline = time.monotonic() + 5
        while len(webhook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert answered >= 9
    texts = [m["text"] for m in webhook.received]
    assert any("50% of its daily usd budget" in t for t in texts) and any("80%" in t for t in texts)
    assert len(texts) == len(set(texts))  # once per threshold and window, not a storm
    assert all(m["thrifty"]["kind"] == "budget_threshold" for m in webhook.received)
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "alerts", "--db", str(tmp_path / "ledger.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "budget_threshold" in out.stdout and "delivered" in out.stdout


def _row(i: int, ts: float, tenant: str, feature: str, cost: str) -> tuple[Any, ...]:
    return entry_row(
        ledger_entry(
            f"req_{i:08d}",
            ts=ts,
            tenant=tenant,
            feature=feature,
            cost=cost,
            usage=Usage(input_tokens=10, output_tokens=5),
        )
    )


async def test_spend_and_rate_spikes_against_the_same_hour_of_previous_days(tmp_path: Path):
    conn = open_database(tmp_path / "l.db")
    now = time.time()
    rows, i = [], 0
    for day in range(1, 8):  # the same hour on each of the previous 7 days: 2 calls, $0.01
        for _ in range(2):
            rows.append(_row(i, now - day * 86400 - 600, "acme", "search", "0.005"))
            i += 1
    for _ in range(30):  # the last hour: 30 calls, $0.15 -> 15x rate, 15x spend
        rows.append(_row(i, now - 300, "acme", "search", "0.005"))
        i += 1
    rows.append(_row(i, now - 300, "globex", "chat", "0.001"))  # no history: nothing to compare with
    conn.executemany(INSERT_ENTRY_SQL, rows)
    service = AlertService(AlertSettings(), conn)
    found = service.anomalies(now)
    assert sorted(a.kind for a in found) == ["feature_spend_spike", "tenant_rate_spike"]
    spend = next(a for a in found if a.kind == "feature_spend_spike")
    assert spend.scope == "feature:acme/search" and "15.0x the median" in spend.message
    assert service.fire(found) == 2 and service.fire(service.anomalies(now)) == 0  # once per hour window
    payloads = [orjson.loads(p) for (p,) in conn.execute("SELECT payload FROM alerts")]
    assert all("text" in p for p in payloads)
