"""The context stage: every section of a request within its route's budget.

It runs before the cache keys are computed (compacted requests share cache entries) and before the
spend guard (whose reservation is then made on the compacted request). A summary call is reserved
on the request's budgets at its worst case before it is made, through the `SummaryBudget` port, and
settled to what it cost; so the request's reservations together cover the summary and the
compacted call. Routes without `context` settings pass straight through; with no such route at all
the stage is not in the chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from thrifty.context import policy
from thrifty.context.history import (
    CompactionStep,
    Conversation,
    history_tokens,
    keep_newest,
    plan_compaction,
    prefix_keys,
    turn_growth,
)
from thrifty.context.sections import CountCache, DigestCache, split
from thrifty.context.summaries import (
    Summariser,
    Summary,
    SummaryStore,
    SummaryStoreError,
    summary_request,
    transcript,
)
from thrifty.errors import BudgetExceeded, ThriftyError
from thrifty.guard.output import requested_output
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.providers.base import StreamChunk, close_stream
from thrifty.settings import ContextSettings, HistoryBudget, RouteSettings
from thrifty.tokens import TokenCounter, encoding_for_model
from thrifty.types import ModelTarget, Usage

log = logging.getLogger(__name__)

# Part of every summary's key: bump when the summary prompt changes, so old summaries are not reused.
SUMMARY_VERSION = "1"


class SummaryBudget(Protocol):
    """Reserves a call made before the spend guard runs (the spend guard implements it)."""

    def hold(self, ctx: RequestContext, aliases: Sequence[str], usage: Usage) -> object | None: ...

    def release(self, ctx: RequestContext, hold: object | None, first_attempt: int) -> None: ...


def _note_finish(ctx: RequestContext, reasons: list[Any]) -> None:
    if ctx.context_report is not None and reasons:
        ctx.context_report["finish_reason"] = "length" if "length" in reasons else str(reasons[0])


async def _watch_finish(
    ctx: RequestContext, chunks: AsyncIterator[StreamChunk]
) -> AsyncIterator[StreamChunk]:
    try:
        async for chunk in chunks:
            reasons = [
                c.get("finish_reason") for c in chunk.data.get("choices") or () if c.get("finish_reason")
            ]
            if reasons:
                _note_finish(ctx, reasons)
            yield chunk
    finally:
        await close_stream(chunks)


class ContextStage:
    def __init__(
        self,
        routes: Mapping[str, RouteSettings],
        counter: TokenCounter,
        *,
        summariser: Summariser | None = None,
        budget: SummaryBudget | None = None,
        store: SummaryStore | None = None,
    ) -> None:
        self._settings: dict[str, ContextSettings] = {
            name: r.context for name, r in routes.items() if r.context is not None
        }
        self._routes = dict(routes)
        self._counter = counter
        self._counts: dict[str, CountCache] = {}
        self._digests = DigestCache()
        # Summaries being made, by (tenant, prefix key): concurrent requests share one call.
        self._making: dict[tuple[str, str], asyncio.Future[Summary]] = {}
        self._summariser = summariser
        self._budget = budget
        self.store = store
        # Embeds texts (L2-normalised rows) for ranking evidence without scores: the semantic
        # cache's model, when the gateway loads it.
        self.embed: Callable[[Sequence[str]], Awaitable[npt.NDArray[np.float32]]] | None = None

    @property
    def active(self) -> bool:
        return bool(self._settings)

    def counts_for(self, target: ModelTarget | None) -> CountCache:
        encoding = encoding_for_model(target.upstream_model)[0] if target else "o200k_base"
        cache = self._counts.get(encoding)
        if cache is None:
            cache = self._counts[encoding] = CountCache(self._counter, encoding)
        return cache

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        settings = self._settings.get(ctx.route) if ctx.route is not None else None
        if settings is None:
            return await call_next(ctx)
        await self.apply(ctx, settings)
        result = await call_next(ctx)
        if settings.output is None:
            return result
        # With an output budget, the ledger says whether the answer was cut off at max_tokens.
        if isinstance(result, Completion):
            _note_finish(ctx, [c.get("finish_reason") for c in result.body.get("choices") or ()])
            return result
        return Streamed(_watch_finish(ctx, result.chunks))

    async def apply(self, ctx: RequestContext, settings: ContextSettings) -> None:
        """Rewrite ctx.body within the budgets and leave the record in ctx.context_report."""
        started = time.thread_time()
        count = self.counts_for(ctx.target)
        sections = split(
            ctx.body, count, requested_output(ctx.body), evidence_section=settings.retrieved is not None
        )
        ctx.context_report = {"before": sections.counts}
        try:
            rw = policy.begin(sections, settings)
            policy.apply_tools(rw, settings, count)
            similarity = None
            if self.embed is not None and policy.retrieved_over(rw, settings):
                waiting = time.thread_time()
                similarity = await self._similarity(rw)
                rw.summary_wait_s += time.thread_time() - waiting  # the embedding runs in a worker thread
            policy.apply_retrieved(rw, settings, count, similarity)
            history = settings.history
            if history is not None:
                conv = policy.history_view(rw, count)
                if policy.history_over(conv, history.budget):
                    policy.check_tail(conv, history.budget)
                    mode = settings.policy("history")
                    if mode == "reject":
                        size = history_tokens(conv.units) + conv.tail_tokens
                        raise policy.over_budget(
                            "history", size, history.budget, "send fewer earlier turns or raise the budget"
                        )
                    if mode == "trim":
                        policy.trim_history(rw, conv, history.budget)
                    else:
                        await self._compact(ctx, rw, conv, history, count)
            policy.apply_output(rw, settings, client_asked=not ctx.output_ceiling_implied)
            after = policy.after_counts(rw, count)
        except policy.ContextBudgetExceeded as err:
            ctx.context_report["rejected"] = err.message
            raise
        record = policy.report(rw, after)
        if rw.changed():
            added = sum(len(str(m.get("content") or "").encode()) + 32 for _, m, _ in rw.inserted)
            if ctx.client_body is None:
                ctx.client_body = ctx.body
            ctx.body = policy.body_with(ctx.body, rw)
            ctx.body_bytes += added  # stays an upper bound of the body's size (the limits' shortcut)
            ctx.prompt_tokens = None
        if sections.blocks:
            ctx.tags = dataclasses.replace(ctx.tags, evidence=self._evidence(ctx.tags.evidence, rw))
        # The stage's own CPU time on this thread; while the summary call is awaited, other requests
        # run on the loop, so that span is taken out (the call is the summary route's, not the stage's).
        elapsed = time.thread_time() - started - rw.summary_wait_s
        record["stage_cpu_ms"] = round(elapsed * 1000.0, 3)
        record.update({k: v for k, v in ctx.context_report.items() if k == "summary"})
        ctx.context_report = record

    async def _similarity(self, rw: policy.Rewrite) -> dict[int, float] | None:
        candidates, _ = policy.candidates_of(rw.split)
        if self.embed is None or all(c.score is not None for c in candidates):
            return None
        vectors = await self.embed([policy.newest_user_text(rw.split), *(c.text for c in candidates)])
        sims = vectors[1:] @ vectors[0]
        return {c.ordinal: float(sims[i]) for i, c in enumerate(candidates)}

    @staticmethod
    def _evidence(header: tuple[str, ...], rw: policy.Rewrite) -> tuple[str, ...]:
        """What the answer rests on: the evidence blocks sent, plus the header's ids minus the blocks
        dropped (the semantic cache's answer identity)."""
        sent: set[str] = set()
        marked: set[str] = set()
        for view in rw.split.messages:
            if not view.marked:
                continue
            blocks = view.blocks()
            marked.update(b.id for b in blocks)
            if view.index in rw.dropped:
                continue
            kept = rw.kept_blocks.get(view.index)
            sent.update(b.id for j, b in enumerate(blocks) if kept is None or kept[j] is not None)
        return tuple(sorted((set(header) - marked) | sent))

    async def _compact(
        self,
        ctx: RequestContext,
        rw: policy.Rewrite,
        conv: Conversation,
        history: HistoryBudget,
        count: CountCache,
    ) -> None:
        """Replace the oldest turns by a summary (made, extended or reused); trim when that fails."""
        assert history.summary_route is not None and ctx.route is not None
        route = self._routes[history.summary_route]
        tenant = ctx.tags.tenant_id
        salt = "\x1f".join(
            (
                tenant,
                ctx.route,
                history.summary_route,
                route.model,
                str(history.summary_tokens),
                SUMMARY_VERSION,
            )
        )
        keys = prefix_keys(conv.units, salt, self._digests)
        found = await self._find(tenant, keys)
        known = {b + 1: found[k].tokens for b, k in enumerate(keys) if k in found}
        step = plan_compaction(
            conv.units,
            conv.tail_tokens,
            history.budget,
            history.summary_tokens,
            known,
            history.verbatim_share,
            history.turns_per_summary * turn_growth(conv),
        )
        previous = found[keys[step.covered - 1]] if step.covered else None
        summary = previous
        shared = False
        if step.needs_call:
            key = (tenant, keys[step.boundary - 1])
            waiting = time.thread_time()
            made = self._making.get(key)
            shared = made is not None
            try:
                if made is not None:
                    # The same summary is being made for another request (a retry, a duplicate):
                    # wait for it rather than pay for it twice.
                    summary = await asyncio.shield(made)
                else:
                    made = self._making[key] = asyncio.get_running_loop().create_future()
                    try:
                        summary = await self._make(ctx, rw, conv, history, step, previous, keys, count)
                    except BaseException as err:
                        # Waiters fall back to trim whatever stopped the maker (even its cancellation).
                        failure = err if isinstance(err, ThriftyError) else ThriftyError(repr(err))
                        made.set_exception(failure)
                        made.exception()  # retrieved: a waiter may not exist
                        raise
                    else:
                        made.set_result(summary)
                    finally:
                        self._making.pop(key, None)
            except ThriftyError as err:
                rw.notes.append(
                    f"summary route {history.summary_route!r} failed ({err.message}); trimmed instead"
                )
                policy.trim_history(rw, conv, history.budget)
                rw.actions["history"] = "trim (summary failed)"
                return
            finally:
                rw.summary_wait_s += time.thread_time() - waiting
        assert summary is not None
        message = policy.summary_message(summary.text, summary.covered_messages)
        kept = conv.units[step.boundary :]
        room = history.budget - conv.tail_tokens - summary.tokens
        if room < 0:
            rw.notes.append(
                f"the summary ({summary.tokens} tokens) does not fit beside the newest turn; trimmed"
            )
            policy.trim_history(rw, conv, history.budget)
            return
        start = keep_newest(kept, room) if history_tokens(kept) > room else 0
        policy.drop(rw, conv.units[: step.boundary + start])
        first = kept[start].views[0].index if start < len(kept) else conv.tail[0].index
        rw.inserted.append((first, message, "history"))
        rw.actions["history"] = "compact"
        assert ctx.context_report is not None
        ctx.context_report["summary"] = {
            "covered_messages": summary.covered_messages,
            "tokens": summary.tokens,
            "made": step.needs_call and not shared,  # this request paid for the call
            "shared": shared,  # made for a concurrent request with the same conversation
            "extended": step.needs_call and previous is not None,
        }

    async def _make(
        self,
        ctx: RequestContext,
        rw: policy.Rewrite,
        conv: Conversation,
        history: HistoryBudget,
        step: CompactionStep,
        previous: Summary | None,
        keys: list[str],
        count: CountCache,
    ) -> Summary:
        """Make (or extend) the summary of units[:step.boundary] and store it."""
        assert history.summary_route is not None
        aged = [rw.message_of(v) for unit in conv.units[step.covered : step.boundary] for v in unit.views]
        body = summary_request(previous.text if previous else None, transcript(aged), history.summary_tokens)
        text = await self._summarise(ctx, history, body, count)
        covered = sum(len(u.views) for u in conv.units[: step.boundary])
        message = policy.summary_message(text, covered)
        tokens = 3 + count("system") + count(message["content"])
        summary = Summary(
            keys[step.boundary - 1], covered, text, tokens, self._routes[history.summary_route].model
        )
        await self._put(ctx.tags.tenant_id, summary)
        return summary

    async def _summarise(
        self, ctx: RequestContext, history: HistoryBudget, body: dict[str, Any], count: CountCache
    ) -> str:
        if self._summariser is None:
            raise ThriftyError("no summariser is configured")
        assert history.summary_route is not None
        route = self._routes[history.summary_route]
        prompt = sum(3 + count(m["role"]) + count(m["content"]) for m in body["messages"]) + 3
        first = len(ctx.attempts)
        hold = None
        if self._budget is not None:
            try:
                hold = self._budget.hold(
                    ctx,
                    [route.model, *route.fallbacks],
                    Usage(input_tokens=prompt, output_tokens=history.summary_tokens),
                )
            except BudgetExceeded as err:
                raise ThriftyError(f"the budget left cannot cover a summary call: {err.message}") from err
        try:
            return await self._summariser(ctx, history.summary_route, route.model, body)
        finally:
            if self._budget is not None:
                self._budget.release(ctx, hold, first)

    async def _find(self, tenant: str, keys: list[str]) -> dict[str, Summary]:
        if self.store is None or not keys:
            return {}
        try:
            return await self.store.find(tenant, keys)
        except SummaryStoreError as err:  # a busy database must not fail the request: summarise anew
            log.warning("context summaries: lookup failed: %s", err)
            return {}

    async def _put(self, tenant: str, summary: Summary) -> None:
        if self.store is None:
            return
        try:
            await self.store.put(tenant, summary)
        except SummaryStoreError as err:
            log.warning("context summaries: could not store a summary: %s", err)
