"""Opening the SQLite file and bringing its schema up to date.

Migrations are append-only: a released migration is never edited, a change is a new entry.
`schema_migrations` records which have run, so any older database (or an empty file) upgrades.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path

from thrifty.stores.sqlite_money import register_functions

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE ledger (
            request_id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            tenant_id TEXT NOT NULL,
            user TEXT,
            feature TEXT,
            route TEXT,
            prompt_version TEXT,
            model TEXT,
            provider TEXT,
            attempts TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            usage_estimated INTEGER NOT NULL,
            cost_usd TEXT,
            saved_usd TEXT,
            cache TEXT NOT NULL,
            escalated INTEGER NOT NULL,
            retries INTEGER NOT NULL,
            retry_cost_usd TEXT,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            error TEXT,
            latency_ms REAL NOT NULL,
            ttft_ms REAL,
            idempotency_key TEXT,
            batch INTEGER NOT NULL,
            stream INTEGER NOT NULL
        );
        CREATE INDEX ledger_ts ON ledger (ts);
        CREATE INDEX ledger_tenant_ts ON ledger (tenant_id, ts);
        """,
    ),
    (
        2,
        """
        CREATE TABLE virtual_keys (
            key_hash TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            label TEXT,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        """,
    ),
    (
        3,
        # Per-tenant reads go to counters, not ledger scans; this index only slowed every insert.
        "DROP INDEX IF EXISTS ledger_tenant_ts",
    ),
    (
        4,
        # One row per alert and window: the primary key is what makes an alert fire once, also
        # across restarts and across processes sharing the database.
        """
        CREATE TABLE alerts (
            alert_key TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            scope TEXT NOT NULL,
            message TEXT NOT NULL,
            payload TEXT NOT NULL,
            delivered_at REAL,
            delivery_error TEXT
        );
        CREATE INDEX alerts_ts ON alerts (ts);
        """,
    ),
    (
        5,
        """
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
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX exact_cache_scope ON exact_cache (tenant_id, route);
        """,
    ),
    (
        6,
        # The semantic cache's entries, with the embedding, so a restart rebuilds the index.
        """
        CREATE TABLE semantic_cache (
            entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
            partition TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            user TEXT,
            prompt_version TEXT,
            corpus_version TEXT,
            model TEXT NOT NULL,
            system_hash TEXT NOT NULL,
            query TEXT NOT NULL,
            normalised_query TEXT NOT NULL,
            embedding_model TEXT NOT NULL,
            embedding BLOB NOT NULL,
            answer_id TEXT NOT NULL,
            response TEXT NOT NULL,
            evidence TEXT,
            safety_policy_version TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX semantic_cache_route ON semantic_cache (route, entry_id);
        CREATE INDEX semantic_cache_expiry ON semantic_cache (expires_at);
        """,
    ),
    (
        8,
        # Idempotency records: a finished result answers repeats of its key across restarts; a
        # running row (with a lease in expires_at) keeps a key in flight at a crash from running twice.
        """
        CREATE TABLE idempotency (
            tenant_id TEXT NOT NULL,
            idem_key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            state TEXT NOT NULL,
            owner TEXT NOT NULL,
            response TEXT,
            cost_usd TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, idem_key)
        );
        CREATE INDEX idempotency_expiry ON idempotency (state, expires_at);
        """,
    ),
    (
        9,
        # Context budgets: tokens per section before and after, per request (JSON); and the
        # summaries of conversation prefixes, made once per tenant and extended as a chat grows.
        """
        ALTER TABLE ledger ADD COLUMN context TEXT;
        CREATE TABLE context_summaries (
            tenant_id TEXT NOT NULL,
            prefix_key TEXT NOT NULL,
            covered_messages INTEGER NOT NULL,
            summary TEXT NOT NULL,
            summary_tokens INTEGER NOT NULL,
            model TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, prefix_key)
        );
        """,
    ),
    (
        11,
        # Batch offload (thrifty/batch): uploaded files, jobs (an OpenAI batch or one deferred request),
        # their items (the queue is the items in state 'queued') and the provider batches they went in.
        # An item's request_id is its ledger row's id and the provider-side custom_id.
        """
        CREATE TABLE batch_files (
            file_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            lines INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX batch_files_sha ON batch_files (tenant_id, sha256);
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
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            in_progress_at REAL,
            finalizing_at REAL,
            completed_at REAL,
            failed_at REAL,
            expired_at REAL,
            cancelling_at REAL,
            cancelled_at REAL,
            delivered_at REAL,
            delivery_error TEXT,
            lease_owner TEXT,
            lease_until REAL
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
            flush_at REAL NOT NULL,
            flush_size INTEGER NOT NULL,
            upstream_id TEXT,
            status_code INTEGER,
            response TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE INDEX batch_items_job ON batch_items (job_id, line_no);
        CREATE INDEX batch_items_state ON batch_items (state, provider, model, queue);
        CREATE INDEX batch_items_upstream ON batch_items (upstream_id);
        CREATE TABLE batch_upstream (
            upstream_id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            remote_id TEXT,
            state TEXT NOT NULL,
            items INTEGER NOT NULL,
            created_at REAL NOT NULL,
            submitted_at REAL,
            next_poll_at REAL NOT NULL,
            collected_at REAL,
            remote_status TEXT
        );
        CREATE INDEX batch_upstream_state ON batch_upstream (state)
        """,
    ),
    (
        12,
        # Hourly and daily rollups of the ledger, kept up to date by the ledger writer in the same
        # transaction as its batch (stores/rollups.py), so the dashboard never scans the ledger.
        # grain: 'h'/'d' by the attribution dimensions, 'hu'/'du' by tenant and user (users would
        # multiply the main grain's rows). `dims` is json_array() of the grain's dimensions: NULL
        # never equals NULL in a key, the JSON text does. Money is exact and summed by SQLite
        # itself: whole pico-USD (`_pico`), the exact rest below 1e-12 as decimal text (`_rest`,
        # almost always NULL) and the smallest decimal exponent summed (`_exp`, so the sum reads
        # as the ledger's Decimal sum does). Existing ledger rows are rolled up here, once.
        """
        CREATE TABLE ledger_rollup (
            grain TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            dims TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            feature TEXT,
            route TEXT,
            prompt_version TEXT,
            model TEXT,
            user TEXT,
            requests INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            budget_rejections INTEGER NOT NULL,
            exact_hits INTEGER NOT NULL,
            semantic_hits INTEGER NOT NULL,
            escalated INTEGER NOT NULL,
            retries INTEGER NOT NULL,
            unpriced INTEGER NOT NULL,
            estimated INTEGER NOT NULL,
            dedup_hits INTEGER NOT NULL,
            context_tokens_saved INTEGER NOT NULL,
            output_budgeted INTEGER NOT NULL,
            length_cutoffs INTEGER NOT NULL,
            cost_usd_pico INTEGER NOT NULL,
            cost_usd_exp INTEGER NOT NULL,
            cost_usd_rest TEXT,
            error_cost_usd_pico INTEGER NOT NULL,
            error_cost_usd_exp INTEGER NOT NULL,
            error_cost_usd_rest TEXT,
            retry_cost_usd_pico INTEGER NOT NULL,
            retry_cost_usd_exp INTEGER NOT NULL,
            retry_cost_usd_rest TEXT,
            saved_usd_pico INTEGER NOT NULL,
            saved_usd_exp INTEGER NOT NULL,
            saved_usd_rest TEXT,
            exact_saved_usd_pico INTEGER NOT NULL,
            exact_saved_usd_exp INTEGER NOT NULL,
            exact_saved_usd_rest TEXT,
            semantic_saved_usd_pico INTEGER NOT NULL,
            semantic_saved_usd_exp INTEGER NOT NULL,
            semantic_saved_usd_rest TEXT,
            PRIMARY KEY (grain, bucket, dims)
        ) WITHOUT ROWID;
        INSERT INTO ledger_rollup
        SELECT grain, bucket, dims, tenant_id, feature, route, prompt_version, model, user,
            requests, ok, input_tokens, cached_input_tokens, output_tokens, budget_rejections, exact_hits,
            semantic_hits, escalated, retries, unpriced, estimated, dedup_hits, context_tokens_saved,
            output_budgeted, length_cutoffs,
            thrifty_pico(cost_usd), thrifty_exp(cost_usd), thrifty_rest(cost_usd),
            thrifty_pico(error_cost_usd), thrifty_exp(error_cost_usd), thrifty_rest(error_cost_usd),
            thrifty_pico(retry_cost_usd), thrifty_exp(retry_cost_usd), thrifty_rest(retry_cost_usd),
            thrifty_pico(saved_usd), thrifty_exp(saved_usd), thrifty_rest(saved_usd),
            thrifty_pico(exact_saved_usd), thrifty_exp(exact_saved_usd), thrifty_rest(exact_saved_usd),
            thrifty_pico(semantic_saved_usd), thrifty_exp(semantic_saved_usd),
            thrifty_rest(semantic_saved_usd)
        FROM (
            SELECT g.grain AS grain, CAST(l.ts / g.width AS INTEGER) * g.width AS bucket,
                CASE WHEN g.by_user THEN json_array(l.tenant_id, l.user)
                     ELSE json_array(l.tenant_id, l.feature, l.route, l.prompt_version, l.model) END AS dims,
                l.tenant_id AS tenant_id,
                CASE WHEN g.by_user THEN NULL ELSE l.feature END AS feature,
                CASE WHEN g.by_user THEN NULL ELSE l.route END AS route,
                CASE WHEN g.by_user THEN NULL ELSE l.prompt_version END AS prompt_version,
                CASE WHEN g.by_user THEN NULL ELSE l.model END AS model,
                CASE WHEN g.by_user THEN l.user ELSE NULL END AS user,
                COUNT(*) AS requests, SUM(l.status = 'ok') AS ok, SUM(l.input_tokens) AS input_tokens,
                SUM(l.cached_input_tokens) AS cached_input_tokens, SUM(l.output_tokens) AS output_tokens,
                SUM(l.http_status = 429) AS budget_rejections, SUM(l.cache = 'exact') AS exact_hits,
                SUM(l.cache = 'semantic') AS semantic_hits, SUM(l.escalated) AS escalated,
                SUM(l.retries) AS retries, SUM(l.cost_usd IS NULL) AS unpriced,
                SUM(l.usage_estimated) AS estimated, SUM(l.cache = 'dedup') AS dedup_hits,
                SUM(COALESCE(json_extract(l.context, '$.saved'), 0)) AS context_tokens_saved,
                SUM(json_extract(l.context, '$.finish_reason') IS NOT NULL) AS output_budgeted,
                SUM(COALESCE(json_extract(l.context, '$.finish_reason') = 'length', 0)) AS length_cutoffs,
                thrifty_dec_sum(l.cost_usd) AS cost_usd,
                thrifty_dec_sum(CASE WHEN l.status != 'ok' THEN l.cost_usd END) AS error_cost_usd,
                thrifty_dec_sum(l.retry_cost_usd) AS retry_cost_usd,
                thrifty_dec_sum(l.saved_usd) AS saved_usd,
                thrifty_dec_sum(CASE WHEN l.cache = 'exact' THEN l.saved_usd END) AS exact_saved_usd,
                thrifty_dec_sum(CASE WHEN l.cache = 'semantic' THEN l.saved_usd END) AS semantic_saved_usd
            FROM ledger AS l CROSS JOIN (
                SELECT 'h' AS grain, 3600 AS width, 0 AS by_user UNION ALL SELECT 'd', 86400, 0
                UNION ALL SELECT 'hu', 3600, 1 UNION ALL SELECT 'du', 86400, 1
            ) AS g
            GROUP BY 1, 2, 3
        )
        """,
    ),
    (
        13,
        # Recorded requests and answers of routes with `record` (redacted before they get here), for
        # `thrifty simulate`; read per tenant, never across tenants.
        """
        CREATE TABLE recordings (
            request_id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            feature TEXT,
            prompt_version TEXT,
            user TEXT,
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
        14,
        # Experiments: the variant (arm) a request was assigned, feedback on requests (one row per
        # request: a repeat replaces, never adds), each route's current arms and weights as the
        # last promote/stop/release set them, the log of those actions, and release plans.
        """
        ALTER TABLE ledger ADD COLUMN variant TEXT;
        CREATE INDEX ledger_route_variant ON ledger (route, ts) WHERE variant IS NOT NULL;
        CREATE TABLE feedback (
            request_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            ts REAL NOT NULL,
            route TEXT,
            variant TEXT,
            score REAL,
            label TEXT,
            correct INTEGER
        );
        CREATE TABLE experiment_state (
            route TEXT PRIMARY KEY,
            arms TEXT NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE experiment_actions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            route TEXT NOT NULL,
            action TEXT NOT NULL,
            variant TEXT,
            reason TEXT NOT NULL,
            details TEXT
        );
        CREATE TABLE releases (
            route TEXT PRIMARY KEY,
            plan TEXT NOT NULL,
            updated_at REAL NOT NULL
        );
        """,
    ),
    (
        16,
        # The semantic cache's per-partition verification state (cache/semantic/adaptive.py): score
        # bins of lookups and verified outcomes, counters for `thrifty cache stats`, as JSON; one row
        # per partition, rewritten in batches (never per request).
        """
        CREATE TABLE semantic_partition_state (
            partition TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            route TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX semantic_partition_state_scope ON semantic_partition_state (tenant_id, route)
        """,
    ),
    (
        17,
        # Rollups folded behind a watermark (stores/rollups.py `fold_pending`), no longer in the ledger
        # writer's transaction: every ledger row up to `folded_rowid` is in ledger_rollup, the rest
        # is read from the ledger itself. The rollups gain the batch measures (the report's batch
        # share, cost and real-time price), so they are emptied and the watermark starts at 0: the
        # first fold computes them again from the ledger (readers stay exact meanwhile).
        # `ledger_rollup_by_user`: user rankings read a few narrow columns in user order (no sort of
        # ~120,000 daily rows for 30 days of 4,000 active users), not the 50-column rows.
        """
        DELETE FROM ledger_rollup;
        ALTER TABLE ledger_rollup ADD COLUMN batch_requests INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE ledger_rollup ADD COLUMN batch_cost_usd_pico INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE ledger_rollup ADD COLUMN batch_cost_usd_exp INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE ledger_rollup ADD COLUMN batch_cost_usd_rest TEXT;
        ALTER TABLE ledger_rollup ADD COLUMN batch_saved_usd_pico INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE ledger_rollup ADD COLUMN batch_saved_usd_exp INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE ledger_rollup ADD COLUMN batch_saved_usd_rest TEXT;
        CREATE TABLE ledger_rollup_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            folded_rowid INTEGER NOT NULL
        );
        INSERT INTO ledger_rollup_state VALUES (1, 0);
        CREATE INDEX ledger_rollup_by_user ON ledger_rollup (
            grain, user, bucket, tenant_id, requests, ok, cost_usd_pico, cost_usd_exp, cost_usd_rest
        )
        """,
    ),
    (
        18,
        # Batch offload across processes sharing the store: a provider batch is driven (sent,
        # polled, collected, cancelled) by the one runner holding its lease; `adopted` marks one
        # found at the provider after a crash rather than sent by the process that stored it.
        # Webhook deliveries lease the job (its lease columns, free once validation is done).
        """
        ALTER TABLE batch_upstream ADD COLUMN lease_owner TEXT;
        ALTER TABLE batch_upstream ADD COLUMN lease_until REAL;
        ALTER TABLE batch_upstream ADD COLUMN adopted INTEGER NOT NULL DEFAULT 0
        """,
    ),
    (
        20,
        # Running totals per user (stores/user_totals.py), so a ranking of users over any window of
        # whole hours reads two rows per user (the totals before its end and before its start)
        # instead of every (day or hour, user) row in it. A key is (tenant, user), or (NULL, user)
        # for every tenant at once; `ledger_user_cum` holds, for each hour a key had requests, its
        # requests, successes and exact cost (decimal text) up to the end of that hour. Folded with
        # the rollups, in their transaction; built here once from the hourly user rollups.
        """
        CREATE TABLE ledger_user_key (
            id INTEGER PRIMARY KEY,
            tenant_id TEXT,
            user TEXT
        );
        CREATE INDEX ledger_user_key_scope ON ledger_user_key (tenant_id, user);
        CREATE TABLE ledger_user_cum (
            key INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            cost_usd TEXT NOT NULL,
            PRIMARY KEY (key, bucket)
        ) WITHOUT ROWID;
        INSERT INTO ledger_user_key (tenant_id, user)
        SELECT DISTINCT tenant_id, user FROM ledger_rollup WHERE grain = 'hu'
        UNION SELECT DISTINCT NULL, user FROM ledger_rollup WHERE grain = 'hu'
        ORDER BY 1, 2;
        INSERT INTO ledger_user_cum
        SELECT k.id, r.bucket, SUM(r.requests) OVER w, SUM(r.ok) OVER w,
            thrifty_money_run(r.pico, r.rest) OVER w
        FROM (
            SELECT tenant_id, user, bucket, requests, ok, cost_usd_pico AS pico, cost_usd_rest AS rest
            FROM ledger_rollup WHERE grain = 'hu'
            UNION ALL
            SELECT NULL, user, bucket, SUM(requests), SUM(ok), thrifty_int_sum(cost_usd_pico),
                thrifty_dec_sum(cost_usd_rest)
            FROM ledger_rollup WHERE grain = 'hu' GROUP BY user, bucket
        ) AS r
        JOIN ledger_user_key AS k ON k.tenant_id IS r.tenant_id AND k.user IS r.user
        WINDOW w AS (PARTITION BY k.id ORDER BY r.bucket)
        """,
    ),
    (
        21,
        # Recordings of requests that did not end in an answer now, for `thrifty simulate`: how
        # each ended (ok | deferred | error) and a failure's error; `response` holds 'null' then.
        """
        ALTER TABLE recordings ADD COLUMN outcome TEXT NOT NULL DEFAULT 'ok';
        ALTER TABLE recordings ADD COLUMN error TEXT
        """,
    ),
    (
        24,
        # An experiment's action log read by route (`thrifty experiment log`, each release step),
        # as PostgreSQL's migration 15 has it.
        "CREATE INDEX experiment_actions_route ON experiment_actions (route, id)",
    ),
    (
        25,
        # Semantic hits of routes that verify, kept so feedback on one (`x-thrifty-cache-wrong`)
        # is matched after a restart and however many hits came since: the tenant (feedback is
        # its own only), the partition and score it counts at, and whether it was counted already.
        # Pruned by age (`semantic.hit_retention_s`).
        """
        CREATE TABLE semantic_hits (
            tenant_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            route TEXT NOT NULL,
            partition TEXT NOT NULL,
            score REAL,
            answer_id TEXT NOT NULL,
            served_at REAL NOT NULL,
            feedback INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant_id, request_id)
        );
        CREATE INDEX semantic_hits_served ON semantic_hits (served_at)
        """,
    ),
    (
        26,
        # Purges by scope, so that a cache write still queued when one ran cannot bring its entry
        # back (stores/cache_purges.py).
        """
        CREATE TABLE cache_purges (
            cache TEXT NOT NULL,
            tenant_id TEXT,
            route TEXT,
            prompt_version TEXT,
            corpus_version TEXT,
            purged_at REAL NOT NULL
        );
        CREATE INDEX cache_purges_at ON cache_purges (purged_at)
        """,
    ),
)


def scope_where(
    equals: Mapping[str, object | None], *, expired_before: float | None = None
) -> tuple[str, list[object]]:
    """A WHERE clause matching every non-None column value (and expiry), with its parameters."""
    clauses = [f"{column} = ?" for column, value in equals.items() if value is not None]
    params = [value for value in equals.values() if value is not None]
    if expired_before is not None:
        clauses.append("expires_at <= ?")
        params.append(expired_before)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def connect(path: Path, *, synchronous: str = "normal", check_same_thread: bool = True) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    # With WAL, NORMAL loses nothing when the process dies (only on power loss); FULL fsyncs each commit.
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA busy_timeout=30000")
    register_functions(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations this database has not seen; return their versions."""
    register_functions(conn)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check inside the write lock: another process may have migrated meanwhile.
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
                conn.execute("COMMIT")
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def open_database(
    path: Path, *, synchronous: str = "normal", check_same_thread: bool = True
) -> sqlite3.Connection:
    conn = connect(path, synchronous=synchronous, check_same_thread=check_same_thread)
    migrate(conn)
    return conn
