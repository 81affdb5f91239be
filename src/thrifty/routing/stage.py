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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from thrifty.errors import ConfigError, ThriftyError
from thrifty.experiments.assign import Arm, variant_route
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.providers.resilience import RETRYABLE
from thrifty.routing.gates import Draft, Gate, Verdict, build_gate, judge_all, reply_text
from thrifty.routing.train.gate import parse, prompt_features, stage_features
from thrifty.routing.train.router import Router
from thrifty.routing.train.step import Accept, CallModel
from thrifty.routing.train.step import Draft as RouterDraft
from thrifty.settings import RouteSettings
from thrifty.shapes import as_chunks, last_user_message_text, stream_from
from thrifty.types import AttemptRole, ModelTarget

# A tier that fails with what a retry could fix (429, 5xx, timeouts) is escalated past; any other
# 4xx means the request itself is wrong, and another tier would refuse it too.
_ESCALATE_ON = RETRYABLE
# A trained router that keeps asking for calls is a bug; the gateway stops it here.
MAX_ROUTER_CALLS = 6


@dataclass(frozen=True, slots=True)
class CascadePlan:
    tiers: tuple[str, ...]
    gates: tuple[Gate, ...]
    include_rejected_draft: bool
    wants_logprobs: bool
    samples: int = 1  # a self_consistency gate's samples of each draft (1: none)


def cascade_plan(name: str, route: RouteSettings) -> CascadePlan:
    router = load_router(name, route) if route.router is not None else None
    task = route.router.task if route.router is not None else None
    return CascadePlan(
        tiers=tuple(route.cascade_tiers()),
        gates=tuple(build_gate(g, router, task) for g in route.gates),
        include_rejected_draft=route.include_rejected_draft,
        wants_logprobs=any(g.kind == "logprob" for g in route.gates),
        samples=_samples(route),
    )


def _samples(route: RouteSettings) -> int:
    return max((g.samples or 1 for g in route.gates if g.kind == "self_consistency"), default=1)


def load_router(name: str, route: RouteSettings) -> Router:
    assert route.router is not None
    try:
        router = Router.load(route.router.path)
        _score_once(router)
        return router
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as err:
        raise ConfigError(
            f"routes.{name}.router: cannot load {route.router.path!r} "
            f"(make one with `thrifty route train`): {err}"
        ) from err


def _score_once(router: Router) -> None:
    """Score one made-up draft with every gate: an artifact edited by hand or written by another
    version (a gate's weights not matching the features computed here, a zero scale) fails now, at
    start, rather than as a 500 on every request of the route."""
    draft = parse('{"answer": "1"}', None)
    router.first_gate.prob(stage_features([draft], "q"))
    router.agree_gate.prob(stage_features([draft, draft], "q"))
    router.split_gate.prob(stage_features([draft, draft], "q"))
    router.prompt_gate.prob(prompt_features("q"))
    if router.third_gate is not None:
        router.third_gate.prob(stage_features([draft, draft, draft], "q"))


@dataclass(frozen=True, slots=True)
class LearnedPlan:
    """A route driven by a trained router: it names each call and which draft to return."""

    router: Router
    task: str | None
    aliases: dict[str, str]  # the artifact's model ids -> this gateway's aliases


def learned_plan(name: str, route: RouteSettings, targets: Mapping[str, ModelTarget]) -> LearnedPlan:
    assert route.router is not None
    router = load_router(name, route).with_strategy(route.strategy)
    aliases = {m: route.router.models.get(m, m) for m in sorted(router.models())}
    missing = sorted(m for m, alias in aliases.items() if alias not in targets)
    if missing:
        raise ConfigError(
            f"routes.{name}.router: the router calls {', '.join(missing)}, which are not model aliases here; "
            f"map them in routes.{name}.router.models (artifact id: alias)"
        )
    return LearnedPlan(router, route.router.task, aliases)


