"""Applying a route's experiment to a request: which arm, and what that arm changes.

Called by the resolver for requests on a route (one dict lookup for routes without arms), so it
costs nothing where no experiment runs; the arms themselves can change while the gateway serves
(a promote, a stop or a release step recorded by the CLI), which is why it is not a stage the
settings alone decide to include.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from thrifty.experiments.assign import RouteArms, settings_arms, with_state
from thrifty.pipeline import RequestContext
from thrifty.settings import RouteSettings
from thrifty.types import ModelTarget


class Experiments:
    def __init__(self, routes: Mapping[str, RouteSettings], targets: Mapping[str, ModelTarget]) -> None:
        self._routes = dict(routes)
        self._targets = dict(targets)
        self._configured = {
            name: settings_arms(name, r.experiment) for name, r in routes.items() if r.experiment is not None
        }
        self.arms: dict[str, RouteArms] = dict(self._configured)

    def apply_state(self, states: Mapping[str, Mapping[str, object]]) -> None:
        """Replace the arms with the settings' arms plus the stored state of each route."""
        arms = dict(self._configured)
        for route, state in states.items():
            if route not in self._routes:
                continue  # a route since removed from the settings
            arms[route] = with_state(route, self._configured.get(route), self._routes[route].model, state)
            for arm in arms[route].arms:
                if arm.model is not None and arm.model not in self._targets:
                    arms[route] = self._configured.get(route) or arms[route]
                    break
        self.arms = arms

    def apply(self, ctx: RequestContext) -> None:
        route = self.arms.get(ctx.route or "")
        if route is None:
            return
        arm = route.pick(ctx.tags.tenant_id, ctx.tags.user)
        ctx.variant = arm.name
        if arm.model is not None:
            ctx.target = self._targets[arm.model]
            ctx.route_plan = ""  # a fixed model: not the route's cascade
        elif arm.tiers:
            ctx.route_plan = f"{route.route}/{arm.name}"
        if arm.prompt_version is not None:
            ctx.tags = dataclasses.replace(ctx.tags, prompt_version=arm.prompt_version)
        if arm.system_prompt is not None:
            if ctx.client_body is None:
                ctx.client_body = ctx.body
            ctx.body = {
                **ctx.body,
                "messages": with_system(ctx.body.get("messages") or [], arm.system_prompt),
            }


def with_system(messages: list[Any], prompt: str) -> list[Any]:
    """The conversation with its system message replaced by (or started with) `prompt`."""
    rest = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    return [{"role": "system", "content": prompt}, *rest]


__all__ = ["Experiments", "with_system"]
