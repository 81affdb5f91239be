"""Alert storage (once per key: SQLite or PostgreSQL's primary key) and delivery (webhook, off the
request path). With PostgreSQL the store is async: an alert is stored and sent from a task."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterable, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from thrifty.alerts.rules import Alert, escalation_drift, spike
from thrifty.settings import AlertSettings
from thrifty.stores.postgres import PostgresAlertStore
from thrifty.stores.readers import SqliteAlertStore

log = logging.getLogger(__name__)

_HOUR = 3600.0
_DAYS = 7


class AlertService:
    def __init__(
        self,
        settings: AlertSettings,
        store: sqlite3.Connection | SqliteAlertStore | PostgresAlertStore,
        expected_escalation: Mapping[str, float] | None = None,
    ) -> None:
        self._settings = settings
        if isinstance(store, sqlite3.Connection):
            store = SqliteAlertStore(store)
        self._local = store if isinstance(store, SqliteAlertStore) else None
        self._remote = store if isinstance(store, PostgresAlertStore) else None
        # Per route driven by a trained router: the escalation rate it was calibrated for.
        self._expected = dict(expected_escalation or {})
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._seen: set[str] = set()

    async def start(self) -> None:
        if self._settings.webhook_url:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._checker = asyncio.ensure_future(self._check_periodically())

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def fire(self, alerts: list[Alert]) -> int:
        """Store each alert whose key is new and send it; return how many were new."""
        new = 0
        for alert in alerts:
            if alert.key in self._seen:
                continue  # already stored: skip the database on the request path
            if len(self._seen) > 10_000:
                self._seen.clear()  # old windows; the primary key still guards against repeats
            self._seen.add(alert.key)
            payload = alert.payload()
            if self._remote is not None:
                self._spawn(self._store_remote(alert, payload))
                continue
            assert self._local is not None
            text = orjson.dumps(payload).decode()
            if self._local.insert_once(alert.key, time.time(), alert.kind, alert.scope, alert.message, text):
                new += 1
                self._announce(alert, payload)
        return new

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_remote(self, alert: Alert, payload: dict[str, object]) -> None:
        assert self._remote is not None
        text = orjson.dumps(payload).decode()
        try:
            fresh = await self._remote.insert_once(
                alert.key, time.time(), alert.kind, alert.scope, alert.message, text
            )
        except Exception as err:  # noqa: BLE001 - an alert must never fail a request
            log.error("alert %s not stored: %s", alert.key, err)
            return
        if fresh:
            self._announce(alert, payload)

    def _announce(self, alert: Alert, payload: dict[str, object]) -> None:
        log.warning("alert: %s", alert.message)
        if self._session is not None:
            self._spawn(self._deliver(alert.key, payload))

    async def _deliver(self, key: str, payload: dict[str, object]) -> None:
        assert self._session is not None and self._settings.webhook_url is not None
        error = None
        try:
            async with self._session.post(
                self._settings.webhook_url,
                data=orjson.dumps(payload),
                headers={"content-type": "application/json"},
            ) as resp:
                if resp.status >= 300:
                    error = f"webhook answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as err:
            error = f"webhook unreachable: {err}"
        if error is not None:
            log.error("alert %s not delivered: %s", key, error)
        delivered = None if error else time.time()
        if self._remote is not None:
            await self._remote.mark_delivery(key, delivered, error)
        elif self._local is not None:
            self._local.mark_delivery(key, delivered, error)

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.anomaly_check_s)
            now = time.time()
            if self._remote is not None:
                try:
                    rows = await self._remote.recent_spend(_since(now))
                    counts = (
                        await self._remote.escalations(now - self._settings.escalation_drift_window_s)
                        if self._expected
                        else []
                    )
                except Exception as err:  # noqa: BLE001 - checked again next time
                    log.warning("anomaly check skipped: %s", err)
                    continue
                self.fire(self.anomalies_in(rows, now) + self.drift_in(counts, now))
            else:
                self.fire(self.anomalies(now))

    def anomalies(self, now: float) -> list[Alert]:
        """Features spending > spike factor x, tenants calling > rate factor x their usual hour."""
        assert self._local is not None
        return self.anomalies_in(self._local.recent_spend(_since(now)), now) + self.drift(now)

    def anomalies_in(self, rows: Iterable[tuple[float, str, str | None, Any]], now: float) -> list[Alert]:
        hour_start = now - _HOUR
        spend: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        calls: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for ts, tenant, feature, cost in rows:
            # Day offset of the hour-long slot ending now: 0 = the last hour, 1 = same hour yesterday.
            age = now - ts
            day, within = divmod(age, 86400)
            if within >= _HOUR or day > _DAYS:
                continue
            calls[tenant][int(day)] += 1
            if feature is not None and cost is not None:
                spend[f"{tenant}/{feature}"][int(day)] += Decimal(cost)
        alerts = []
        factor = self._settings.spend_spike_factor
        for scope, by_day in spend.items():
            found = spike(
                "feature_spend_spike",
                f"feature:{scope}",
                hour_start,
                float(by_day.get(0, 0)),
                [float(by_day.get(d, 0)) for d in range(1, _DAYS + 1)],
                factor,
                "spend (USD)",
            )
            if found is not None:
                alerts.append(found)
        for tenant, counts in calls.items():
            found = spike(
                "tenant_rate_spike",
                f"tenant:{tenant}",
                hour_start,
                float(counts.get(0, 0)),
                [float(counts.get(d, 0)) for d in range(1, _DAYS + 1)],
                self._settings.rate_spike_factor,
                "requests",
            )
            if found is not None:
                alerts.append(found)
        return alerts

    def drift(self, now: float) -> list[Alert]:
        """Routes whose escalation rate over the last window is off their calibrated rate. The
        alert's window is the aligned one `now` falls in, so it fires once per window."""
        if not self._expected or self._local is None:
            return []
        return self.drift_in(self._local.escalations(now - self._settings.escalation_drift_window_s), now)

    def drift_in(self, counts: Iterable[tuple[str, int, int | None]], now: float) -> list[Alert]:
        s = self._settings
        window = s.escalation_drift_window_s
        alerts = []
        for route, total, escalated in counts:
            if route not in self._expected:
                continue
            found = escalation_drift(
                route,
                (now // window) * window,
                int(escalated or 0),
                int(total),
                self._expected[route],
                s.escalation_drift_margin,
                min_requests=s.escalation_drift_min_requests,
            )
            if found is not None:
                alerts.append(found)
        return alerts


def _since(now: float) -> float:
    return now - (_DAYS + 1) * 86400
