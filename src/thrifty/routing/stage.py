"""The route stage: which model answers, and escalation when a quality gate rejects a cheap draft.

It sits inside the spend guard (whose reservation covers every call a route may make) and outside
resilience, so each tier call is retried and falls back on its own, and every call, drafts and
voters included, is an Attempt in the ledger entry with its role and the gate's verdict.

Streaming on a cascade route: a draft must be judged whole before anyone sees it, so non-final
tiers are called without streaming and an accepted draft is replayed to the client as SSE; the
final tier, which no gate can overrule, streams live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.routing.gates import Draft, Gate, Verdict, build_gate, judge_all
from thrifty.settings import RouteSettings
from thrifty.shapes import as_chunks, stream_from
from thrifty.types import AttemptRole, ModelTarget

# A 4xx other than these means the request itself is wrong: another tier would refuse it too.
_ESCALATE_ON = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True, slots=True)
class CascadePlan:
    tiers: tuple[str, ...]
    gates: tuple[Gate, ...]
    include_rejected_draft: bool
    wants_logprobs: bool


def cascade_plan(route: RouteSettings) -> CascadePlan:
    limit = route.max_escalations if route.max_escalations is not None else len(route.tiers) - 1
    return CascadePlan(
        tiers=tuple(route.tiers[: limit + 1]),
        gates=tuple(build_gate(g) for g in route.gates),
        include_rejected_draft=route.include_rejected_draft,
        wants_logprobs=any(g.kind == "logprob" for g in route.gates),
    )


def possible_calls(route: RouteSettings) -> list[str]:
    """Every model alias one request on a cascade route may call, repeated per call (worst-case cost)."""
    if route.strategy != "cascade" or not route.tiers:
        return []
    limit = route.max_escalations if route.max_escalations is not None else len(route.tiers) - 1
    plan_tiers = route.tiers[: limit + 1]
    voters = [v for g in route.gates for v in g.voters]
    # Every tier but the last may be judged, and each judgement may ask every voter.
    return [*plan_tiers, *(voters * max(0, len(plan_tiers) - 1))]


def with_feedback(body: Mapping[str, Any], draft: Draft, verdict: Verdict) -> dict[str, Any]:
    """The escalated request, carrying the rejected draft and why it was rejected."""
    messages = [
        *body.get("messages", []),
        {"role": "assistant", "content": draft.text},
        {
            "role": "user",
            "content": f"A check rejected that answer ({verdict.reason}). Answer the original request again, "
            "correctly and completely.",
        },
    ]
    return {**body, "messages": messages}


class RouteStage:
    def __init__(self, routes: Mapping[str, RouteSettings], targets: Mapping[str, ModelTarget]) -> None:
        self._targets = dict(targets)
        self._pins = {name: dict(r.pin) for name, r in routes.items() if r.pin}
        self._cascades = {
            name: cascade_plan(r) for name, r in routes.items() if r.strategy == "cascade" and r.tiers
        }

    @property
    def active(self) -> bool:
        return bool(self._pins or self._cascades)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if ctx.route is None:
            return await call_next(ctx)
        pinned = self._pins.get(ctx.route, {}).get(ctx.tags.task or "")
        if pinned is not None:
            ctx.target = self._targets[pinned]
            return await call_next(ctx)
        plan = self._cascades.get(ctx.route)
        if plan is None:
            return await call_next(ctx)
        return await self._cascade(ctx, call_next, plan)

    async def _cascade(self, ctx: RequestContext, call_next: Handler, plan: CascadePlan) -> Result:
        body = ctx.body
        last = len(plan.tiers) - 1
        for i, alias in enumerate(plan.tiers):
            if i == last:
                ctx.escalated = i > 0
                return await self.call(ctx, call_next, alias, body, stream=ctx.stream, role="answer")
            draft_body = (
                {**body, "logprobs": True} if plan.wants_logprobs and not body.get("logprobs") else body
            )
            try:
                result = await self.call(ctx, call_next, alias, draft_body, stream=False, role="draft")
            except ThriftyError as err:
                if err.status not in _ESCALATE_ON:
                    raise
                continue  # the tier is down: the next one answers
            assert isinstance(result, Completion)
            draft = Draft(alias, draft_body, result.body)

            async def ask(voter: str, question: dict[str, Any] = draft_body) -> Draft | None:
                try:
                    answer = await self.call(ctx, call_next, voter, question, stream=False, role="voter")
                except ThriftyError:
                    return None
                assert isinstance(answer, Completion)
                return Draft(voter, question, answer.body)

            mark = len(ctx.attempts)
            verdict = await judge_all(plan.gates, draft, ask)
            self._record_verdict(ctx, mark, verdict)
            if verdict.passed:
                self._promote(ctx, mark)
                ctx.escalated = i > 0
                response = result.body
                if draft_body is not body:
                    response = _without_logprobs(response)
                return self.deliver(ctx, response)
            if plan.include_rejected_draft:
                body = with_feedback(ctx.body, draft, verdict)
        raise AssertionError("unreachable: the last tier returns")

    async def call(
        self,
        ctx: RequestContext,
        call_next: Handler,
        alias: str,
        body: dict[str, Any],
        *,
        stream: bool,
        role: AttemptRole,
    ) -> Result:
        """One call down the pipeline on `alias`, its attempts marked with `role`."""
        saved_body, saved_stream = ctx.body, ctx.stream
        ctx.target, ctx.body, ctx.stream = self._targets[alias], body, stream
        first = len(ctx.attempts)
        try:
            return await call_next(ctx)
        finally:
            ctx.body, ctx.stream = saved_body, saved_stream
            if role != "answer":
                for j in range(first, len(ctx.attempts)):
                    ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], role=role)

    @staticmethod
    def deliver(ctx: RequestContext, response: dict[str, Any]) -> Result:
        """A buffered draft, as JSON or replayed as SSE to a streaming client."""
        if ctx.stream:
            return Streamed(stream_from(as_chunks(response)))
        return Completion(response, None)

    @staticmethod
    def _record_verdict(ctx: RequestContext, mark: int, verdict: Verdict) -> None:
        """The verdict belongs to the draft: the last attempt before the gate's own calls."""
        for j in range(mark - 1, -1, -1):
            if ctx.attempts[j].role == "draft":
                ctx.attempts[j] = dataclasses.replace(
                    ctx.attempts[j], gate=("pass: " if verdict.passed else "fail: ") + verdict.reason
                )
                return

    @staticmethod
    def _promote(ctx: RequestContext, mark: int) -> None:
        for j in range(mark - 1, -1, -1):
            if ctx.attempts[j].role == "draft" and ctx.attempts[j].status == 200:
                ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], role="answer")
                return


def _without_logprobs(response: dict[str, Any]) -> dict[str, Any]:
    """Logprobs thrifty asked for on its own account are not shown to a client that did not ask."""
    choices = [{**c, "logprobs": None} for c in response.get("choices") or ()]
    return {**response, "choices": choices}


__all__ = ["CascadePlan", "RouteStage", "cascade_plan", "possible_calls", "with_feedback"]
