"""What a stage does when a shared store is unreachable: `shared_state.fault_mode`.

`fail_closed` (the default): the store's SharedStateUnavailable goes out as a 503 naming the
dependency. `degrade_local`: the stage decides with its in-process store instead (per-replica
limits, so N replicas may admit up to N times a limit while it lasts), counted here and logged
at most every few seconds.
"""

from __future__ import annotations

import logging
import time

from thrifty.errors import SharedStateUnavailable

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0


class LocalFallback:
    def __init__(self, what: str) -> None:
        self.what = what
        self.decisions = 0  # how many decisions this replica took alone (a metric)
        self._warned_at = float("-inf")

    def note(self, err: SharedStateUnavailable) -> None:
        self.decisions += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "%s decided per replica (shared_state.fault_mode: degrade_local; %d so far): %s",
                self.what,
                self.decisions,
                err.message,
            )


__all__ = ["LocalFallback"]
