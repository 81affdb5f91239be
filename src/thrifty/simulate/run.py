"""Replay traffic through a real `Gateway` built from one step's settings, and read what its ledger
says each request cost. The pipeline is the gateway's own; only the providers are replays (answers
from the traffic's recorded responses and from labelled per-model outputs) and the store is a
throw-away SQLite file.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
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
from thrifty.providers.replay import RecordingIndex, ReplayProvider
from thrifty.settings import ProviderSettings, Settings, TenantSettings
from thrifty.simulate.traffic import TrafficLine
from thrifty.tokens import TokenCounter
from thrifty.types import Tags

_MISSING_OUTPUT = re.compile(r"no output of model '([^']+)'")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the ledger says about one traffic line in one step."""

    cost: Decimal | None
    ok: bool
    cache: str
    model: str | None
    escalated: bool
    batch: bool
    error: str | None
    context_saved: int  # prompt tokens the context stage took out
    answer: str | None  # the text served (None for errors and deferred items)

    @property
    def unrecorded(self) -> bool:
        """Failed because no recording answers it: the replay cannot say what this would cost."""
        return not self.ok and self.error is not None and "replay provider" in self.error

    @property
    def missing_model(self) -> str | None:
        if not self.unrecorded or self.error is None:
            return None
        found = _MISSING_OUTPUT.search(self.error)
        return found.group(1) if found else (self.model or "any model")


class BatchedEmbedder:
    """The semantic cache's model with the traffic's queries embedded beforehand, 256 at a time:
    one query at a time is what the live gateway does and what would make a 100,000-request
    replay slow. A text not seen beforehand is embedded on the spot."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
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
            for text, row in zip(missing, self._inner.embed(missing, batch_size), strict=True):
                self._rows[text] = row
        return np.stack([self._rows[t] for t in texts])

    def factory(self) -> EmbedderFactory:
        return lambda: self


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
    """One traffic line through the gateway, as `thrifty serve` handles it; (request id, text served)."""
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


def _read_ledger(db_path: Path) -> dict[str, Outcome]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT request_id, cost_usd, status, cache, model, escalated, batch, error, context FROM ledger"
        ).fetchall()
    finally:
        conn.close()
    found: dict[str, Outcome] = {}
    for rid, cost, status, cache, model, escalated, batch, error, context in rows:
        saved = 0
        if context:
            report = orjson.loads(context)
            before, after = report.get("before") or {}, report.get("after") or {}
            if after:
                saved = max(
                    0,
                    sum(v for v in before.values() if isinstance(v, int))
                    - sum(v for v in after.values() if isinstance(v, int)),
                )
        found[rid] = Outcome(
            cost=None if cost is None else Decimal(cost),
            ok=status == "ok",
            cache=cache,
            model=model,
            escalated=bool(escalated),
            batch=bool(batch),
            error=error,
            context_saved=saved,
            answer=None,
        )
    return found


@dataclass(frozen=True)
class StepRun:
    outcomes: list[Outcome | None]  # per traffic line; None: no ledger row (never expected)
    ledger_total: Decimal  # every priced ledger row of the step's file, summed
    ledger_rows: int
    seconds: float
    open_batch_items: int


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
    db_path: Path
    send_keys: bool
    started: float


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
        name: ReplayProvider(name, ProviderSettings(kind="replay", data=["(simulate)"]), counter, index)
        for name in prepared.providers
    }
    gateway = Gateway(
        prepared,
        providers=providers,
        embedder_factory=embedder.factory() if embedder is not None else None,
    )
    return PreparedStep(gateway, db_path, send_keys, time.perf_counter())


async def run_prepared(
    step: PreparedStep, lines: Sequence[TrafficLine], advance: Callable[[], None] | None = None
) -> StepRun:
    """Every line through the step's gateway in recorded order, one at a time, then its ledger."""
    gateway = step.gateway
    ids: list[tuple[str, str | None]] = []
    left = 0
    await gateway.start()
    try:
        for line in lines:
            ids.append(await _send(gateway, line, step.send_keys))
            if advance is not None:
                advance()
        service = gateway.batch
        if service.defer_routes:
            # The clock just past every queue's age limit: each is due, and no item's window has passed.
            ages = [d.max_age_s for d in service.defer_routes.values()] + [service.settings.defer.max_age_s]
            left = await gateway.batch_runner.drain(time.time() + max(ages) + 1.0)
    finally:
        await gateway.close()
    ledger = await asyncio.to_thread(_read_ledger, step.db_path)
    outcomes: list[Outcome | None] = []
    for rid, text in ids:
        row = ledger.get(rid)
        if row is not None and text is not None:
            row = replace(row, answer=text)
        outcomes.append(row)
    total = sum((o.cost for o in ledger.values() if o.cost is not None), Decimal(0))
    return StepRun(outcomes, total, len(ledger), time.perf_counter() - step.started, left)


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
) -> StepRun:
    step = prepare_step(
        settings, lines, index=index, workdir=workdir, send_keys=send_keys, counter=counter, embedder=embedder
    )
    return await run_prepared(step, lines, advance)


__all__ = [
    "BatchedEmbedder",
    "Outcome",
    "PreparedStep",
    "StepRun",
    "build_index",
    "prepare_step",
    "replay_settings",
    "run_prepared",
    "run_step",
]
