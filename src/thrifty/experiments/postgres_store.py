"""The experiment store on PostgreSQL (migration 15): the same port as the SQLite store, shared by
every replica and by the CLI, so feedback posted to any replica counts once, and a promote, stop
or release step recorded by `thrifty experiment` / `thrifty release` reaches every replica.

What SQLite's write lock gives for free is one statement here: a feedback is an upsert whose
update only happens when the content differs, returning whether it inserted; two replicas
storing the same feedback at the same moment get one "new" and one "same", never two rows.

Calls are short indexed statements on one connection, serialised by a lock (the gateway calls the
store from worker threads). A connection the database dropped is replaced on the next call; a
database that does not answer is `SharedStateUnavailable` (a 503 naming PostgreSQL).
"""

from __future__ import annotations

import contextlib
import time
from decimal import Decimal
from typing import Any

import orjson

from thrifty.experiments.store import Action, Feedback, LedgerFacts, Stored, VariantRow
from thrifty.stores import postgres
from thrifty.stores.pg_session import PostgresSession

# The update happens only when the content differs; RETURNING tells an insert (xmax 0) from an
# update, and no row at all means the stored feedback was the same.
_PUT_FEEDBACK = (
    "INSERT INTO feedback (request_id, tenant_id, ts, route, variant, score, label, correct) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE SET "
    "ts = excluded.ts, score = excluded.score, label = excluded.label, correct = excluded.correct "
    "WHERE (feedback.score, feedback.label, feedback.correct) "
    "IS DISTINCT FROM (excluded.score, excluded.label, excluded.correct) "
    "RETURNING (xmax = 0)"
)


def _money_text(value: Decimal | None) -> str | None:
    """NUMERIC as the SQLite store gives it: plain decimal text (never 1E-7)."""
    return None if value is None else format(value, "f")


class PostgresExperimentStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._connection = PostgresSession(url, serialised=True)
        with self._session() as conn:
            postgres.migrate(conn)

    def close(self) -> None:
        self._connection.close()

    def _session(self) -> contextlib.AbstractContextManager[Any]:
        """The live connection, one caller at a time (see `PostgresSession`)."""
        return self._connection.connection()

    # -- feedback --------------------------------------------------------------------------

    def ledger_facts(self, request_id: str) -> LedgerFacts | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT request_id, tenant_id, route, variant, model, cache, status FROM ledger "
                "WHERE request_id = %s",
                (request_id,),
            ).fetchone()
        return None if row is None else LedgerFacts(*row)

    def put_feedback(self, fb: Feedback) -> Stored:
        correct = None if fb.correct is None else int(fb.correct)
        with self._session() as conn:
            row = conn.execute(
                _PUT_FEEDBACK,
                (fb.request_id, fb.tenant_id, fb.ts, fb.route, fb.variant, fb.score, fb.label, correct),
            ).fetchone()
        if row is None:
            return "same"
        return "new" if row[0] else "changed"

    def feedback_count(self) -> int:
        with self._session() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    # -- statistics ------------------------------------------------------------------------

    def variant_rows(self, route: str, since: float | None = None) -> list[VariantRow]:
        sql = (
            "SELECT l.ts, l.variant, l.status, l.cost_usd, l.escalated, f.score, f.label, f.correct "
            "FROM ledger AS l LEFT JOIN feedback AS f ON f.request_id = l.request_id "
            "WHERE l.route = %s AND l.variant IS NOT NULL"
            + (" AND l.ts >= %s" if since is not None else "")
            + " ORDER BY l.ts"
        )
        params: tuple[Any, ...] = (route,) if since is None else (route, since)
        with self._session() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            VariantRow(
                ts,
                variant,
                status,
                _money_text(cost),
                bool(escalated),
                score,
                label,
                None if correct is None else bool(correct),
            )
            for ts, variant, status, cost, escalated, score, label, correct in rows
        ]

    # -- arms and actions ------------------------------------------------------------------

    def states(self) -> dict[str, dict[str, Any]]:
        with self._session() as conn:
            rows = conn.execute("SELECT route, arms FROM experiment_state").fetchall()
        return {route: orjson.loads(arms) for route, arms in rows}

    def state(self, route: str) -> dict[str, Any] | None:
        with self._session() as conn:
            row = conn.execute("SELECT arms FROM experiment_state WHERE route = %s", (route,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def record(
        self,
        route: str,
        action: str,
        reason: str,
        *,
        variant: str | None = None,
        details: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        release: dict[str, Any] | None = None,
        clear_release: bool = False,
    ) -> None:
        """Log an action and, in the same transaction, the arms and release plan it leaves."""
        now = time.time()
        with self._session() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO experiment_actions (ts, route, action, variant, reason, details) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    now,
                    route,
                    action,
                    variant,
                    reason,
                    None if details is None else orjson.dumps(details).decode(),
                ),
            )
            if state is not None:
                conn.execute(
                    "INSERT INTO experiment_state (route, arms, updated_at) VALUES (%s, %s, %s) "
                    "ON CONFLICT (route) DO UPDATE SET arms = excluded.arms, "
                    "updated_at = excluded.updated_at",
                    (route, orjson.dumps(state).decode(), now),
                )
            if release is not None:
                conn.execute(
                    "INSERT INTO releases (route, plan, updated_at) VALUES (%s, %s, %s) "
                    "ON CONFLICT (route) DO UPDATE SET plan = excluded.plan, "
                    "updated_at = excluded.updated_at",
                    (route, orjson.dumps(release).decode(), now),
                )
            if clear_release:
                conn.execute("DELETE FROM releases WHERE route = %s", (route,))

    def actions(self, route: str) -> list[Action]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT ts, route, action, variant, reason, details FROM experiment_actions "
                "WHERE route = %s ORDER BY id",
                (route,),
            ).fetchall()
        return [
            Action(ts, r, a, v, reason, None if d is None else orjson.loads(d))
            for ts, r, a, v, reason, d in rows
        ]

    def release(self, route: str) -> dict[str, Any] | None:
        with self._session() as conn:
            row = conn.execute("SELECT plan FROM releases WHERE route = %s", (route,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))


__all__ = ["PostgresExperimentStore"]
