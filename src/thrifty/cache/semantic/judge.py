"""A cheap judge route as the answer-equivalence check of a verification (``compare: judge``).

When answers are generated anew each time, neither their text nor a JSON field says whether the
cached answer and the fresh one are the same answer. A verification then asks another route (a
cheap model) the question with both answers and reads a yes/no from its reply. The judge call is a
request of its own: through budgets and rate limits like the shadow call, its own ledger entry
``<request_id>.judge`` attributed like the hit, with attempts of role ``judge`` and their cost.
A reply that is neither yes nor no is no verdict (nothing is counted), never a guess.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from thrifty.cache.semantic.compare import answer_text
from thrifty.pipeline import RequestContext
from thrifty.types import ModelTarget

JUDGE_SYSTEM = (
    "You check a cache. Given a question and two answers to it, reply with one word: yes if the "
    "two answers say the same thing to someone who asked the question (wording may differ), no if "
    "they do not."
)
# Enough for "yes"/"no" and a stray word; the budget guard reserves this many output tokens.
JUDGE_MAX_TOKENS = 5
_FIRST_WORD = re.compile(r"[a-z]+")


def judge_body(
    route: str, question: str, cached: Mapping[str, Any], fresh: Mapping[str, Any]
) -> dict[str, Any]:
    prompt = (
        f"Question:\n{question}\n\nAnswer A:\n{answer_text(cached)}\n\nAnswer B:\n{answer_text(fresh)}\n\n"
        "Do A and B give the same answer? Reply yes or no."
    )
    return {
        "model": f"route:{route}",
        "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": JUDGE_MAX_TOKENS,
    }


def parse_verdict(response: Mapping[str, Any]) -> bool | None:
    """True for yes, False for no (the reply's first word, any case and punctuation), else None."""
    match = _FIRST_WORD.search(answer_text(response).lower())
    word = match.group(0) if match else ""
    return True if word == "yes" else False if word == "no" else None


def judge_context(
    shadow: RequestContext, route: str, target: ModelTarget, question: str, body: dict[str, Any]
) -> RequestContext:
    """The judge's request: the hit's tenant, user and tags, its own id, the judge route's model."""
    base = shadow.request_id.removesuffix(".verify")
    return RequestContext(
        request_id=f"{base}.judge",
        ts=time.time(),
        started=time.perf_counter(),
        tags=replace(shadow.tags, idempotency_key=None, evidence=()),
        body=body,
        body_bytes=len(question),
        requested_model=body["model"],
        stream=False,
        client_wants_usage=False,
        route=route,
        target=target,
    )


__all__ = ["JUDGE_MAX_TOKENS", "JUDGE_SYSTEM", "judge_body", "judge_context", "parse_verdict"]
