"""Replay traffic through a real `Gateway` built from one step's settings, and read what its ledger
says each request cost. The pipeline is the gateway's own; only the providers are replays (answers
from the traffic's recorded responses and from labelled per-model outputs) and the stores are the
gateway's own in memory (`simulate/stores.py`), with a throw-away SQLite file for the batch store.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from thrifty.cache.semantic.stage import Embedder, EmbedderFactory
from thrifty.errors import InvalidRequest, ThriftyError
from thrifty.gateway import Gateway, parse_chat_body
from thrifty.pipeline import Completion
from thrifty.providers.base import StreamChunk
from thrifty.providers.replay import RecordingIndex, ReplayProvider
from thrifty.settings import ProviderSettings, Settings, TenantSettings
from thrifty.simulate.outcome import Outcome, context_saved
from thrifty.simulate.stores import ReplayStores, run_semantic_work_inline
from thrifty.simulate.traffic import TrafficLine
from thrifty.tokens import TokenCounter
from thrifty.types import ModelTarget, Tags, UpstreamResult


class BatchedEmbedder:
    """The semantic cache's model with the traffic's queries embedded beforehand, 256 at a time:
    one query at a time is what the live gateway does and what would make a 100,000-request
    replay slow. A text not seen beforehand is embedded on the spot (in a replay process forked
    from the one that embedded, by a model of its own: a forked runtime's threads are gone)."""

    def __init__(self, inner: Embedder, make: Callable[[], Embedder] | None = None) -> None:
        self._inner = inner
        self._make = make
        self._pid = os.getpid()
        self.dim = inner.dim
        self._rows: dict[str, npt.NDArray[np.float32]] = {}

    def prepare(self, texts: Sequence[str], advance: Callable[[int], None] | None = None) -> None:
        todo = sorted({t for t in texts if t not in self._rows}, key=len)
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            rows = self._inner.embed(chunk, batch_size=64)
            for text, row in zip(chunk, rows, strict=True):
                self._rows[text] = row
            if advance is not None:
                advance(len(chunk))

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]:
        missing = [t for t in texts if t not in self._rows]
        if missing:
            if self._pid != os.getpid() and self._make is not None:
                self._inner, self._pid = self._make(), os.getpid()
            for text, row in zip(missing, self._inner.embed(missing, batch_size), strict=True):
                self._rows[text] = row
        return np.stack([self._rows[t] for t in texts])

    def factory(self) -> EmbedderFactory:
        return lambda: self


class MemoTokenCounter(TokenCounter):
    """Token counts remembered per text: a replay counts the same messages in every step (a
    chat's history in each of its turns), and counting was the largest CPU cost left in it.
    Bounded: forgotten all at once when full (counts are cheap to redo, never wrong)."""

    def __init__(self, max_texts: int = 200_000) -> None:
        super().__init__()
        self._max = max_texts
        self._counts: dict[tuple[str, str], int] = {}

    def count_text(self, text: str, encoding: str = "o200k_base") -> int:
        key = (text, encoding)
        found = self._counts.get(key)
        if found is None:
            if len(self._counts) >= self._max:
                self._counts.clear()
            found = self._counts[key] = super().count_text(text, encoding)
        return found


class RecordedFailure(ThriftyError):
    """A request that failed when it was recorded fails the same way when replayed. Not retried
    (the live gateway's retries were spent before the failure was recorded) and no circuit
    breaker counts it, so it changes nothing for the requests after it."""

    status = 424
    error_type = "recorded_failure"
    code = "recorded_failure"


