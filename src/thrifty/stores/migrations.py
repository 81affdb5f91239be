"""Versioned, append-only schema migrations for both backends, in one place.

SQLite's list lives beside its opener (`sqlite_db.MIGRATIONS`, re-exported here); PostgreSQL's is
below. A released migration is never edited; a change is a new entry. Each backend records what
has run in `schema_migrations`, so any older database (or an empty one) upgrades, and replicas
starting together migrate once (SQLite: the write lock; PostgreSQL: an advisory lock).
"""

from __future__ import annotations

from thrifty.stores.sqlite_db import MIGRATIONS as SQLITE_MIGRATIONS

POSTGRES_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        # The same tables as SQLite's, in PostgreSQL's types: money is NUMERIC (exact), attempts
        # JSONB. The ledger is append-only: nothing here is ever UPDATEd per request.
        """
        CREATE TABLE ledger (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            tenant_id TEXT NOT NULL,
            "user" TEXT,
            feature TEXT,
            route TEXT,
            prompt_version TEXT,
            model TEXT,
            provider TEXT,
            attempts JSONB NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            usage_estimated INTEGER NOT NULL,
            cost_usd NUMERIC,
            saved_usd NUMERIC,
            cache TEXT NOT NULL,
            escalated INTEGER NOT NULL,
            retries INTEGER NOT NULL,
            retry_cost_usd NUMERIC,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            error TEXT,
            latency_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            idempotency_key TEXT,
            batch INTEGER NOT NULL,
            stream INTEGER NOT NULL
        );
        CREATE INDEX ledger_ts ON ledger (ts);
        CREATE TABLE virtual_keys (
            key_hash TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            label TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        );
        CREATE TABLE alerts (
            alert_key TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            scope TEXT NOT NULL,
            message TEXT NOT NULL,
            payload TEXT NOT NULL,
            delivered_at DOUBLE PRECISION,
            delivery_error TEXT
        );
        CREATE INDEX alerts_ts ON alerts (ts);
        CREATE TABLE exact_cache (
            cache_key TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            prompt_version TEXT,
            corpus_version TEXT,
            model TEXT NOT NULL,
            response TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX exact_cache_scope ON exact_cache (tenant_id, route);
        """,
    ),
    (
        2,
        # Context budgets: tokens per section before and after, per request (SQLite's migration 9).
        # Summaries of conversation prefixes stay in each replica's local SQLite file.
        "ALTER TABLE ledger ADD COLUMN context JSONB",
    ),
    (
        7,
        # Experiments: the variant a request was assigned (SQLite's migration 14). Feedback and
        # experiment state are SQLite-only so far (the gateway says so at start).
        "ALTER TABLE ledger ADD COLUMN variant TEXT",
    ),
)

__all__ = ["POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS"]