def possible_calls(route: RouteSettings) -> list[str]:
    """Every model alias one request on a cascade route may call, repeated per call (worst-case cost)."""
    if route.strategy != "cascade" or not route.tiers:
        return []
    plan_tiers = route.cascade_tiers()
    voters = [v for g in route.gates for v in g.voters]
    # Every tier but the last may be judged, and each judgement may ask every voter; a
    # self-consistency gate samples each judged tier k times in all (k calls cost at least what
    # one call with n=k does: the prompt k times against once, the same k outputs).
    judged = plan_tiers[:-1]
    resampled = [t for t in judged for _ in range(_samples(route) - 1)]
    return [*plan_tiers, *(voters * len(judged)), *resampled]


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
    def __init__(
        self,
        routes: Mapping[str, RouteSettings],
        targets: Mapping[str, ModelTarget],
        single_choice: frozenset[str] = frozenset(),
    ) -> None:
        self._targets = dict(targets)
        self._single_choice = single_choice  # models with no `n` (Anthropic): sampled one call each
        self._pins = {name: dict(r.pin) for name, r in routes.items() if r.pin}
        self._cascades = {
            name: cascade_plan(name, r) for name, r in routes.items() if r.strategy == "cascade" and r.tiers
        }
        self._learned = {
            name: learned_plan(name, r, targets)
            for name, r in routes.items()
            if r.router is not None and r.strategy != "fixed" and not r.tiers
        }
        # Experiment arms with their own cascade, keyed ROUTE/ARM (ctx.plan_key()).
        self.variant_routes: dict[str, RouteSettings] = {}
        for name, r in routes.items():
            for arm_name, v in r.experiment.variants.items() if r.experiment else ():
                if v.tiers:
                    key = f"{name}/{arm_name}"
                    self.variant_routes[key] = variant_route(r, Arm.of(arm_name, v))
                    self._cascades[key] = cascade_plan(name, self.variant_routes[key])

    @property
    def active(self) -> bool:
        return bool(self._pins or self._cascades or self._learned)

    def expected_escalation(self) -> dict[str, float]:
        """Per route a trained router drives as a cascade on a task it was calibrated on: the
        share of prompts that escalated out of fold in training (the drift watch's baseline)."""
        out: dict[str, float] = {}
        for name, plan in self._learned.items():
            rates = plan.router.meta.get("escalation_rate") or {}
            if plan.router.strategy == "cascade" and plan.task in rates:
                out[name] = float(rates[plan.task])
        return out

    def possible_calls(self, name: str, route: RouteSettings) -> list[str]:
        """Every model alias one request on the route may call, once per call (worst-case cost)."""
        learned = self._learned.get(name)
        if learned is None:
            return possible_calls(route)
        if learned.router.strategy == "classifier":
            return []  # one call, to the dearest model it may pick (possible_models)
        return sorted(learned.aliases.values())

    def trained_aliases(self) -> dict[str, list[str]]:
        """Per route a trained router drives, every alias it may call (the artifact's models,
        mapped or named as they are here)."""
        return {name: sorted(set(plan.aliases.values())) for name, plan in self._learned.items()}

    def possible_models(self, name: str) -> list[str]:
        """The models the one call of a request on the route may go to, when this stage picks it
        (a trained classifier: its draft or its final model); the worst case is the dearest."""
        learned = self._learned.get(name)
        if learned is None or learned.router.strategy != "classifier":
            return []
        return [learned.aliases[learned.router.ladder[0]], learned.aliases[learned.router.strong]]

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if ctx.route is None:
            return await call_next(ctx)
        if ctx.route_plan is not None:  # an experiment arm: its fixed model, or its own cascade
            arm_plan = self._cascades.get(ctx.route_plan) if ctx.route_plan else None
            return await (call_next(ctx) if arm_plan is None else self._cascade(ctx, call_next, arm_plan))
        pinned = self._pins.get(ctx.route, {}).get(ctx.tags.task or "")
        if pinned is not None:
            ctx.target = self._targets[pinned]
            return await call_next(ctx)
        learned = self._learned.get(ctx.route)
        if learned is not None:
            return await self._run_learned(ctx, call_next, learned)
        plan = self._cascades.get(ctx.route)
        if plan is None:
            return await call_next(ctx)
        return await self._cascade(ctx, call_next, plan)

    async def _run_learned(self, ctx: RequestContext, call_next: Handler, plan: LearnedPlan) -> Result:
        task = ctx.tags.task or plan.task
        prompt = last_user_message_text(ctx.body.get("messages")) or ""
        router = plan.router
        if router.strategy == "classifier":
            # One call, chosen before it is made: nothing to judge afterwards, so it streams live.
            first = router.next_step(task, prompt, [])
            assert isinstance(first, CallModel)
            mark = len(ctx.attempts)
            result = await self.call(
                ctx, call_next, plan.aliases[first.model], ctx.body, stream=ctx.stream, role="answer"
            )
            ctx.escalated = first.model == router.strong
            if isinstance(result, Streamed):
                # A streamed call's attempt is recorded when its stream ends.
                return Streamed(_then(result.chunks, lambda: _note(ctx, mark, first.reason)))
            _note(ctx, mark, first.reason)
            return result
        drafts: list[RouterDraft] = []
        responses: list[dict[str, Any] | None] = []
        attempt_of: list[int | None] = []  # index in ctx.attempts of each draft's successful call
        while True:
            step = router.next_step(task, prompt, drafts)
            if isinstance(step, Accept) or len(drafts) >= MAX_ROUTER_CALLS:
                index = step.index if isinstance(step, Accept) else _last_answered(responses)
                response = responses[index] if index is not None else None
                if response is None or index is None:
                    raise AssertionError("the router accepted a draft that has no reply")
                self._mark(ctx, attempt_of, index, f"pass: {step.reason}", role="answer")
                ctx.escalated = any(d.model == router.strong for d in drafts)
                return self.deliver(ctx, response)
            if drafts:
                self._mark(ctx, attempt_of, len(drafts) - 1, f"fail: {step.reason}", role="draft")
            alias = plan.aliases[step.model]
            try:
                result = await self.call(ctx, call_next, alias, ctx.body, stream=False, role="draft")
            except ThriftyError as err:
                if err.status not in _ESCALATE_ON or step.model == router.strong:
                    raise
                drafts.append(RouterDraft(step.model, ""))  # no reply: the router treats it as no answer
                responses.append(None)
                attempt_of.append(None)
                continue
            assert isinstance(result, Completion)
            drafts.append(RouterDraft(step.model, reply_text(result.body)))
            responses.append(result.body)
            attempt_of.append(len(ctx.attempts) - 1)

    @staticmethod
    def _mark(
        ctx: RequestContext, attempt_of: list[int | None], draft: int, gate: str, role: AttemptRole
    ) -> None:
        j = attempt_of[draft]
        if j is not None:
            ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], gate=gate, role=role)

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
            sampled = draft_body
            if plan.samples > 1 and alias not in self._single_choice and not body.get("n"):
                sampled = {**draft_body, "n": plan.samples}  # one prompt, k outputs
            try:
                result = await self.call(ctx, call_next, alias, sampled, stream=False, role="draft")
            except ThriftyError as err:
                if err.status not in _ESCALATE_ON:
                    raise
                continue  # the tier is down: the next one answers
            assert isinstance(result, Completion)
            draft = Draft(alias, sampled, result.body)

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
                response = dict(verdict.response) if verdict.response is not None else result.body
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
        ctx.use_fallbacks = role == "answer"
        first = len(ctx.attempts)
        try:
            return await call_next(ctx)
        finally:
            ctx.body, ctx.stream, ctx.use_fallbacks = saved_body, saved_stream, True
            if role != "answer":
                for j in range(first, len(ctx.attempts)):
                    ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], role=role)

    @staticmethod
    def deliver(ctx: RequestContext, response: dict[str, Any]) -> Result:
        """A buffered draft, as JSON or replayed as SSE to a streaming client."""
        if ctx.stream:
            return Streamed(stream_from(as_chunks(response, with_usage=ctx.client_wants_usage)))
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


def _note(ctx: RequestContext, mark: int, gate: str) -> None:
    for j in range(mark, len(ctx.attempts)):
        ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], gate=gate)


async def _then(chunks: AsyncIterator[StreamChunk], after: Callable[[], None]) -> AsyncIterator[StreamChunk]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await close_stream(chunks)
        after()


def _last_answered(responses: list[dict[str, Any] | None]) -> int | None:
    return next((i for i in range(len(responses) - 1, -1, -1) if responses[i] is not None), None)


def _without_logprobs(response: dict[str, Any]) -> dict[str, Any]:
    """Logprobs thrifty asked for on its own account are not shown to a client that did not ask."""
    choices = [{**c, "logprobs": None} for c in response.get("choices") or ()]
    return {**response, "choices": choices}


__all__ = [
    "CascadePlan",
    "LearnedPlan",
    "RouteStage",
    "cascade_plan",
    "learned_plan",
    "possible_calls",
    "with_feedback",
]
