"""Virtual keys: random secrets shown once, stored only as their sha256 digest."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time

KEY_PREFIX = "thr-"


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so an unsalted digest is safe to store and fast to look up.
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class SqliteKeyStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def create(self, tenant_id: str, label: str | None = None) -> str:
        key = new_key()
        self._conn.execute(
            "INSERT INTO virtual_keys (key_hash, tenant_id, label, created_at) VALUES (?, ?, ?, ?)",
            (hash_key(key), tenant_id, label, time.time()),
        )
        return key

    def tenant_for_hash(self, key_hash: str) -> str | None:
        row = self._conn.execute(
            "SELECT tenant_id FROM virtual_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    def revoke(self, key_hash_prefix: str) -> int:
        cur = self._conn.execute(
            "UPDATE virtual_keys SET revoked_at = ? WHERE key_hash LIKE ? AND revoked_at IS NULL",
            (time.time(), key_hash_prefix + "%"),
        )
        return cur.rowcount

    def list(self) -> list[tuple[str, str, str | None, float, float | None]]:
        return list(
            self._conn.execute(
                "SELECT substr(key_hash, 1, 12), tenant_id, label, created_at, revoked_at "
                "FROM virtual_keys ORDER BY created_at"
            )
        )
