"""Run a golden set against models through the in-process gateway: every call is priced and in
the ledger (feature `eval`, the judge's calls `eval-judge`), each finished (model, item) goes to the
journal before the next is counted, so a run that dies resumes without calling a finished item again."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from thrifty.errors import IdempotentRequestInProgress, ThriftyError
from thrifty.evals.golden import GoldenItem, GoldenSet
from thrifty.evals.journal import Journal
from thrifty.evals.scorers import judge_messages, judge_verdict, score_output
from thrifty.gateway import Gateway
from thrifty.pipeline import Completion

EVAL_FEATURE = "eval"
JUDGE_FEATURE = "eval-judge"


def _key(run_id: str, system: str, item_id: str, role: str) -> str:
    digest = hashlib.sha256(f"{system}\x00{item_id}\x00{role}".encode()).hexdigest()[:32]
    return f"thrifty-eval-{run_id[:16]}-{digest}"


async def _ask(
    gateway: Gateway, model: str, messages: Sequence[dict[str, Any]], *, tenant: str, feature: str, key: str
) -> tuple[str, Decimal | None, str | None, str | None]:
    """The reply text, its cost, request id and the model that answered."""
    ctx, result = await gateway.chat_completion(
        {"model": model, "messages": list(messages)}, tenant=tenant, feature=feature, idempotency_key=key
    )
    if not isinstance(result, Completion):  # pragma: no cover - the body never asks for a stream
        raise TypeError("eval calls are not streamed")
    choices = result.body.get("choices") or [{}]
    text = (choices[0].get("message") or {}).get("content") or ""
    trailer = ctx.trailer or {}
    raw = trailer.get("cost_usd")
    cost = None if raw is None else Decimal(raw)
    if trailer.get("cache") == "dedup" and ctx.saved_usd is not None:
        # Answered from the idempotency store (its first call finished, the journal line did not):
        # the answer cost what its first call, already in the ledger, cost.
        cost = ctx.saved_usd
    return str(text), cost, trailer.get("request_id"), trailer.get("model")


async def _one(
    gateway: Gateway, journal: Journal, system: str, item: GoldenItem, tenant: str
) -> dict[str, Any] | None:
    """The journal record of one (system, item), or None when it must wait (see `pending`)."""
    record: dict[str, Any] = {"model": system, "id": item.id, "output": None, "passed": False}
    started = time.perf_counter()
    try:
        output, cost, request_id, answered_by = await _ask(
            gateway, system, item.messages, tenant=tenant, feature=EVAL_FEATURE,
            key=_key(journal.run_id, system, item.id, "answer"),
        )  # fmt: skip
    except IdempotentRequestInProgress:
        return None
    except ThriftyError as err:
        record.update(
            error=f"{type(err).__name__}: {err.message}", latency_ms=(time.perf_counter() - started) * 1000
        )
        record.update(cost_usd=None, judge_cost_usd=None)
        return record
    record.update(
        output=output,
        latency_ms=(time.perf_counter() - started) * 1000,
        cost_usd=None if cost is None else str(cost),
        request_id=request_id,
        answered_by=answered_by,
        judge_cost_usd=None,
        error=None,
    )
    return await score_record(gateway, journal, system, item, tenant, record, output)


async def score_record(
    gateway: Gateway,
    journal: Journal,
    system: str,
    item: GoldenItem,
    tenant: str,
    record: dict[str, Any],
    output: str,
) -> dict[str, Any] | None:
    """Score an answered item (asking the judge through the gateway where the scorer is one)."""
    if item.scorer == "judge":
        try:
            reply, judge_cost, _, _ = await _ask(
                gateway, str(item.judge["model"]), judge_messages(item, output), tenant=tenant,
                feature=JUDGE_FEATURE, key=_key(journal.run_id, system, item.id, "judge"),
            )  # fmt: skip
        except IdempotentRequestInProgress:
            return None
        except ThriftyError as err:
            record["error"] = f"judge: {type(err).__name__}: {err.message}"
            return record
        record.update(passed=judge_verdict(reply), judge_reply=reply[:200])
        record["judge_cost_usd"] = None if judge_cost is None else str(judge_cost)
        return record
    try:
        record["passed"] = score_output(item, output)
    except Exception as err:  # noqa: BLE001 - a user's callable scorer may raise anything: a failed item, not a crash
        record["error"] = f"scorer: {type(err).__name__}: {err}"
    return record


async def run_eval(
    gateway: Gateway,
    golden: GoldenSet,
    systems: Sequence[str],
    journal: Journal,
    *,
    tenant: str,
    concurrency: int = 4,
    on_done: Callable[[], None] = lambda: None,
) -> list[tuple[str, str]]:
    """Call what the journal lacks; returns the (system, item id) pairs left pending: calls that
    were running when a previous run died, which the gateway refuses until their lease ends."""
    limit = asyncio.Semaphore(max(1, concurrency))
    pending: list[tuple[str, str]] = []

    async def work(system: str, item: GoldenItem) -> None:
        async with limit:
            record = await _one(gateway, journal, system, item, tenant)
        if record is None:
            pending.append((system, item.id))
        else:
            journal.add(record)
        on_done()

    todo = [(s, i) for s in systems for i in golden.items if not journal.done(s, i.id)]
    await asyncio.gather(*(work(s, i) for s, i in todo))
    return pending
