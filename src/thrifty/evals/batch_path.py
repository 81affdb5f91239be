"""`eval run --via batch`: the golden set's calls sent as batch jobs through the gateway's own
batch service (its public API: upload, create, job status, output file), priced at batch prices
and in the ledger like any batch item. A judge, where an item has one, is asked in real time.

Resumable like the real-time path: each model's batch id is written (fsynced) beside the journal
the moment it is created, and a rerun waits for that batch instead of sending the items again;
the input file's sha256 finds a batch created just before a crash that left no note. Items are
journaled once their batch is done.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import NotFound
from thrifty.evals.golden import GoldenItem, GoldenSet
from thrifty.evals.journal import Journal
from thrifty.evals.runner import EVAL_FEATURE, score_record
from thrifty.gateway import Gateway
from thrifty.types import Tags

_DEAD = ("failed", "expired", "cancelled")


def _custom_id(item: GoldenItem) -> str:
    return "eval-" + hashlib.sha256(item.id.encode()).hexdigest()[:24]


def _notes(path: Path) -> dict[str, str]:
    return dict(orjson.loads(path.read_bytes())) if path.exists() else {}


def _note(path: Path, system: str, batch_id: str) -> None:
    notes = {**_notes(path), system: batch_id}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(orjson.dumps(notes))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _costs(gateway: Gateway, request_ids: Sequence[str]) -> dict[str, str | None]:
    """The ledger's cost of each batch item (its batch price), by request id, read through the
    ledger reader port of whichever store holds the ledger."""
    if not request_ids:
        return {}
    reader = gateway.stores.reader()
    try:
        return reader.costs(request_ids)
    finally:
        reader.close()


async def run_eval_batch(
    gateway: Gateway,
    golden: GoldenSet,
    systems: Sequence[str],
    journal: Journal,
    notes_path: Path,
    *,
    tenant: str,
    poll_s: float = 5.0,
    on_done: Callable[[], None] = lambda: None,
) -> None:
    service = gateway.batch
    tags = Tags(tenant, feature=EVAL_FEATURE)
    for system in systems:
        items = [i for i in golden.items if not journal.done(system, i.id)]
        if not items:
            continue
        by_custom = {_custom_id(i): i for i in items}
        data = b"".join(
            orjson.dumps(
                {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": system, "messages": list(item.messages)},
                }
            )
            + b"\n"
            for cid, item in by_custom.items()
        )
        batch_id = _notes(notes_path).get(system)
        if batch_id is not None and service.job(tenant, batch_id).status in _DEAD:
            batch_id = None  # that batch died: its unanswered items go in a new one
        if batch_id is None:
            sha = hashlib.sha256(data).hexdigest()
            alive = [b for b in service.batches_for_sha256(tenant, sha) if b["status"] not in _DEAD]
            if alive:
                batch_id = str(alive[0]["id"])
            else:
                upload = service.open_upload()
                upload.write(data)
                uploaded = service.finish_upload(tenant, upload, f"eval-{journal.run_id[:12]}.jsonl", "batch")
                job = service.create_batch(
                    tenant,
                    {
                        "input_file_id": uploaded.file_id,
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                        "metadata": {"thrifty_eval_run": journal.run_id, "model": system},
                    },
                    tags,
                    None,
                )
                batch_id = job.job_id
            _note(notes_path, system, batch_id)
        while True:
            job = service.job(tenant, batch_id)
            if job.status in ("completed", *_DEAD):
                break
            await asyncio.sleep(poll_s)
        lines: list[dict[str, Any]] = []
        for suffix in ("output", "errors"):
            try:
                raw = b"".join(service.content(tenant, f"file-{batch_id}-{suffix}"))
            except NotFound:
                continue
            lines += [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        answered = {line["custom_id"]: line for line in lines if line.get("custom_id") in by_custom}
        costs = _costs(
            gateway,
            [str(line["response"]["request_id"]) for line in answered.values() if line.get("response")],
        )
        for cid, item in by_custom.items():
            line = answered.get(cid)
            record: dict[str, Any] = {
                "model": system,
                "id": item.id,
                "output": None,
                "passed": False,
                "via": "batch",
            }
            response = (line or {}).get("response")
            if response is None or response.get("status_code") != 200:
                if job.status != "completed" and line is None:
                    continue  # never answered: the next run sends it again
                error = (line or {}).get("error") or (response or {}).get("body") or {"message": "no answer"}
                record.update(
                    error=f"batch: {error.get('message', error)}", cost_usd=None, judge_cost_usd=None
                )
                journal.add(record)
                on_done()
                continue
            body = response["body"]
            choices = body.get("choices") or [{}]
            output = str((choices[0].get("message") or {}).get("content") or "")
            request_id = str(response["request_id"])
            record.update(
                output=output,
                cost_usd=costs.get(request_id),
                request_id=request_id,
                answered_by=system,
                judge_cost_usd=None,
                error=None,
            )
            scored = await score_record(gateway, journal, system, item, tenant, record, output)
            if scored is not None:
                journal.add(scored)
            on_done()


__all__ = ["run_eval_batch"]
