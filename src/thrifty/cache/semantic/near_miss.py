"""Near misses are free verdicts: a lookup whose candidate was not served went upstream anyway, and
its fresh answer says whether the candidate would have been right, at the candidate's score.

This is how a threshold learns it may come down, and which cached answers attract questions of
another kind. The candidate's stored answer is read through the stage's ``entries`` (at once from
SQLite; off the response path from a shared store, a round trip away). Under ``compare: judge``
near misses are not judged: a judge call per lookup below the threshold would cost what the cache
saves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from thrifty.cache.semantic.compare import same_answer
from thrifty.cache.semantic.entries import Entries
from thrifty.cache.semantic.verify import Verifier
from thrifty.pipeline import RequestContext
from thrifty.settings import SemanticCacheSettings


class NearMissJudge:
    def __init__(
        self, verifier: Verifier, settings: Mapping[str, SemanticCacheSettings], entries: Entries
    ) -> None:
        self._verifier = verifier
        self._settings = settings
        self._entries = entries

    def __call__(
        self,
        ctx: RequestContext,
        partition: str,
        entry_id: int,
        candidate_answer: str,
        score: float | None,
        response: dict[str, Any],
        evidence_answer: str | None,
    ) -> None:
        """``evidence_answer``: the answer id of the request's evidence ids, when it sent them."""
        assert ctx.route is not None
        route = ctx.route
        if score is None or ctx.cache != "miss" or ctx.deduplicated:
            return
        method = self._verifier.method(route)
        if method == "judge":
            return
        verify = self._settings[route].verify
        assert verify is not None

        def judge(cached: dict[str, Any]) -> None:
            if method == "evidence" and evidence_answer is not None:
                right = candidate_answer == evidence_answer
            else:
                right = same_answer(method, cached, response, verify.json_field)
            self._verifier.observe(
                partition, ctx.tags.tenant_id, route, score, right, candidate_answer, near_miss=True
            )

        self._entries.with_answer(entry_id, time.time(), judge)


__all__ = ["NearMissJudge"]
