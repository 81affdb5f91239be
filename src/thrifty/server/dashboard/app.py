"""`/dashboard` and `/dashboard/api/*` as a bare ASGI handler, mounted by the gateway's app (and
served alone by `thrifty dashboard`).

Who sees what: a key from `Authorization: Bearer KEY` or the sign-in cookie. A key whose sha256
is in `dashboard.admin_key_hashes` sees every tenant; a tenant's virtual key sees its tenant
only (its filter is forced, another tenant's is refused with 403); no key or an unknown one: 401.
"""

from __future__ import annotations

import hmac
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import orjson

from thrifty.errors import AuthenticationFailed, InvalidRequest, NotFound, ThriftyError
from thrifty.server.dashboard import data
from thrifty.server.dashboard.data import Viewer
from thrifty.server.dashboard.page import login_page, render_page
from thrifty.settings import Settings
from thrifty.stores.keys import hash_key
from thrifty.stores.reporting import ReportingStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The semantic cache's partition stats (rows of `thrifty cache stats --json`), of one tenant or all.
# A tenant's (None: every tenant's) semantic cache rows: from memory (the serving gateway), or
# awaited (the standalone dashboard reads them from the store, off the loop).
CacheStats = Callable[[str | None], list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]]
# A virtual key -> its tenant; raises AuthenticationFailed for a key it does not know.
TenantOfKey = Callable[[str], str]

COOKIE = "thrifty_dashboard_key"
_HTML = (b"content-type", b"text/html; charset=utf-8")
_JSON = (b"content-type", b"application/json")
# Nothing on the page comes from elsewhere; say so to the browser.
_SECURITY = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]
_MAX_FORM = 4096


class _Forbidden(ThriftyError):
    status = 403
    error_type = "permission_error"


def _cookie(headers: Mapping[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return unquote(value)
    return None


class DashboardApp:
    def __init__(
        self,
        store: ReportingStore,
        settings: Settings,
        tenant_of_key: TenantOfKey,
        cache_stats: CacheStats | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._tenant_of_key = tenant_of_key
        # The serving gateway's semantic cache partitions (`thrifty cache stats`); None: not shown.
        self._cache_stats = cache_stats
        self._admin_hashes = tuple(settings.dashboard.admin_key_hashes)

    def viewer(self, headers: Mapping[str, str]) -> Viewer:
        key = None
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        key = key or _cookie(headers)
        if not key:
            raise AuthenticationFailed(
                "no key: sign in at /dashboard with an admin key or your tenant's virtual key, "
                "or send it as 'Authorization: Bearer KEY'"
            )
        if self.is_admin(key):
            return Viewer(None)
        return Viewer(self._tenant_of_key(key))

    async def _cache(self, viewer: Viewer) -> dict[str, Any]:
        """The semantic cache's partitions as `thrifty cache stats` has them; a tenant's own only."""
        found = self._cache_stats(viewer.tenant) if self._cache_stats is not None else []
        rows = await found if inspect.isawaitable(found) else found
        return {"partitions": [r for r in rows if viewer.admin or r["tenant_id"] == viewer.tenant]}

    def is_admin(self, key: str) -> bool:
        digest = hash_key(key)
        return any(hmac.compare_digest(digest, h) for h in self._admin_hashes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        api = path.startswith("/dashboard/api/")
        try:
            if path == "/dashboard/login" and method == "POST":
                await self._login(receive, send)
                return
            if path == "/dashboard/logout":
                await _send(send, 303, b"", [(b"location", b"/dashboard"), _clear_cookie()])
                return
            if method not in ("GET", "HEAD"):
                raise InvalidRequest(f"{path} accepts GET only")
            viewer = self.viewer(headers)
            now = time.time()
            query = data.parse_query(params, viewer, self.settings, now)
            if path in ("/dashboard", "/dashboard/"):
                page = await data.page(self.store, self.settings, viewer, query, now)
                page["cache"] = await self._cache(viewer)
                await _send(send, 200, render_page(page).encode(), [_HTML, *_SECURITY])
                return
            if not api:
                raise NotFound(f"no dashboard page {path}", code="unknown_url")
            payload = await self._api(path.removeprefix("/dashboard/api/"), viewer, query, now)
            await _send(send, 200, orjson.dumps(payload), [_JSON, *_SECURITY])
        except AuthenticationFailed as err:
            if api:
                await _send(
                    send, 401, orjson.dumps(err.to_openai()), [_JSON, (b"www-authenticate", b"Bearer")]
                )
            else:
                message = None if "no key" in err.message else err.message
                await _send(send, 401, login_page(message).encode(), [_HTML, *_SECURITY])
        except ThriftyError as err:
            await _send(send, err.status, orjson.dumps(err.to_openai()), [_JSON])

    async def _api(self, name: str, viewer: Viewer, query: data.Query, now: float) -> dict[str, Any]:
        if name == "summary":
            return await data.summary(self.store, query)
        if name == "series":
            return await data.series(self.store, query)
        if name == "routes":
            return await data.summary(self.store, query, "route")
        if name == "prompt_versions":
            return {
                "summary": await data.summary(self.store, query, "prompt_version"),
                "series": await data.series(self.store, query, "prompt_version"),
            }
        if name == "top":
            return await data.top(self.store, query)
        if name == "budgets":
            return await data.budgets(self.store, self.settings, viewer, now)
        if name == "alerts":
            return await data.alerts(self.store, self.settings, viewer, query)
        if name == "requests":
            return await data.requests(self.store, query)
        if name == "page":
            return {
                **await data.page(self.store, self.settings, viewer, query, now),
                "cache": await self._cache(viewer),
            }
        if name == "cache":
            return await self._cache(viewer)
        raise NotFound(
            f"no dashboard API {name!r}; there are summary, series, routes, prompt_versions, top, budgets, "
            "alerts, requests, cache and page",
            code="unknown_url",
        )

    async def _login(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > _MAX_FORM:
                raise InvalidRequest("the sign-in form is too large")
            if not message.get("more_body", False):
                break
        key = dict(parse_qsl(body.decode("utf-8", "replace"))).get("key", "").strip()
        try:
            if not key:
                raise AuthenticationFailed("give a key")
            if not self.is_admin(key):
                self._tenant_of_key(key)
        except AuthenticationFailed:
            await _send(
                send,
                401,
                login_page("that key is not an admin key nor a known virtual key").encode(),
                [_HTML, *_SECURITY],
            )
            return
        cookie = f"{COOKIE}={quote(key, safe='')}; Path=/dashboard; HttpOnly; SameSite=Strict".encode()
        await _send(send, 303, b"", [(b"location", b"/dashboard"), (b"set-cookie", cookie)])


def _clear_cookie() -> tuple[bytes, bytes]:
    return (b"set-cookie", f"{COOKIE}=; Path=/dashboard; Max-Age=0; HttpOnly; SameSite=Strict".encode())


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
