"""Running totals per user, so that ranking users over a window reads two rows per user.

A ranking of users over 30 days from the daily and hourly user rollups reads every (day, user)
row in the window plus every (hour, user) row of its partial days: at ten million ledger rows and
4,000 active (tenant, user) pairs, ~170,000 rows. Instead, for each key, (tenant, user) or
(NULL, user) for every tenant at once, `ledger_user_cum` keeps one row per hour the key had
requests: its requests, successes and exact cost from the beginning of time to the end of that
hour. A window [since, until) of whole hours is then the row before `until` minus the row before
`since`: two index seeks per key, whatever the window's length.

The totals are folded with the rollups, in the fold's write transaction (stores/rollups.py), from
the same hourly user sums, so they cover exactly the rows below the watermark; readers add the
ledger rows past it as for any rollup. A fold normally appends a row per key at the current hour;
rows that arrive for an hour older than a key's last total (a late import) make the fold rewrite
that key's totals from that hour on.

Money is exact: decimal text summed with an unrounded context. The totals do not keep the decimal
exponent of the window's sum (the smallest exponent of its amounts, which a report shows): the
ranking's winners take theirs from the rollups (`window_exponents`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from thrifty.stores.sqlite_money import EXACT

Totals = tuple[int, int, Decimal]  # requests, successes, cost
# One key's sums of one hour: tenant (None: every tenant), user, hour, requests, successes, cost.
HourlySums = tuple[str | None, str | None, int, int, int, Decimal]
_ZERO: Totals = (0, 0, Decimal(0))


def _add(a: Totals, b: Totals) -> Totals:
    return a[0] + b[0], a[1] + b[1], EXACT.add(a[2], b[2])


def _sub(a: Totals, b: Totals) -> Totals:
    return a[0] - b[0], a[1] - b[1], EXACT.subtract(a[2], b[2])


def _parse(packed: str | None) -> Totals:
    if packed is None:
        return _ZERO
    requests, ok, cost = packed.split(" ")
    return int(requests), int(ok), Decimal(cost)


def _per_key(sums: Iterable[HourlySums]) -> dict[tuple[str | None, str | None], dict[int, Totals]]:
    """Per key ((tenant, user) and (None, user)) and hour."""
    out: dict[tuple[str | None, str | None], dict[int, Totals]] = {}
    for tenant, user, bucket, requests, ok, cost in sums:
        for key in ((tenant, user), (None, user)):
            hours = out.setdefault(key, {})
            hours[bucket] = _add(hours.get(bucket, _ZERO), (requests, ok, cost))
    return out


def fold_user_totals(conn: sqlite3.Connection, sums: Iterable[HourlySums]) -> None:
    """Add a fold's hourly sums per (tenant, user) to the running totals of their keys (inside the
    fold's write transaction)."""
    for (tenant, user), hours in _per_key(sums).items():
        found = conn.execute(
            "SELECT id FROM ledger_user_key WHERE tenant_id IS ? AND user IS ?", (tenant, user)
        ).fetchone()
        first = min(hours)
        if found is None:
            key = conn.execute(
                "INSERT INTO ledger_user_key (tenant_id, user) VALUES (?, ?)", (tenant, user)
            ).lastrowid
            base, later = _ZERO, []
        else:
            key = found[0]
            (packed,) = conn.execute(
                "SELECT (SELECT requests || ' ' || ok || ' ' || cost_usd FROM ledger_user_cum "
                "WHERE key = ? AND bucket < ? ORDER BY bucket DESC LIMIT 1)",
                (key, first),
            ).fetchone()
            base = _parse(packed)
            later = conn.execute(
                "SELECT bucket, requests, ok, cost_usd FROM ledger_user_cum WHERE key = ? AND bucket >= ? "
                "ORDER BY bucket",
                (key, first),
            ).fetchall()
        # Totals already there from `first` on (normally none) back into per-hour increments, with
        # the new hours' sums added; then running totals again from `base`.
        increments = dict(hours)
        previous = base
        for bucket, requests, ok, cost in later:
            total = (requests, ok, Decimal(cost))
            increments[bucket] = _add(increments.get(bucket, _ZERO), _sub(total, previous))
            previous = total
        running = base
        rows = []
        for bucket in sorted(increments):
            running = _add(running, increments[bucket])
            rows.append((key, bucket, running[0], running[1], format(running[2], "f")))
        conn.executemany("INSERT OR REPLACE INTO ledger_user_cum VALUES (?, ?, ?, ?, ?)", rows)


def reset_user_totals(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM ledger_user_cum")
    conn.execute("DELETE FROM ledger_user_key")


# Per key of one scope, its totals before `until` and before `since` (NULL: none yet), packed as
# "requests ok cost" so that each is one seek of the (key, bucket) primary key.
_LAST_BEFORE = (
    "(SELECT requests || ' ' || ok || ' ' || cost_usd FROM ledger_user_cum AS c "
    "WHERE c.key = k.id{bound} ORDER BY c.bucket DESC LIMIT 1)"
)


def window_totals(
    conn: sqlite3.Connection, since: float | None, until: float | None, tenant: str | None
) -> dict[str | None, Totals]:
    """Requests, successes and cost per user in [since, until) (whole hours) of one tenant, or of
    every tenant, from the running totals (the rows folded so far)."""
    params: list[Any] = []
    upper = _LAST_BEFORE.format(bound="" if until is None else " AND c.bucket < ?")
    if until is not None:
        params.append(int(until))
    lower = "NULL" if since is None else _LAST_BEFORE.format(bound=" AND c.bucket < ?")
    if since is not None:
        params.append(int(since))
    scope = "k.tenant_id IS NULL" if tenant is None else "k.tenant_id = ?"
    if tenant is not None:
        params.append(tenant)
    out: dict[str | None, Totals] = {}
    for user, before_until, before_since in conn.execute(
        f"SELECT k.user, {upper}, {lower} FROM ledger_user_key AS k WHERE {scope}", params
    ):
        if before_until is None:
            continue
        totals = _sub(_parse(before_until), _parse(before_since))
        if totals[0]:
            out[user] = _add(out.get(user, _ZERO), totals)
    return out


__all__ = ["HourlySums", "Totals", "fold_user_totals", "reset_user_totals", "window_totals"]
