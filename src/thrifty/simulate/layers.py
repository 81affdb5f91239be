"""The savings stack as settings: the baseline, then each layer of the candidate switched on in order.

Pure: from the candidate (and optionally the current) settings to one `Settings` per step. Every
step is the candidate's own settings with the route fields of the layers not reached yet taken from
the baseline (the current settings' route, or the candidate's route with that layer off), so a
step differs from the one before it by exactly one layer and the marginal saving is that layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thrifty.settings import RouteSettings, Settings

# In the order the stack is reported; each with the route fields that make it up.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("dedup", "dedup of retries", ("coalesce",)),
    ("exact_cache", "exact cache", ("cache",)),
    ("semantic_cache", "semantic cache", ("semantic_cache",)),
    ("context", "context budgets", ("context",)),
    (
        "routing",
        "routing / cascades",
        ("model", "strategy", "tiers", "gates", "max_escalations", "include_rejected_draft", "router", "pin"),
    ),
    ("batch", "batch offload", ("defer",)),
)
# A route with every layer off: what a gateway without thrifty's savings would do.
_OFF: dict[str, Any] = {
    "coalesce": False,
    "cache": None,
    "semantic_cache": None,
    "context": None,
    "strategy": "fixed",
    "tiers": [],
    "gates": [],
    "max_escalations": None,
    "include_rejected_draft": False,
    "router": None,
    "pin": {},
    "defer": None,
}


@dataclass(frozen=True)
class Step:
    layer: str | None  # None: the baseline
    title: str
    settings: Settings
    send_idempotency_keys: bool
    changed: bool  # False: the candidate leaves this layer as the step before (nothing to run)


def _route_fields(route: RouteSettings, fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: getattr(route, f) for f in fields}


_LAYER_FIELDS = tuple(f for _, _, fields in LAYERS for f in fields)


def _baseline_route(name: str, candidate: RouteSettings, baseline: Settings | None) -> RouteSettings:
    """The candidate's route with its layer fields as the current settings have them (or off).
    Fields outside the layers (limits, fallbacks, prompt caching) are the candidate's in every
    step, so the last step is the candidate itself."""
    current = baseline.routes.get(name) if baseline is not None else None
    if current is not None:
        return candidate.model_copy(update=_route_fields(current, _LAYER_FIELDS))
    return candidate.model_copy(update={k: v for k, v in _OFF.items() if k != "model"})


def stack_steps(candidate: Settings, baseline: Settings | None = None) -> list[Step]:
    """The baseline and one step per layer. Without `baseline`, the baseline is the candidate with
    every layer off and no idempotency keys honoured (client retries generate again, as without a
    gateway); with it, the current settings' routes (thrifty honours keys there already)."""
    base_routes = {n: _baseline_route(n, r, baseline) for n, r in candidate.routes.items()}
    keys_at_base = baseline is not None
    steps = [Step(None, "baseline", _with_routes(candidate, base_routes), keys_at_base, True)]
    routes = dict(base_routes)
    for index, (layer, title, fields) in enumerate(LAYERS):
        before = dict(routes)
        routes = {
            name: routes[name].model_copy(update=_route_fields(candidate.routes[name], fields))
            for name in routes
        }
        # The dedup layer (the first) switches the idempotency keys on: every later step sends them.
        changed = routes != before or (index == 0 and not keys_at_base)
        steps.append(Step(layer, title, _with_routes(candidate, routes), True, changed))
    return steps


def _with_routes(settings: Settings, routes: dict[str, RouteSettings]) -> Settings:
    return settings.model_copy(update={"routes": routes})


__all__ = ["LAYERS", "Step", "stack_steps"]
