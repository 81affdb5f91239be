"""The exact cache: a repeat of a deterministic request is answered without an upstream call.

The key covers everything that can change the answer: tenant (never shared across tenants), the
user when the route says answers are personal, route, prompt version, corpus version
(`x-thrifty-corpus-version`), model, and the canonical request (messages with the system prompt,
tools, response format, sampling parameters). A new prompt or corpus version is a new key, so
its requests never see the old answers. Only requests the route marks cacheable are stored: by
default temperature 0. `Cache-Control: no-cache` skips the lookup, `no-store` skips the write.
Entries live in SQLite, so a restart keeps them; `thrifty cache purge` removes them by scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from thrifty.cache.common import DELIVERY_FIELDS, answer_scope, cacheable, serve_stored, usage_worth_keeping
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import StreamChunk, relay_and_keep
from thrifty.settings import ExactCacheSettings, RouteSettings
from thrifty.shapes import as_completion
from thrifty.stores.cache_purges import not_purged, purge_sqlite
from thrifty.stores.ports import SharedExactCache
from thrifty.stores.sqlite_db import scope_where
from thrifty.stores.write_behind import SqliteWriteBehind
from thrifty.types import Usage

log = logging.getLogger(__name__)

_PUT_SQL = "INSERT OR REPLACE INTO exact_cache VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
# The writer thread's put of an entry made earlier: nothing when a purge since covers it (11 is
# created_at, 2-5 the scope).
_QUEUED_PUT_SQL = (
    "INSERT OR REPLACE INTO exact_cache SELECT "
    + ", ".join(f"?{i}" for i in range(1, 13))
    + " WHERE "
    + not_purged(
        "exact", "?11", {"tenant_id": "?2", "route": "?3", "prompt_version": "?4", "corpus_version": "?5"}
    )
)


def cache_key(ctx: RequestContext, settings: ExactCacheSettings) -> str:
    body = {k: v for k, v in ctx.body.items() if k not in DELIVERY_FIELDS}
    parts = [*answer_scope(ctx, settings.per_user), body]
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


class SqliteExactCache:
    """Entries in the SQLite file. With a `writer`, puts are committed on its thread (never lost to a
    busy lock, never waited for on the loop) and stay readable from memory until they are."""

    def __init__(self, conn: sqlite3.Connection, writer: SqliteWriteBehind | None = None) -> None:
        self._conn = conn
        self._writer = writer
        self._pending: dict[str, tuple[float, dict[str, Any], Usage]] = {}

    def get(self, key: str, now: float) -> tuple[dict[str, Any], Usage] | None:
        pending = self._pending.get(key)
        if pending is not None and pending[0] > now:
            return pending[1], pending[2]
        row = self._conn.execute(
            "SELECT response, input_tokens, cached_input_tokens, output_tokens FROM exact_cache "
            "WHERE cache_key = ? AND expires_at > ?",
            (key, now),
        ).fetchone()
        if row is None:
            return None
        return orjson.loads(row[0]), Usage(
            input_tokens=row[1], cached_input_tokens=row[2], output_tokens=row[3]
        )

    def put(
        self, key: str, ctx: RequestContext, response: dict[str, Any], usage: Usage, ttl_s: float
    ) -> None:
        now = time.time()
        params = (
            key,
            ctx.tags.tenant_id,
            ctx.route or "",
            ctx.tags.prompt_version,
            ctx.tags.corpus_version,
            ctx.requested_model,
            orjson.dumps(response).decode(),
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens,
            now,
            now + ttl_s,
        )
        if self._writer is not None:
            held = (now + ttl_s, response, usage)
            self._pending[key] = held

            def committed() -> None:
                # From the writer's thread: a single dict operation, atomic under the GIL. A newer
                # put of the same key stays pending until its own commit.
                if self._pending.get(key) is held:
                    self._pending.pop(key, None)

            self._writer.submit(_QUEUED_PUT_SQL, params, committed)
            return
        try:
            self._conn.execute(_PUT_SQL, params)
        except sqlite3.OperationalError as err:
            # Busy elsewhere: a cache write is an optimisation, never worth blocking the loop for.
            log.warning("exact cache entry not stored: %s", err)

    def purge(
        self,
        *,
        tenant: str | None = None,
        route: str | None = None,
        prompt_version: str | None = None,
        corpus_version: str | None = None,
        expired_only: bool = False,
    ) -> int:
        scope = {
            "tenant_id": tenant,
            "route": route,
            "prompt_version": prompt_version,
            "corpus_version": corpus_version,
        }
        where, params = scope_where(scope, expired_before=time.time() if expired_only else None)
        if expired_only:  # expired entries are never served: nothing to record
            return self._conn.execute(f"DELETE FROM exact_cache{where}", params).rowcount
        return purge_sqlite(self._conn, "exact", where, params, scope)


class ExactCacheStage:
    def __init__(self, routes: Mapping[str, RouteSettings], catalog: PriceCatalog) -> None:
        self._settings = {name: r.cache for name, r in routes.items() if r.cache is not None}
        self._catalog = catalog
        self.store: SqliteExactCache | None = None  # set when the gateway opens its database
        # Several replicas: entries in a shared store (PostgreSQL); reads are awaited, writes run
        # off the response path.
        self.remote: SharedExactCache | None = None
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        return bool(self._settings)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        settings = self._settings.get(ctx.route) if ctx.route is not None else None
        if (
            settings is None
            or (self.store is None and self.remote is None)
            or not cacheable(ctx.body, settings)
        ):
            return await call_next(ctx)
        key = cache_key(ctx, settings)
        directive = ctx.tags.cache_control or ""
        if "no-cache" not in directive:
            if self.remote is not None:
                found = await self._get_remote(key)
            else:
                assert self.store is not None
                found = self.store.get(key, time.time())
            if found is not None:
                return serve_stored(ctx, "exact", *found, self._catalog)
        result = await call_next(ctx)
        if "no-store" in directive:
            return result
        if isinstance(result, Completion):
            self._store(key, ctx, result.body, settings)
            return result
        return Streamed(relay_and_keep(result.chunks, self._store_stream(key, ctx, settings)))

    def _store(
        self, key: str, ctx: RequestContext, response: dict[str, Any], settings: ExactCacheSettings
    ) -> None:
        usage = usage_worth_keeping(ctx, response)
        if usage is None:
            return
        if self.remote is not None:
            scope = {
                "tenant_id": ctx.tags.tenant_id,
                "route": ctx.route or "",
                "prompt_version": ctx.tags.prompt_version,
                "corpus_version": ctx.tags.corpus_version,
                "model": ctx.requested_model,
            }
            put = self._put_remote(key, scope, response, usage, settings.ttl_s, time.time())
            task = asyncio.ensure_future(put)
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        elif self.store is not None:
            self.store.put(key, ctx, response, usage, settings.ttl_s)

    async def _get_remote(self, key: str) -> tuple[dict[str, Any], Usage] | None:
        assert self.remote is not None
        try:
            return await self.remote.get(key, time.time())
        except Exception as err:  # noqa: BLE001 - a cache that is away is a miss, never a failure
            log.warning("exact cache lookup failed: %s", err)
            return None

    async def _put_remote(
        self,
        key: str,
        scope: dict[str, Any],
        response: dict[str, Any],
        usage: Usage,
        ttl_s: float,
        made_at: float,
    ) -> None:
        assert self.remote is not None
        try:
            await self.remote.put(key, scope, response, usage, ttl_s, made_at)
        except Exception as err:  # noqa: BLE001 - a cache write is an optimisation
            log.warning("exact cache entry not stored: %s", err)

    async def drain(self) -> None:
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _store_stream(
        self, key: str, ctx: RequestContext, settings: ExactCacheSettings
    ) -> Callable[[list[StreamChunk] | None], None]:
        def on_end(kept: list[StreamChunk] | None) -> None:
            if kept is not None:
                self._store(key, ctx, as_completion(kept), settings)

        return on_end


__all__ = ["ExactCacheStage", "SqliteExactCache", "cache_key"]
