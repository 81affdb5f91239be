"""Demo phase: a nightly eval run as one batch job, next to the same prompts in real time.

The recorded prompts go to gpt-4o-mini twice: once as an OpenAI batch through thrifty (the
openai SDK's files + batches calls; the replay provider answers the batch offline) and once as
ordinary chat calls. The ledger says what each cost; the batch is priced at the batch rate.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

MODEL = "gpt-4o-mini"
FEATURE_BATCH, FEATURE_REALTIME = "nightly-eval-batch", "nightly-eval-realtime"
_COST = "SELECT cost_usd FROM ledger WHERE feature = ? AND status = 'ok'"


@dataclass(frozen=True, slots=True)
class NightlyStats:
    prompts: int
    batch_status: str
    batch_answered: int
    realtime_answered: int
    seconds: float

    @property
    def sent(self) -> int:
        return 2 * self.prompts


def run_nightly(base_url: str, key: str, prompts: list[str], timeout_s: float = 120.0) -> NightlyStats:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    started = time.perf_counter()
    lines = b"".join(
        orjson.dumps(
            {
                "custom_id": f"eval-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": text}]},
            }
        )
        + b"\n"
        for i, text in enumerate(prompts)
    )
    uploaded = client.files.create(file=("nightly-eval.jsonl", io.BytesIO(lines)), purpose="batch")
    batch: Any = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"feature": FEATURE_BATCH},
    )
    realtime = 0
    for text in prompts:  # meanwhile, the same prompts as real-time calls
        try:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                extra_headers={"x-thrifty-feature": FEATURE_REALTIME},
            )
            realtime += 1
        except openai.APIStatusError:
            pass
    deadline = time.monotonic() + timeout_s
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    answered = batch.request_counts.completed if batch.request_counts else 0
    return NightlyStats(len(prompts), batch.status, answered, realtime, time.perf_counter() - started)


def summary(stats: NightlyStats, conn: Any) -> str:
    n_batch, batch_usd = _answered(conn, FEATURE_BATCH)
    n_rt, rt_usd = _answered(conn, FEATURE_REALTIME)
    saving = f", saving {1 - batch_usd / rt_usd:.1%}" if rt_usd and n_batch == n_rt else ""
    return (
        f"nightly eval on {stats.prompts} recorded prompts ({MODEL}): as one batch job "
        f"({stats.batch_status}, {n_batch} answered) ${batch_usd:.6f} at batch prices; "
        f"the same prompts in real time ({n_rt} answered) ${rt_usd:.6f}{saving}"
    )


def _answered(conn: Any, feature: str) -> tuple[int, Decimal]:
    """Answered requests of a feature and their exact cost (SQLite's sum() would be a float)."""
    rows = conn.execute(_COST, (feature,)).fetchall()
    return len(rows), sum((Decimal(c) for (c,) in rows if c is not None), Decimal(0))
