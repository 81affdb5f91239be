"""SQLite storage of experiments (the embedded default): feedback, each route's arms as they
stand, the action log and release plans, in the ledger's file. Feedback joins the ledger by
request id; everything is one small transaction."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson

from thrifty.experiments.store import Action, Feedback, LedgerFacts, Stored, VariantRow
from thrifty.stores.sqlite_db import open_database

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _locked(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """One statement sequence at a time on the shared connection (it is used from worker threads)."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        store = args[0]
        assert isinstance(store, SqliteExperimentStore)
        with store._lock:
            return method(*args, **kwargs)

    return run


class SqliteExperimentStore:
    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = open_database(path, synchronous=synchronous, check_same_thread=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- feedback --------------------------------------------------------------------------

    @_locked
    def ledger_facts(self, request_id: str) -> LedgerFacts | None:
        row = self._conn.execute(
            "SELECT request_id, tenant_id, route, variant, model, cache, status FROM ledger "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        return None if row is None else LedgerFacts(*row)

    @_locked
    def put_feedback(self, fb: Feedback) -> Stored:
        """One row per request: a repeat with the same content changes nothing, one with other
        content replaces it (still one row, so nothing is counted twice)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = conn.execute(
                "SELECT score, label, correct FROM feedback WHERE request_id = ?", (fb.request_id,)
            ).fetchone()
            new = (fb.score, fb.label, None if fb.correct is None else int(fb.correct))
            if old is not None and tuple(old) == new:
                conn.execute("COMMIT")
                return "same"
            conn.execute(
                "INSERT INTO feedback (request_id, tenant_id, ts, route, variant, score, label, correct) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
                "ts = excluded.ts, score = excluded.score, label = excluded.label, "
                "correct = excluded.correct",
                (fb.request_id, fb.tenant_id, fb.ts, fb.route, fb.variant, *new),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return "new" if old is None else "changed"

    @_locked
    def feedback_count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    # -- statistics ------------------------------------------------------------------------

    @_locked
    def variant_rows(self, route: str, since: float | None = None) -> list[VariantRow]:
        sql = (
            "SELECT l.ts, l.variant, l.status, l.cost_usd, l.escalated, f.score, f.label, f.correct "
            "FROM ledger AS l LEFT JOIN feedback AS f ON f.request_id = l.request_id "
            "WHERE l.route = ? AND l.variant IS NOT NULL"
            + (" AND l.ts >= ?" if since is not None else "")
            + " ORDER BY l.ts"
        )
        params: tuple[Any, ...] = (route,) if since is None else (route, since)
        return [
            VariantRow(
                ts,
                variant,
                status,
                cost,
                bool(escalated),
                score,
                label,
                None if correct is None else bool(correct),
            )
            for ts, variant, status, cost, escalated, score, label, correct in self._conn.execute(sql, params)
        ]

    # -- arms and actions ------------------------------------------------------------------

    @_locked
    def states(self) -> dict[str, dict[str, Any]]:
        return {
            route: orjson.loads(arms)
            for route, arms in self._conn.execute("SELECT route, arms FROM experiment_state")
        }

    @_locked
    def state(self, route: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT arms FROM experiment_state WHERE route = ?", (route,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    @_locked
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
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO experiment_actions (ts, route, action, variant, reason, details) "
                "VALUES (?, ?, ?, ?, ?, ?)",
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
                    "INSERT INTO experiment_state (route, arms, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (route) DO UPDATE SET arms = excluded.arms, "
                    "updated_at = excluded.updated_at",
                    (route, orjson.dumps(state).decode(), now),
                )
            if release is not None:
                conn.execute(
                    "INSERT INTO releases (route, plan, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (route) DO UPDATE SET plan = excluded.plan, "
                    "updated_at = excluded.updated_at",
                    (route, orjson.dumps(release).decode(), now),
                )
            if clear_release:
                conn.execute("DELETE FROM releases WHERE route = ?", (route,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @_locked
    def actions(self, route: str) -> list[Action]:
        return [
            Action(ts, r, a, v, reason, None if d is None else orjson.loads(d))
            for ts, r, a, v, reason, d in self._conn.execute(
                "SELECT ts, route, action, variant, reason, details FROM experiment_actions "
                "WHERE route = ? ORDER BY id",
                (route,),
            )
        ]

    @_locked
    def release(self, route: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT plan FROM releases WHERE route = ?", (route,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))


__all__ = ["SqliteExperimentStore"]
