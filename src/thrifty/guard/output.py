"""How much a request may generate: the output ceiling and the number of choices, read once.

Every worst case thrifty computes (budget reservation, per-request cost cap, rate-limit tokens)
is `prompt + choices x output ceiling`: a request asking for `n` choices is billed for each.
A client may send both `max_tokens` and `max_completion_tokens`; a provider may honour either,
so the larger one is the ceiling, and both are clamped to a route's cap.

When the client sends no cap, the ceiling the guards assume (`models.M.max_output_tokens`) is
sent upstream as `max_tokens`, so nothing can be generated past what was reserved. A route with
`send_output_ceiling: false` forwards no cap instead; then `max_output_tokens` must be the
model's real maximum output, since that is what is reserved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from thrifty.errors import InvalidRequest
from thrifty.pipeline import Handler, RequestContext, Result
from thrifty.settings import ModelSettings, RouteSettings

OUTPUT_KEYS = ("max_completion_tokens", "max_tokens")


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def requested_output(body: Mapping[str, object]) -> int | None:
    """The client's output cap: the larger of the two fields when both are sent."""
    values = [v for v in (_positive_int(body.get(k)) for k in OUTPUT_KEYS) if v is not None]
    return max(values) if values else None


def choices(body: Mapping[str, object]) -> int:
    """How many completions the request asks for (`n`, default 1)."""
    return _positive_int(body.get("n")) or 1


def check_choices(body: Mapping[str, object]) -> None:
    n = body.get("n")
    if n is not None and _positive_int(n) is None:
        raise InvalidRequest("'n' must be a positive integer (the number of choices)", param="n")


def clamp_output(body: dict[str, object], cap: int) -> None:
    """Lower every output field above `cap` to it, or set `max_tokens` when the client sent none."""
    present = [k for k in OUTPUT_KEYS if _positive_int(body.get(k)) is not None]
    for key in present:
        value = _positive_int(body.get(key))
        if value is not None and value > cap:
            body[key] = cap
    if not present:
        body["max_tokens"] = cap


class OutputCeiling:
    """Fixes the output ceiling of the request before anything reads it: the route's cap clamps the
    client's fields, and a request without a cap is sent the one the guards assume.

    Runs right after model resolution, before the prompt-size check, so the context window is
    checked against the ceiling that will be sent."""

    def __init__(
        self,
        models: Mapping[str, ModelSettings],
        routes: Mapping[str, RouteSettings],
        single_choice: frozenset[str] = frozenset(),
        trained: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """`trained`: per route a trained router drives, every alias its artifact may call (ids
        named as they are here need no mapping, so the settings alone do not list them)."""
        self._model_caps = {alias: m.max_output_tokens for alias, m in models.items()}
        self._route_caps = {name: r.max_output_tokens for name, r in routes.items() if r.max_output_tokens}
        self._unsent = frozenset(name for name, r in routes.items() if not r.send_output_ceiling)
        # Models that cannot return several choices (Anthropic has no `n`), and per route the first
        # of them the route may call: n > 1 is refused before any call, not after a draft was paid.
        self._single = single_choice
        self._single_on_route: dict[str, str] = {}
        for name, r in routes.items():
            may_call = (*route_aliases(r), *(trained or {}).get(name, ()))
            found = next((a for a in may_call if a in single_choice), None)
            if found is not None:
                self._single_on_route[name] = found

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        check_choices(ctx.body)
        if choices(ctx.body) > 1:
            self._refuse_choices(ctx)
        route_cap = self._route_caps.get(ctx.route) if ctx.route else None
        asked = requested_output(ctx.body) is not None
        if route_cap is not None:
            clamp_output(ctx.body, route_cap)
            ctx.output_ceiling_implied = not asked
        elif not asked and (ctx.route is None or ctx.route not in self._unsent):
            assert ctx.target is not None, "OutputCeiling runs after ResolveModel"
            ctx.body["max_tokens"] = self._model_caps[ctx.target.alias]
            ctx.output_ceiling_implied = True
        return await call_next(ctx)

    def _refuse_choices(self, ctx: RequestContext) -> None:
        assert ctx.target is not None
        alias = self._single_on_route.get(ctx.route or "") if ctx.route else None
        if alias is None and ctx.target.alias in self._single:
            alias = ctx.target.alias
        if alias is not None:
            where = f"route {ctx.route!r} may call {alias!r}, " if ctx.route else f"{alias!r} is "
            raise InvalidRequest(
                f"n={ctx.body['n']} is not supported: {where}an Anthropic model, which returns one "
                "choice per request; send n=1 (or omit it), or make n separate requests",
                param="n",
            )


def route_aliases(route: RouteSettings) -> list[str]:
    """Every model alias a request on the route may be sent to."""
    return [
        route.model,
        *route.fallbacks,
        *route.tiers,
        *route.pin.values(),
        *(v for g in route.gates for v in g.voters),
        *(route.router.models.values() if route.router else ()),
    ]


def output_ceiling(body: Mapping[str, object], model: ModelSettings) -> int:
    """Per choice: the request's cap, or the model's assumed maximum when none is sent."""
    return requested_output(body) or model.max_output_tokens


__all__ = [
    "OutputCeiling",
    "check_choices",
    "choices",
    "clamp_output",
    "output_ceiling",
    "requested_output",
    "route_aliases",
]
