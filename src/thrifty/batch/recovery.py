"""Provider batches a crash interrupted between sending them and storing their id.

Their sender's lease ran out, so nobody will store the id. The provider's own list says whether the
batch reached it: the one it has is adopted (OpenAI: by its label; Anthropic: by its size, its
creation time and, once it ended, its custom_ids); when it has none, the items go back to the queue.
Never sent twice on a guess: while the provider cannot tell yet, the batch stays `preparing` and is
looked for again later.
"""

from __future__ import annotations

import logging
import time

from thrifty.batch.service import BatchService
from thrifty.errors import ThriftyError

log = logging.getLogger(__name__)


class UnsentRecovery:
    def __init__(self, service: BatchService, owner: str, sending: set[str]) -> None:
        self._service = service
        self._owner = owner
        self._sending = sending  # provider batches this process is sending right now (the runner's)
        self._retry_at: dict[str, float] = {}  # recoveries that could not tell: not before then

    async def run(self) -> None:
        service, db = self._service, self._service.db
        for upstream in db.upstream_batches(["preparing"]):
            uid = upstream.upstream_id
            now = time.time()
            if uid in self._sending or self._retry_at.get(uid, 0.0) > now:
                continue
            adapter = service.adapters.get(upstream.provider)
            if adapter is None or not db.lease_upstream(uid, self._owner, now, service.settings.lease_s):
                continue  # its sender is alive (it holds the lease), or the provider is gone from settings
            request_ids = {item.request_id for item in db.items_of_upstream(uid)}
            try:
                remote_id = await adapter.find(
                    uid, request_ids, upstream.created_at, db.remote_ids(adapter.name)
                )
            except ThriftyError as err:
                log.warning("looking for provider batch %s at %s: %s", uid, upstream.provider, err.message)
                self._retry_at[uid] = time.time() + service.settings.poll_interval_s
                continue
            self._retry_at.pop(uid, None)
            if remote_id is None:
                log.warning(
                    "provider batch %s never reached %s: its items are queued again", uid, adapter.name
                )
                db.requeue_unsent(uid)
            else:
                log.warning("provider batch %s found at %s as %s: adopted", uid, adapter.name, remote_id)
                db.mark_submitted(uid, remote_id, time.time(), adopted=True)


__all__ = ["UnsentRecovery"]
