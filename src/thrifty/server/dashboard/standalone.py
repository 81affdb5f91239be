"""`thrifty dashboard`: the dashboard over an existing ledger, without the proxy.

It folds the rollups itself as the gateway does (at start, then every `dashboard.fold_interval_s`),
so a ledger whose gateway is stopped, or was killed mid-way, is caught up from the watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import AuthenticationFailed
from thrifty.server.dashboard.app import DashboardApp, Receive, Scope, Send
from thrifty.settings import Settings
from thrifty.stores.keys import SqliteKeyStore, hash_key
from thrifty.stores.reporting import SqliteReportingStore
from thrifty.stores.sqlite_db import connect, open_database

log = logging.getLogger(__name__)


class KeyDirectory:
    """Virtual key -> tenant from the settings' key_hashes and the key store, as the gateway does."""

    def __init__(self, settings: Settings, keys: Any) -> None:
        self._settings = settings
        self._hashes = {h: tenant for tenant, t in settings.tenants.items() for h in t.key_hashes}
        self._keys = keys  # SqliteKeyStore or PostgresKeys: tenant_for_hash(digest)

    def __call__(self, key: str) -> str:
        digest = hash_key(key)
        tenant = self._hashes.get(digest) or self._keys.tenant_for_hash(digest)
        if tenant is None or tenant not in self._settings.tenants:
            raise AuthenticationFailed("invalid key: not an admin key nor a virtual key of a known tenant")
        return tenant


class DashboardServer:
    """An ASGI app serving only /dashboard, /dashboard/api/* and /healthz."""

    def __init__(self, settings: Settings, db_path: Path | None = None) -> None:
        self._settings = settings
        self._store: Any
        if db_path is None and settings.storage.backend == "postgresql":
            from thrifty.stores import postgres
            from thrifty.stores.postgres_reporting import PostgresReportingStore

            self._conn: Any = postgres.connect(settings.storage.url)
            postgres.migrate(self._conn)
            keys: Any = postgres.PostgresKeys(self._conn)
            self._store = PostgresReportingStore(settings.storage.url)
        else:
            path = db_path or settings.storage.sqlite_path
            open_database(path).close()  # brings an older ledger's schema (and rollups) up to date
            # Created here, used on the server's loop thread: key lookups are one indexed read.
            self._conn = connect(path, check_same_thread=False)
            keys = SqliteKeyStore(self._conn)
            self._store = SqliteReportingStore(path)
        self._db_path = db_path
        semantic = any(
            r.semantic_cache is not None and r.semantic_cache.enabled for r in settings.routes.values()
        )
        self.dashboard = DashboardApp(
            self._store,
            settings,
            KeyDirectory(settings, keys),
            cache_stats=self._cache_stats if semantic else None,
        )
        self._folder: asyncio.Task[None] | None = None

    async def _cache_stats(self, tenant: str | None) -> list[dict[str, Any]]:
        """The semantic cache rows the gateways stored (as `thrifty cache stats` reads them): the
        serving gateway's dashboard shows the same from its memory."""
        from thrifty.cache.semantic.stored_stats import stored_partition_stats

        rows = await asyncio.to_thread(
            stored_partition_stats, self._settings, path=self._db_path, tenant=tenant
        )
        return [row.to_dict() for row in rows]

    async def _fold_periodically(self) -> None:
        while True:
            try:
                await self._store.fold()
            except Exception as err:  # noqa: BLE001 - the page stays exact (the tail); next time
                log.warning("rollups not folded this time: %s", err)
            await asyncio.sleep(self._settings.dashboard.fold_interval_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._folder = asyncio.ensure_future(self._fold_periodically())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._folder is not None:
                        self._folder.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await self._folder
                    await self._store.aclose()
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


def dashboard_config(settings: Settings, db_path: Path | None, *, host: str, port: int) -> Any:
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
