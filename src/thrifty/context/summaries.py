"""Summaries of conversation prefixes: the store port, its SQLite implementation, and the call.

A summary is stored per tenant under the key of the prefix it covers (history.prefix_keys), so it
is made once and never read by another tenant: the tenant is part of the key's salt and of every
query. The summary call goes down the gateway's own call chain (retries, breakers, the summary
route's fallbacks) and is an Attempt with role `compaction`, priced like any other.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from thrifty.errors import ProviderProtocolError
from thrifty.pipeline import Completion, Handler, RequestContext
from thrifty.types import ModelTarget


@dataclass(frozen=True, slots=True)
class Summary:
    key: str
    covered_messages: int
    text: str
    tokens: int
    model: str


class SummaryStore(Protocol):
    """Summaries by (tenant, prefix key). A store that cannot answer raises SummaryStoreError; the
    stage then summarises anew (a lookup) or keeps the summary unstored (a write)."""

    async def find(self, tenant: str, keys: Sequence[str]) -> dict[str, Summary]: ...

    async def put(self, tenant: str, summary: Summary) -> None: ...


class SummaryStoreError(Exception):
    """The summary store did not answer (a busy SQLite file, an unreachable PostgreSQL)."""


class SqliteSummaryStore:
    """Reads and writes on the event loop (no await inside): one indexed lookup and one small
    insert per summary. Used alone, or per replica when storage is not PostgreSQL."""

    _CHUNK = 400  # SQLite's limit on parameters is far above; keeps statements small

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def find(self, tenant: str, keys: Sequence[str]) -> dict[str, Summary]:
        try:
            return self._find(tenant, keys)
        except sqlite3.Error as err:
            raise SummaryStoreError(str(err)) from err

    def _find(self, tenant: str, keys: Sequence[str]) -> dict[str, Summary]:
        found: dict[str, Summary] = {}
        for i in range(0, len(keys), self._CHUNK):
            chunk = list(keys[i : i + self._CHUNK])
            rows = self._conn.execute(
                "SELECT prefix_key, covered_messages, summary, summary_tokens, model FROM context_summaries "
                f"WHERE tenant_id = ? AND prefix_key IN ({', '.join('?' * len(chunk))})",
                (tenant, *chunk),
            )
            for key, covered, text, tokens, model in rows:
                found[key] = Summary(key, covered, text, tokens, model)
        return found

    async def put(self, tenant: str, summary: Summary) -> None:
        try:
            self._put(tenant, summary)
        except sqlite3.Error as err:
            raise SummaryStoreError(str(err)) from err

    def _put(self, tenant: str, summary: Summary) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO context_summaries (tenant_id, prefix_key, covered_messages, summary, "
            "summary_tokens, model, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                tenant,
                summary.key,
                summary.covered_messages,
                summary.text,
                summary.tokens,
                summary.model,
                time.time(),
            ),
        )


INSTRUCTIONS = (
    "You condense the earlier part of a conversation for an assistant that will continue it. Keep what "
    "the assistant needs later: facts, names, numbers, code identifiers, decisions, what the user asked "
    "for and prefers, and open questions. Drop greetings and repetition. Write plain prose in the "
    "conversation's language, at most {tokens} tokens, and nothing but the summary."
)


def summary_request(previous: str | None, transcript: str, max_tokens: int) -> dict[str, Any]:
    task = (
        f"Summary so far:\n{previous}\n\nMessages since:\n{transcript}\n\nWrite the updated summary."
        if previous
        else f"Messages:\n{transcript}\n\nWrite the summary."
    )
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTIONS.format(tokens=max_tokens)},
            {"role": "user", "content": task},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def transcript(messages: Sequence[dict[str, Any]]) -> str:
    lines = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        text = str(content or "")
        for call in message.get("tool_calls") or ():
            fn = call.get("function") or {}
            text += f" [called {fn.get('name')}({fn.get('arguments')})]"
        lines.append(f"{role}: {text.strip()}")
    return "\n".join(lines)


class Summariser:
    """Makes one summary call on behalf of a request, down the gateway's call chain."""

    def __init__(self, call: Handler, targets: dict[str, ModelTarget]) -> None:
        self._call = call
        self._targets = targets

    async def __call__(self, ctx: RequestContext, route: str, model: str, body: dict[str, Any]) -> str:
        saved = (ctx.body, ctx.stream, ctx.target, ctx.route, ctx.prompt_tokens, ctx.use_fallbacks)
        ctx.body, ctx.stream, ctx.target, ctx.route = (
            {**body, "model": model},
            False,
            self._targets[model],
            route,
        )
        ctx.prompt_tokens, ctx.use_fallbacks = None, True
        first = len(ctx.attempts)
        try:
            result = await self._call(ctx)
        finally:
            ctx.body, ctx.stream, ctx.target, ctx.route, ctx.prompt_tokens, ctx.use_fallbacks = saved
            for j in range(first, len(ctx.attempts)):
                ctx.attempts[j] = dataclasses.replace(ctx.attempts[j], role="compaction")
        assert isinstance(result, Completion)
        choices = result.body.get("choices") or []
        text = (choices[0].get("message") or {}).get("content") if choices else None
        if not isinstance(text, str) or not text.strip():
            raise ProviderProtocolError(f"the summary route's model {model!r} returned no text")
        return text.strip()
