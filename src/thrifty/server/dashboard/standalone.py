"""`thrifty dashboard`: the dashboard over an existing ledger, without the proxy."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import AuthenticationFailed
from thrifty.server.dashboard.app import DashboardApp, Receive, Scope, Send
from thrifty.settings import Settings
from thrifty.stores.keys import SqliteKeyStore, hash_key
from thrifty.stores.reporting import SqliteReportingStore
from thrifty.stores.sqlite_db import connect, open_database


class KeyDirectory:
    """Virtual key -> tenant from the settings' key_hashes and the key store, as the gateway does."""

    def __init__(self, settings: Settings, conn: sqlite3.Connection) -> None:
        self._settings = settings
        self._hashes = {h: tenant for tenant, t in settings.tenants.items() for h in t.key_hashes}
        self._keys = SqliteKeyStore(conn)

    def __call__(self, key: str) -> str:
        digest = hash_key(key)
        tenant = self._hashes.get(digest) or self._keys.tenant_for_hash(digest)
        if tenant is None or tenant not in self._settings.tenants:
            raise AuthenticationFailed("invalid key: not an admin key nor a virtual key of a known tenant")
        return tenant


class DashboardServer:
    """An ASGI app serving only /dashboard, /dashboard/api/* and /healthz."""

    def __init__(self, settings: Settings, db_path: Path) -> None:
        open_database(db_path).close()  # brings an older ledger's schema (and rollups) up to date
        # Created here, used on the server's loop thread: key lookups are one indexed read.
        self._conn = connect(db_path, check_same_thread=False)
        self.dashboard = DashboardApp(
            SqliteReportingStore(db_path), settings, KeyDirectory(settings, self._conn)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self._conn.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/dashboard" or path.startswith("/dashboard/"):
            await self.dashboard(scope, receive, send)
            return
        status, payload = (200, {"status": "ok"}) if path == "/healthz" else (404, _not_found(path))
        body = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def dashboard_config(settings: Settings, db_path: Path, *, host: str, port: int) -> Any:
    import uvicorn

    from thrifty.server.run import server_options

    return uvicorn.Config(DashboardServer(settings, db_path), host=host, port=port, **server_options())  # type: ignore[arg-type]


def _not_found(path: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"no route {path}; this server shows the dashboard at /dashboard",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    }
