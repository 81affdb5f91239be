"""Prompt-size limits: the model's context window and the route's max input tokens.

The window holds the prompt and one completion: with `n` choices each is its own completion of
the same prompt, so `n` does not enter this check (it does enter every cost and token estimate).
"""

from __future__ import annotations

from collections.abc import Mapping

from thrifty.errors import ContextTooLong
from thrifty.guard.output import requested_output
from thrifty.pipeline import Handler, RequestContext, Result
from thrifty.settings import RouteSettings
from thrifty.tokens import TokenCounter, prompt_upper_bound


class InputLimits:
    def __init__(self, counter: TokenCounter, routes: Mapping[str, RouteSettings]) -> None:
        self._counter = counter
        self._route_limits = {name: r.max_input_tokens for name, r in routes.items() if r.max_input_tokens}

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        target = ctx.target
        assert target is not None, "InputLimits runs after ResolveModel"
        route_limit = self._route_limits.get(ctx.route) if ctx.route else None
        window = target.context_window
        output = requested_output(ctx.body) or 0
        ceiling = min(
            [limit for limit in (route_limit, (window - output) if window else None) if limit is not None],
            default=None,
        )
        # Counting is skipped when even one token per body byte could not reach the limit.
        if ceiling is not None and prompt_upper_bound(ctx.body_bytes) > ceiling:
            count = self._counter.count_messages(
                ctx.body.get("messages") or [], target.upstream_model, tools=ctx.body.get("tools")
            )
            ctx.prompt_tokens = count
            approx = "" if count.exact else "about "
            if route_limit is not None and count.tokens > route_limit:
                raise ContextTooLong(
                    f"the prompt has {approx}{count.tokens} tokens, over the limit of {route_limit} input "
                    f"tokens of route {ctx.route!r}; shorten the messages",
                    param="messages",
                    code="route_input_limit_exceeded",
                )
            implied = ctx.output_ceiling_implied
            if window is not None and implied and count.tokens + output > window and count.tokens < window:
                # The ceiling is thrifty's assumption, not the client's ask: fit it to the window.
                ctx.body["max_tokens"] = output = window - count.tokens
            if window is not None and count.tokens + output > window:
                raise ContextTooLong(
                    f"model {target.alias!r} has a context window of {window} tokens; the request has "
                    f"{approx}{count.tokens} in the messages and {output} requested for the completion; "
                    "shorten the messages or lower max_tokens",
                    param="messages",
                )
        return await call_next(ctx)
