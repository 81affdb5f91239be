"""Resolve the request's `model` (an alias or `route:NAME`) to a concrete model target."""

from __future__ import annotations

from collections.abc import Mapping

from thrifty.errors import NotFound, PermissionDenied, UnpricedModel
from thrifty.experiments.stage import Experiments
from thrifty.pipeline import Handler, RequestContext, Result
from thrifty.settings import RouteSettings, TenantSettings
from thrifty.types import ModelTarget

ROUTE_PREFIX = "route:"


class ResolveModel:
    def __init__(
        self,
        targets: Mapping[str, ModelTarget],
        routes: Mapping[str, RouteSettings],
        tenants: Mapping[str, TenantSettings],
        *,
        refuse_unpriced: frozenset[str] = frozenset(),
        experiments: Experiments | None = None,
    ) -> None:
        self.experiments = experiments
        self._targets = dict(targets)
        # Aliases without a known price, refused only when settings say pricing.reject_unpriced.
        self._refuse_unpriced = refuse_unpriced
        self._routes = dict(routes)
        self._allowed = {
            name: frozenset(t.allowed_models) for name, t in tenants.items() if t.allowed_models is not None
        }

    def resolve(self, requested: str) -> tuple[str | None, ModelTarget]:
        if requested.startswith(ROUTE_PREFIX):
            name = requested.removeprefix(ROUTE_PREFIX)
            route = self._routes.get(name)
            if route is None:
                known = ", ".join(sorted(self._routes)) or "none configured"
                raise NotFound(
                    f"unknown route {name!r} (known routes: {known})", param="model", code="route_not_found"
                )
            return name, self._targets[route.model]
        target = self._targets.get(requested)
        if target is None:
            known = ", ".join(sorted(self._targets))
            raise NotFound(f"unknown model {requested!r}; use one of: {known}, or route:NAME", param="model")
        return None, target

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        allowed = self._allowed.get(ctx.tags.tenant_id)
        if allowed is not None and ctx.requested_model not in allowed:
            raise PermissionDenied(
                f"tenant {ctx.tags.tenant_id!r} may not use {ctx.requested_model!r}; "
                f"allowed: {', '.join(sorted(allowed))}",
                param="model",
            )
        ctx.route, ctx.target = self.resolve(ctx.requested_model)
        if ctx.route is not None and self.experiments is not None and self.experiments.arms:
            self.experiments.apply(ctx)
        if ctx.target.alias in self._refuse_unpriced:
            raise UnpricedModel(
                f"model {ctx.target.alias!r} has no known price and pricing.reject_unpriced is set; "
                f"add models.{ctx.target.alias}.price to the settings",
                param="model",
            )
        return await call_next(ctx)
