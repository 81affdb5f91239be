"""Provider prefix caching: let Anthropic reuse the static head of a prompt across calls.

Anthropic caches a prompt prefix only up to `cache_control` breakpoints the request marks, in the
order tools → system → messages. On routes with `prompt_cache: true`, a breakpoint goes on the last
tool definition and on the last system block: the parts of a prompt that stay the same from call
to call. Cache reads then cost 10% of the input price, writes 125% (priced from the usage the
adapter normalises). Requests that already mark breakpoints are left as they are. OpenAI caches
prompt prefixes of 1024+ tokens by itself; nothing is marked for it, and thrifty never reorders
messages (that would change what the model is asked), so keep static content first there.

The marks are applied per attempt, on a copy of the body, so a fallback to another provider
sends the request unmarked.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from thrifty.pipeline import Handler, RequestContext, Result
from thrifty.settings import RouteSettings

EPHEMERAL = {"type": "ephemeral"}


def has_breakpoints(body: Mapping[str, Any]) -> bool:
    if any(isinstance(t, dict) and "cache_control" in t for t in body.get("tools") or ()):
        return True
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content):
            return True
    return False


def mark_static_prefix(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAI-shaped body with breakpoints on the last tool and last system block."""
    marked = copy.deepcopy(dict(body))
    tools = marked.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[-1], dict):
        tools[-1]["cache_control"] = dict(EPHEMERAL)
    messages = marked.get("messages") or []
    system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    if system:
        last = system[-1]
        content = last.get("content")
        if isinstance(content, str):
            last["content"] = [{"type": "text", "text": content, "cache_control": dict(EPHEMERAL)}]
        elif isinstance(content, list) and content and isinstance(content[-1], dict):
            content[-1]["cache_control"] = dict(EPHEMERAL)
    return marked


class PromptCacheBreakpoints:
    def __init__(self, routes: Mapping[str, RouteSettings], provider_kinds: Mapping[str, str]) -> None:
        self._routes = frozenset(name for name, r in routes.items() if r.prompt_cache)
        self._kinds = dict(provider_kinds)

    @property
    def active(self) -> bool:
        return bool(self._routes)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        target = ctx.target
        if (
            ctx.route not in self._routes
            or target is None
            or self._kinds.get(target.provider) != "anthropic"
            or has_breakpoints(ctx.body)
        ):
            return await call_next(ctx)
        original = ctx.body
        ctx.body = mark_static_prefix(original)
        try:
            return await call_next(ctx)
        finally:
            ctx.body = original
