"""Webhook delivery of ended jobs: once across processes (a lease), retried until a day past expiry."""

from __future__ import annotations

import time

import aiohttp
import orjson

from thrifty.batch.service import BatchService


class WebhookDelivery:
    def __init__(self, service: BatchService, owner: str) -> None:
        self._service = service
        self._owner = owner
        self._http: aiohttp.ClientSession | None = None
        self._retry_at: dict[str, float] = {}  # deliveries that failed: not before then

    def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._service.settings.webhook_timeout_s)
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def deliver(self) -> None:
        service, db = self._service, self._service.db
        if self._http is None:
            return
        for job in db.undelivered():
            assert job.webhook_url is not None
            if self._retry_at.get(job.job_id, 0.0) > time.time():
                continue
            if not db.lease_delivery(job.job_id, self._owner, time.time(), service.settings.lease_s):
                continue  # another process is delivering it
            payload = service.job_view(job) if job.kind == "deferred" else service.batch_object(job)
            try:
                async with self._http.post(
                    job.webhook_url, data=orjson.dumps(payload), headers={"content-type": "application/json"}
                ) as resp:
                    if resp.status >= 300:
                        raise RuntimeError(f"the webhook answered {resp.status}")
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as err:
                if time.time() > job.expires_at + 86400:
                    db.mark_delivered(job.job_id, time.time(), f"gave up: {err}")
                else:
                    db.mark_delivered(job.job_id, None, str(err) or type(err).__name__)
                    self._retry_at[job.job_id] = time.time() + service.settings.poll_interval_s
                continue
            self._retry_at.pop(job.job_id, None)
            db.mark_delivered(job.job_id, time.time(), None)


__all__ = ["WebhookDelivery"]
