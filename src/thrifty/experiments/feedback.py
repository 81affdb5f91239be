"""Feedback on a request: `POST /v1/thrifty/feedback {request_id, score | label | correct}`.

The caller's key decides the tenant; feedback on a request of another tenant is answered exactly
as one on an unknown id (404), so ids cannot be probed across tenants. One row per request: a
repeat is not counted twice. Other parts of the gateway subscribe with `subscribe(observer)` at
the composition root and are told about each new or changed feedback after it is stored; e.g.
the semantic cache can drop an entry on `label: "cache_wrong"`. An observer that fails is logged
and never fails the feedback call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from thrifty.errors import InvalidRequest, NotFound, ThriftyError
from thrifty.experiments.store import ExperimentStore, Feedback, Stored

log = logging.getLogger(__name__)

# Called with each stored (new or changed) feedback; may be sync or async.
FeedbackObserver = Callable[[Feedback], Awaitable[None] | None]
_FIELDS = frozenset({"request_id", "score", "label", "correct"})
MAX_LABEL = 64


class FeedbackUnavailable(ThriftyError):
    """The gateway has no experiment store yet (before `start()`, after `close()`)."""

    status = 503
    error_type = "server_error"
    code = "feedback_unavailable"


class UnknownRequest(NotFound):
    code = "request_not_found"


def parse_feedback(body: Any) -> tuple[str, float | None, str | None, bool | None]:
    """Check a feedback body: a request id and at least one of score, label, correct."""
    if not isinstance(body, dict):
        raise InvalidRequest("the feedback body must be a JSON object {request_id, score | label | correct}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(
            f"unknown feedback field(s) {', '.join(unknown)}; "
            "send request_id with score, label and/or correct",
            param=unknown[0],
        )
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise InvalidRequest(
            "'request_id' is required: the x-thrifty-request-id header of the response the feedback is about",
            param="request_id",
        )
    score = body.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score)
    ):
        raise InvalidRequest("'score' must be a finite number (e.g. 0 to 1, or 1 to 5)", param="score")
    label = body.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL):
        raise InvalidRequest(
            f"'label' must be a non-empty string of at most {MAX_LABEL} characters", param="label"
        )
    correct = body.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise InvalidRequest("'correct' must be true or false", param="correct")
    if score is None and label is None and correct is None:
        raise InvalidRequest("give at least one of 'score', 'label' or 'correct'")
    return request_id.strip(), None if score is None else float(score), label, correct


class FeedbackService:
    def __init__(self, store: ExperimentStore | None) -> None:
        self._store = store
        self._observers: list[FeedbackObserver] = []

    def attach(self, store: ExperimentStore | None) -> None:
        self._store = store

    def subscribe(self, observer: FeedbackObserver) -> None:
        """Register at the composition root: called after each new or changed feedback is stored."""
        self._observers.append(observer)

    async def record(self, tenant: str, body: Any) -> tuple[Feedback, Stored]:
        request_id, score, label, correct = parse_feedback(body)
        store = self._store
        if store is None:
            raise FeedbackUnavailable("feedback is taken once the gateway has started (and until it closes)")
        facts = await asyncio.to_thread(store.ledger_facts, request_id)
        if facts is None or facts.tenant_id != tenant:
            # The same answer for another tenant's request as for none: ids are not probed.
            raise UnknownRequest(
                f"no request {request_id!r} of your tenant in the ledger; send the x-thrifty-request-id of a "
                "response your key received",
                param="request_id",
            )
        feedback = Feedback(
            request_id=request_id,
            tenant_id=tenant,
            ts=time.time(),
            route=facts.route,
            variant=facts.variant,
            model=facts.model,
            cache=facts.cache,
            score=score,
            label=label,
            correct=correct,
        )
        stored = await asyncio.to_thread(store.put_feedback, feedback)
        if stored != "same":
            await self._notify(feedback)
        return feedback, stored

    async def _notify(self, feedback: Feedback) -> None:
        for observer in self._observers:
            try:
                outcome = observer(feedback)
                if outcome is not None:
                    await outcome
            except Exception:
                log.exception("feedback observer %r failed on %s", observer, feedback.request_id)


__all__ = ["FeedbackObserver", "FeedbackService", "FeedbackUnavailable", "UnknownRequest", "parse_feedback"]
