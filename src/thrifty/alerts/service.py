"""Alert storage (once per key, in SQLite) and delivery (webhook, off the request path)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Mapping
from decimal import Decimal

import aiohttp
import orjson

from thrifty.alerts.rules import Alert, escalation_drift, spike
from thrifty.settings import AlertSettings

log = logging.getLogger(__name__)

_HOUR = 3600.0
_DAYS = 7


class AlertService:
    def __init__(
        self,
        settings: AlertSettings,
        conn: sqlite3.Connection,
        expected_escalation: Mapping[str, float] | None = None,
    ) -> None:
        self._settings = settings
        self._conn = conn
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
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO alerts (alert_key, ts, kind, scope, message, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    alert.key,
                    time.time(),
                    alert.kind,
                    alert.scope,
                    alert.message,
                    orjson.dumps(payload).decode(),
                ),
            )
            if cur.rowcount == 1:
                new += 1
                log.warning("alert: %s", alert.message)
                if self._session is not None:
                    task = asyncio.ensure_future(self._deliver(alert.key, payload))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        return new

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
        self._conn.execute(
            "UPDATE alerts SET delivered_at = ?, delivery_error = ? WHERE alert_key = ?",
            (None if error else time.time(), error, key),
        )

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.anomaly_check_s)
            self.fire(self.anomalies(time.time()))

    def anomalies(self, now: float) -> list[Alert]:
        """Features spending > spike factor x, tenants calling > rate factor x their usual hour."""
        since = now - (_DAYS + 1) * 86400
        hour_start = now - _HOUR
        spend: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        calls: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        rows = self._conn.execute(
            "SELECT ts, tenant_id, feature, cost_usd FROM ledger WHERE ts >= ?", (since,)
        )
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
        return alerts + self.drift(now)

    def drift(self, now: float) -> list[Alert]:
        """Routes whose escalation rate over the last window is off their calibrated rate. The
        alert's window is the aligned one `now` falls in, so it fires once per window."""
        if not self._expected:
            return []
        s = self._settings
        window = s.escalation_drift_window_s
        counts = self._conn.execute(
            "SELECT route, COUNT(*), SUM(escalated) FROM ledger WHERE ts >= ? AND route IS NOT NULL "
            "AND status = 'ok' GROUP BY route",
            (now - window,),
        )
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
