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
        3,
        # The semantic cache's entries, shared by every replica (SQLite's migration 6). Debian's
        # PostgreSQL has no pgvector, and lookups stay in each replica's in-process index anyway:
        # the vector is float32 bytes, and a replica's index follows inserts by LISTEN/NOTIFY
        # (created_at is the catch-up mark after a lost connection).
        """
        CREATE TABLE semantic_cache (
            entry_id BIGSERIAL PRIMARY KEY,
            partition TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            "user" TEXT,
            prompt_version TEXT,
            corpus_version TEXT,
            model TEXT NOT NULL,
            system_hash TEXT NOT NULL,
            query TEXT NOT NULL,
            normalised_query TEXT NOT NULL,
            embedding_model TEXT NOT NULL,
            embedding BYTEA NOT NULL,
            answer_id TEXT NOT NULL,
            response TEXT NOT NULL,
            evidence TEXT,
            safety_policy_version TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX semantic_cache_scope ON semantic_cache (tenant_id, route);
        CREATE INDEX semantic_cache_expiry ON semantic_cache (expires_at);
        CREATE INDEX semantic_cache_created ON semantic_cache (created_at);
        """,
    ),
    (
        4,
        # Batch offload (SQLite's migrations 11 and 18): uploaded files (their bytes in chunks, so
        # any replica can validate a job), jobs, their items (the queue is the items in state
        # 'queued') and the provider batches they went in, each driven under a lease.
        """
        CREATE TABLE batch_files (
            file_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            lines INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX batch_files_sha ON batch_files (tenant_id, sha256);
        CREATE TABLE batch_file_chunks (
            file_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (file_id, seq)
        );
        CREATE TABLE batch_jobs (
            job_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            input_file_id TEXT,
            endpoint TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            metadata TEXT,
            tags TEXT NOT NULL,
            errors TEXT,
            webhook_url TEXT,
            idempotency_key TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            in_progress_at DOUBLE PRECISION,
            finalizing_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            expired_at DOUBLE PRECISION,
            cancelling_at DOUBLE PRECISION,
            cancelled_at DOUBLE PRECISION,
            delivered_at DOUBLE PRECISION,
            delivery_error TEXT,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION
        );
        CREATE INDEX batch_jobs_status ON batch_jobs (status);
        CREATE UNIQUE INDEX batch_jobs_idempotency ON batch_jobs (tenant_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE TABLE batch_items (
            request_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            line_no INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            state TEXT NOT NULL,
            queue TEXT NOT NULL,
            model TEXT,
            route TEXT,
            provider TEXT,
            body TEXT,
            reserve_usd TEXT,
            reserve_tokens INTEGER NOT NULL DEFAULT 0,
            flush_at DOUBLE PRECISION NOT NULL,
            flush_size INTEGER NOT NULL,
            upstream_id TEXT,
            status_code INTEGER,
            response TEXT,
            error TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION
        );
        CREATE INDEX batch_items_job ON batch_items (job_id, line_no, request_id);
        CREATE INDEX batch_items_queued ON batch_items (provider, model, queue, created_at, line_no)
            WHERE state = 'queued';
        CREATE INDEX batch_items_open ON batch_items (state) WHERE state IN ('queued', 'submitted');
        CREATE INDEX batch_items_upstream ON batch_items (upstream_id, request_id);
        CREATE TABLE batch_upstream (
            upstream_id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            remote_id TEXT,
            state TEXT NOT NULL,
            items INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            submitted_at DOUBLE PRECISION,
            next_poll_at DOUBLE PRECISION NOT NULL,
            collected_at DOUBLE PRECISION,
            remote_status TEXT,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            adopted INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX batch_upstream_state ON batch_upstream (state)
        """,
    ),
    (
        5,
        # The dashboard's rollups (stores/postgres_reporting.py), folded behind a watermark as on
        # SQLite. PostgreSQL has no rowid that grows in commit order, so every ledger row carries the
        # id of the transaction that wrote it (`txid`, filled in by its default: writers never name
        # it). A fold takes the rows with folded_xid <= txid < the oldest transaction still running
        # (all of them committed or gone for good), then moves the watermark to that xmin; readers
        # add the rows with txid >= folded_xid from the ledger itself, in the same snapshot. Money is
        # NUMERIC, summed exactly by PostgreSQL. NULLS NOT DISTINCT: an unset dimension is one key.
        """
        ALTER TABLE ledger ADD COLUMN txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
        CREATE INDEX ledger_txid ON ledger (txid);
        CREATE TABLE ledger_rollup (
            grain TEXT NOT NULL,
            bucket BIGINT NOT NULL,
            tenant_id TEXT NOT NULL,
            feature TEXT,
            route TEXT,
            prompt_version TEXT,
            model TEXT,
            "user" TEXT,
            requests BIGINT NOT NULL,
            ok BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            cached_input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            budget_rejections BIGINT NOT NULL,
            exact_hits BIGINT NOT NULL,
            semantic_hits BIGINT NOT NULL,
            escalated BIGINT NOT NULL,
            retries BIGINT NOT NULL,
            unpriced BIGINT NOT NULL,
            estimated BIGINT NOT NULL,
            dedup_hits BIGINT NOT NULL,
            context_tokens_saved BIGINT NOT NULL,
            output_budgeted BIGINT NOT NULL,
            length_cutoffs BIGINT NOT NULL,
            batch_requests BIGINT NOT NULL,
            cost_usd NUMERIC NOT NULL,
            error_cost_usd NUMERIC NOT NULL,
            retry_cost_usd NUMERIC NOT NULL,
            saved_usd NUMERIC NOT NULL,
            exact_saved_usd NUMERIC NOT NULL,
            semantic_saved_usd NUMERIC NOT NULL,
            batch_cost_usd NUMERIC NOT NULL,
            batch_saved_usd NUMERIC NOT NULL,
            CONSTRAINT ledger_rollup_key UNIQUE NULLS NOT DISTINCT
                (grain, bucket, tenant_id, feature, route, prompt_version, model, "user")
        );
        CREATE TABLE ledger_rollup_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            folded_xid BIGINT NOT NULL
        );
        INSERT INTO ledger_rollup_state VALUES (1, 0)
        """,
    ),
    (
        6,
        # Recordings of routes with `record` (SQLite's migration 13): shared by the replicas, read per tenant.
        """
        CREATE TABLE recordings (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            feature TEXT,
            prompt_version TEXT,
            "user" TEXT,
            idempotency_key TEXT,
            task TEXT,
            model TEXT,
            cache TEXT NOT NULL,
            request TEXT NOT NULL,
            response TEXT NOT NULL
        );
        CREATE INDEX recordings_tenant_route_ts ON recordings (tenant_id, route, ts);
        """,
    ),
    (
        7,
        # Experiments: the variant a request was assigned (SQLite's migration 14). Feedback and
        # experiment state: migration 15.
        "ALTER TABLE ledger ADD COLUMN variant TEXT",
    ),
    (
        8,
        # The semantic cache's per-partition verification state (SQLite's migration 16), for a
        # PostgreSQL-backed semantic cache whose replicas share what verification has learned.
        """
        CREATE TABLE semantic_partition_state (
            partition TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            state JSONB NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX semantic_partition_state_scope ON semantic_partition_state (tenant_id, route)
        """,
    ),
    (
        9,
        # Context summaries of conversation prefixes (SQLite's migration 10), shared by the
        # replicas: a chat's summary made on one is reused on the others.
        """
        CREATE TABLE context_summaries (
            tenant_id TEXT NOT NULL,
            prefix_key TEXT NOT NULL,
            covered_messages INTEGER NOT NULL,
            summary TEXT NOT NULL,
            summary_tokens INTEGER NOT NULL,
            model TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (tenant_id, prefix_key)
        )
        """,
    ),
    (
        11,
        # Running totals per user (SQLite's migration 20, stores/postgres_reporting.py): a ranking of
        # users over any window reads two rows per user. A key is (tenant, user) or (NULL, user) for
        # every tenant, `scope` its JSON text (an equality join, unlike IS NOT DISTINCT FROM);
        # `ledger_user_cum` holds each key's requests, successes and cost up to the end of each hour
        # it had requests. Folded with the rollups in the fold's statement; built here once from the
        # hourly user rollups. `ledger_rollup_by_user`: the ranking's winners read their amounts'
        # scale from their own user rows.
        """
        CREATE TABLE ledger_user_key (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            scope TEXT NOT NULL UNIQUE,
            tenant_id TEXT,
            "user" TEXT
        );
        CREATE INDEX ledger_user_key_tenant ON ledger_user_key (tenant_id);
        CREATE TABLE ledger_user_cum (
            key BIGINT NOT NULL,
            bucket BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            ok BIGINT NOT NULL,
            cost_usd NUMERIC NOT NULL,
            PRIMARY KEY (key, bucket)
        );
        CREATE INDEX ledger_rollup_by_user ON ledger_rollup (grain, "user", bucket);
        INSERT INTO ledger_user_key (scope, tenant_id, "user")
        SELECT json_build_array(tenant_id, "user")::text, tenant_id, "user" FROM (
            SELECT tenant_id, "user" FROM ledger_rollup WHERE grain = 'hu'
            UNION SELECT NULL, "user" FROM ledger_rollup WHERE grain = 'hu'
        ) AS k;
        INSERT INTO ledger_user_cum
        SELECT k.id, r.bucket, SUM(r.requests) OVER w, SUM(r.ok) OVER w, SUM(r.cost_usd) OVER w
        FROM (
            SELECT tenant_id, "user", bucket, requests, ok, cost_usd FROM ledger_rollup WHERE grain = 'hu'
            UNION ALL
            SELECT NULL, "user", bucket, SUM(requests), SUM(ok), SUM(cost_usd)
            FROM ledger_rollup WHERE grain = 'hu' GROUP BY "user", bucket
        ) AS r
        JOIN ledger_user_key AS k ON k.scope = json_build_array(r.tenant_id, r."user")::text
        WINDOW w AS (PARTITION BY k.id ORDER BY r.bucket)
        """,
    ),
    (
        12,
        # Recordings' outcome (ok | deferred | error) and a failure's error (SQLite's migration 21).
        """
        ALTER TABLE recordings ADD COLUMN outcome TEXT NOT NULL DEFAULT 'ok';
        ALTER TABLE recordings ADD COLUMN error TEXT
        """,
    ),
    (
        15,
        # Experiments shared by the replicas (SQLite's migration 14, experiments/postgres_store.py):
        # feedback on requests (one row per request: a repeat replaces, never adds), each route's
        # arms as the last promote/stop/release left them, the log of those actions, and release
        # plans. The JSON columns are TEXT as on SQLite: the arms' order is kept as written.
        """
        CREATE INDEX ledger_route_variant ON ledger (route, ts) WHERE variant IS NOT NULL;
        CREATE TABLE feedback (
            request_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            route TEXT,
            variant TEXT,
            score DOUBLE PRECISION,
            label TEXT,
            correct INTEGER
        );
        CREATE TABLE experiment_state (
            route TEXT PRIMARY KEY,
            arms TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE experiment_actions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            route TEXT NOT NULL,
            action TEXT NOT NULL,
            variant TEXT,
            reason TEXT NOT NULL,
            details TEXT
        );
        CREATE INDEX experiment_actions_route ON experiment_actions (route, id);
        CREATE TABLE releases (
            route TEXT PRIMARY KEY,
            plan TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        16,
        # Semantic hits of routes that verify, for feedback on them from any replica and after a
        # restart (SQLite's migration 25): a hit's feedback is counted once, by the replica whose
        # UPDATE ... WHERE feedback = 0 claims the row.
        """
        CREATE TABLE semantic_hits (
            tenant_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            route TEXT NOT NULL,
            partition TEXT NOT NULL,
            score DOUBLE PRECISION,
            answer_id TEXT NOT NULL,
            served_at DOUBLE PRECISION NOT NULL,
            feedback INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant_id, request_id)
        );
        CREATE INDEX semantic_hits_served ON semantic_hits (served_at)
        """,
    ),
    (
        17,
        # SQLite's migration 26: purges by scope, respected by late cache writes.
        """
        CREATE TABLE cache_purges (
            cache TEXT NOT NULL,
            tenant_id TEXT,
            route TEXT,
            prompt_version TEXT,
            corpus_version TEXT,
            purged_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX cache_purges_at ON cache_purges (purged_at)
        """,
    ),
)

__all__ = ["POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS"]
