"""Context summaries on PostgreSQL (the SummaryStore port), shared by every replica.

Same keys as the SQLite store: (tenant, prefix key), the tenant also salted into the key, so a
chat's summary made through one replica is reused by the others and never read by another
tenant. A lookup is one indexed SELECT, a write one INSERT; either waits at most `timeout_s` for a
pooled connection, and a database that does not answer is a SummaryStoreError (the stage
summarises anew, or leaves the summary unstored), never a failed request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from thrifty.context.summaries import Summary, SummaryStoreError


class PostgresSummaryStore:
    def __init__(self, pool: Any, *, timeout_s: float = 1.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def find(self, tenant: str, keys: Sequence[str]) -> dict[str, Summary]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                cur = await conn.execute(
                    "SELECT prefix_key, covered_messages, summary, summary_tokens, model "
                    "FROM context_summaries WHERE tenant_id = %s AND prefix_key = ANY(%s)",
                    (tenant, list(keys)),
                )
                rows = await cur.fetchall()
        except (psycopg.Error, PoolTimeout, OSError) as err:
            raise SummaryStoreError(str(err)) from err
        return {key: Summary(key, covered, text, tokens, model) for key, covered, text, tokens, model in rows}

    async def put(self, tenant: str, summary: Summary) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                await conn.execute(
                    "INSERT INTO context_summaries (tenant_id, prefix_key, covered_messages, summary, "
                    "summary_tokens, model, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (tenant_id, prefix_key) DO UPDATE SET covered_messages = "
                    "EXCLUDED.covered_messages, summary = EXCLUDED.summary, summary_tokens = "
                    "EXCLUDED.summary_tokens, model = EXCLUDED.model, created_at = EXCLUDED.created_at",
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
        except (psycopg.Error, PoolTimeout, OSError) as err:
            raise SummaryStoreError(str(err)) from err


__all__ = ["PostgresSummaryStore"]