class TrafficReplayProvider(ReplayProvider):
    """The replay provider of a simulation: answers from the recordings, and fails the call of a
    request whose traffic line failed (`failing` is set around that request's run)."""

    def __init__(
        self, name: str, settings: ProviderSettings, counter: TokenCounter, index: RecordingIndex
    ) -> None:
        super().__init__(name, settings, counter, index)
        self.failing: ContextVar[dict[str, Any] | None] = ContextVar(f"replay-failing-{name}", default=None)

    def _fail(self) -> None:
        error = self.failing.get()
        if error is not None:
            how = f"{error.get('type')}, HTTP {error.get('status')}"
            raise RecordedFailure(f"failed when recorded ({how}): {error.get('message')}")

    async def complete(self, target: ModelTarget, body: dict[str, Any]) -> UpstreamResult:
        self._fail()
        return await super().complete(target, body)

    async def stream(self, target: ModelTarget, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        self._fail()
        async for chunk in super().stream(target, body):
            yield chunk


def replay_settings(settings: Settings, db_path: Path, tenants: set[str]) -> Settings:
    """The step's settings as a replay runs them: its own SQLite file, no shared state, and what
    measures limits rather than cost left out (budgets, rate limits, alert webhooks, traces):
    a day replayed in minutes would trip per-minute limits the real day never did."""
    known = {
        name: t.model_copy(update={"budget": None, "rate_limit": None, "features": {}})
        for name, t in settings.tenants.items()
    }
    for tenant in tenants - set(known):
        known[tenant] = TenantSettings()
    routes = {n: r.model_copy(update={"budget": None}) for n, r in settings.routes.items()}
    return settings.model_copy(
        update={
            "storage": settings.storage.model_copy(update={"url": f"sqlite:///{db_path}"}),
            "shared_state": settings.shared_state.model_copy(update={"url": None}),
            "budget": None,
            "tenants": known,
            "routes": routes,
            "alerts": settings.alerts.model_copy(update={"webhook_url": None}),
            "tracing": settings.tracing.model_copy(update={"enabled": False}),
            # Nothing reads a replay's rollups: folded once at start (an empty ledger), not again.
            "dashboard": settings.dashboard.model_copy(update={"fold_interval_s": 3600.0}),
            "batch": settings.batch.model_copy(
                update={"poll_interval_s": 0.05, "files_dir": str(db_path.parent / "batch-files")}
            ),
        }
    )


def _tags(line: TrafficLine, body: dict[str, Any], send_keys: bool) -> Tags:
    user = line.user if line.user is not None else body.get("user")
    return Tags(
        line.tenant,
        line.feature,
        line.prompt_version,
        user if isinstance(user, str) else None,
        idempotency_key=line.idempotency_key if send_keys else None,
        task=line.task,
    )


def _answer_text(body: dict[str, Any]) -> str | None:
    choices = body.get("choices") or []
    if not choices:
        return None
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else None


async def _send(gateway: Gateway, line: TrafficLine, send_keys: bool) -> tuple[str, str | None]:
    """One traffic line through the gateway, as `thrifty serve` handles it; (request id, text served).
    A line that failed when recorded fails at its provider calls (a layer may still answer it first)."""
    if line.outcome == "error":
        tokens = [
            (p, p.failing.set(line.error or {}))
            for p in gateway.providers.values()
            if isinstance(p, TrafficReplayProvider)
        ]
        try:
            return await _send_one(gateway, line, send_keys)
        finally:
            for provider, token in tokens:
                provider.failing.reset(token)
    return await _send_one(gateway, line, send_keys)


async def _send_one(gateway: Gateway, line: TrafficLine, send_keys: bool) -> tuple[str, str | None]:
    try:
        body = parse_chat_body(line.request, line.route)
    except InvalidRequest as err:
        tags = Tags(line.tenant, line.feature, line.prompt_version, line.user)
        refused = await gateway.refuse(tags, err, body_bytes=len(line.request))
        return refused.request_id, None
    tags = _tags(line, body, send_keys)
    service = gateway.batch
    if service.defer_routes:
        try:
            defer = service.defer_settings({}, body)
            if defer is not None:
                job, _ = await service.defer(body, tags, defer, None)
                return str(service.job_view(job)["request_id"]), None
        except ThriftyError as err:
            refused = await gateway.refuse(tags, err, body_bytes=len(line.request), model=body.get("model"))
            return refused.request_id, None
    ctx = gateway.new_context(body, len(line.request), tags)
    try:
        result = await gateway.run(ctx)
    except ThriftyError:
        return ctx.request_id, None
    if isinstance(result, Completion):
        return ctx.request_id, _answer_text(result.body)
    parts: list[str] = []
    try:
        async for chunk in result.chunks:
            for choice in chunk.data.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if isinstance(text, str):
                    parts.append(text)
    except ThriftyError:
        return ctx.request_id, None
    return ctx.request_id, "".join(parts)


def _read_file_ledger(db_path: Path) -> dict[str, Outcome]:
    """The rows written to the step's file rather than through the ledger port: batch results,
    which the batch store records in the same transaction as the items' state."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT request_id, cost_usd, status, cache, model, escalated, batch, error, context FROM ledger"
        ).fetchall()
    finally:
        conn.close()
    return {
        rid: Outcome(
            cost=None if cost is None else Decimal(cost),
            ok=status == "ok",
            cache=cache,
            model=model,
            escalated=bool(escalated),
            batch=bool(batch),
            error=error,
            context_saved=context_saved(orjson.loads(context) if context else None),
            answer_label=None,
        )
        for rid, cost, status, cache, model, escalated, batch, error, context in rows
    }


@dataclass(frozen=True)
class StepRun:
    outcomes: list[Outcome | None]  # per traffic line; None: no ledger row (never expected)
    ledger_total: Decimal  # every priced ledger row of the step, summed
    ledger_rows: int
    seconds: float
    open_batch_items: int
    cpu_seconds: float = 0.0  # of the process that replayed it, while it did


def build_index(lines: Sequence[TrafficLine], outputs: Sequence[str]) -> RecordingIndex:
    """Recorded answers: the traffic's own responses, then labelled per-model outputs."""
    index = RecordingIndex.load(outputs, "--outputs") if outputs else RecordingIndex()
    for line in lines:
        if line.response is None:
            continue
        request = orjson.loads(line.request)
        model = line.model or request.get("model")
        if isinstance(model, str):
            index.add_traffic(model, request.get("messages"), line.response)
    return index


@dataclass
class PreparedStep:
    """A step's gateway, built (synchronously: its start-up warnings are said here) but not started."""

    gateway: Gateway
    stores: ReplayStores
    db_path: Path
    send_keys: bool
    started: float
    cpu_started: float


def prepare_step(
    settings: Settings,
    lines: Sequence[TrafficLine],
    *,
    index: RecordingIndex,
    workdir: Path,
    send_keys: bool,
    counter: TokenCounter,
    embedder: BatchedEmbedder | None = None,
) -> PreparedStep:
    db_path = workdir / "ledger.db"
    prepared = replay_settings(settings, db_path, {line.tenant for line in lines})
    providers = {
        name: TrafficReplayProvider(
            name, ProviderSettings(kind="replay", data=["(simulate)"]), counter, index
        )
        for name in prepared.providers
    }
    stores = ReplayStores(prepared)
    gateway = Gateway(
        prepared,
        providers=providers,
        stores=stores,
        embedder_factory=embedder.factory() if embedder is not None else None,
    )
    return PreparedStep(gateway, stores, db_path, send_keys, time.perf_counter(), time.process_time())


async def run_prepared(
    step: PreparedStep,
    lines: Sequence[TrafficLine],
    advance: Callable[[], None] | None = None,
    labels: Mapping[str, str] | None = None,
) -> StepRun:
    """Every line through the step's gateway in recorded order, one at a time, then its outcomes.
    `labels` (recorded answer text -> label) turns each served text into the label it carries."""
    gateway = step.gateway
    ids: list[tuple[str, str | None]] = []
    left = 0
    labels = labels or {}
    await gateway.start()
    # The batch runner does not tick through the replay (a tick per deferral, and on a timer):
    # every queue is drained at the end, with the clock past its age limit.
    await gateway.batch_runner.pause()
    gateway.batch.wake = None
    run_semantic_work_inline(gateway)
    try:
        for line in lines:
            rid, text = await _send(gateway, line, step.send_keys)
            ids.append((rid, labels.get(text) if text is not None else None))
            if advance is not None:
                advance()
        service = gateway.batch
        if service.defer_routes:
            # The clock just past every queue's age limit: each is due, and no item's window has passed.
            ages = [d.max_age_s for d in service.defer_routes.values()] + [service.settings.defer.max_age_s]
            left = await gateway.batch_runner.drain(time.time() + max(ages) + 1.0)
    finally:
        await gateway.close()
    ledger = step.stores.ledger
    found = ledger.outcomes
    total, rows = ledger.total, ledger.rows
    for rid, outcome in (await asyncio.to_thread(_read_file_ledger, step.db_path)).items():
        if rid not in found:
            found[rid] = outcome
            rows += 1
            total += outcome.cost if outcome.cost is not None else Decimal(0)
    outcomes: list[Outcome | None] = []
    for rid, label in ids:
        row = found.get(rid)
        if row is not None and label is not None:
            row = replace(row, answer_label=label)
        outcomes.append(row)
    seconds, cpu = time.perf_counter() - step.started, time.process_time() - step.cpu_started
    return StepRun(outcomes, total, rows, seconds, left, cpu)


async def run_step(
    settings: Settings,
    lines: Sequence[TrafficLine],
    *,
    index: RecordingIndex,
    workdir: Path,
    send_keys: bool,
    counter: TokenCounter,
    embedder: BatchedEmbedder | None = None,
    advance: Callable[[], None] | None = None,
    labels: Mapping[str, str] | None = None,
) -> StepRun:
    step = prepare_step(
        settings, lines, index=index, workdir=workdir, send_keys=send_keys, counter=counter, embedder=embedder
    )
    return await run_prepared(step, lines, advance, labels)


__all__ = [
    "BatchedEmbedder",
    "MemoTokenCounter",
    "Outcome",
    "PreparedStep",
    "RecordedFailure",
    "StepRun",
    "TrafficReplayProvider",
    "build_index",
    "prepare_step",
    "replay_settings",
    "run_prepared",
    "run_step",
]
