"""Sticky assignment of a request to an arm of its route's experiment (pure).

A user (or, without one, the tenant) is hashed with the route and the experiment's salt to a
point in [0, 1); the arms own consecutive slices of that line in proportion to their weights.
The baseline's slice is last, so when a canary's weight grows, everyone already on the canary
stays there and only baseline users move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from thrifty.settings import ExperimentSettings, GateSettings, RouteSettings, VariantSettings

_SCALE = float(2**64)


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    weight: float
    model: str | None = None
    tiers: tuple[str, ...] = ()
    gates: tuple[GateSettings, ...] = ()
    prompt_version: str | None = None
    system_prompt: str | None = None

    @classmethod
    def of(cls, name: str, v: VariantSettings) -> Arm:
        return cls(name, v.weight, v.model, tuple(v.tiers), tuple(v.gates), v.prompt_version, v.system_prompt)


@dataclass(frozen=True, slots=True)
class RouteArms:
    """One route's arms as they stand (settings, then the last promote/stop/release on top)."""

    route: str
    baseline: str
    sticky_by: str
    salt: str
    arms: tuple[Arm, ...]  # the baseline last
    _cuts: tuple[float, ...] = field(default=())

    @classmethod
    def build(cls, route: str, baseline: str, sticky_by: str, salt: str, arms: list[Arm]) -> RouteArms:
        ordered = [a for a in arms if a.name != baseline] + [a for a in arms if a.name == baseline]
        total = sum(a.weight for a in ordered)
        cuts: list[float] = []
        running = 0.0
        for a in ordered:
            running += a.weight
            cuts.append(running / total if total > 0 else 0.0)
        return cls(route, baseline, sticky_by, salt, tuple(ordered), tuple(cuts))

    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.arms}

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def pick(self, tenant: str, user: str | None) -> Arm:
        key = user if self.sticky_by == "user" and user else tenant
        point = bucket(self.salt, self.route, key)
        for arm, cut in zip(self.arms, self._cuts, strict=True):
            if point < cut:
                return arm
        # Only reached when every weight is 0 (all stopped): the baseline answers.
        return self.arms[-1]


def bucket(salt: str, route: str, key: str) -> float:
    """A stable point in [0, 1) for (salt, route, key): the same user, the same arm, every time."""
    digest = hashlib.blake2b(f"{salt}\x00{route}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def settings_arms(route: str, experiment: ExperimentSettings) -> RouteArms:
    arms = [Arm.of(name, v) for name, v in experiment.variants.items()]
    return RouteArms.build(route, experiment.baseline_name(), experiment.sticky_by, experiment.salt, arms)


def with_state(
    route: str, base: RouteArms | None, route_model: str, state: Mapping[str, object]
) -> RouteArms:
    """The settings' arms with a stored state applied: its weights, and arms the state adds (a
    release's candidate: a fixed model). A route without an experiment gets its baseline arm
    `baseline` (the route as configured)."""
    weights = state.get("weights")
    models = state.get("models")
    weights = dict(weights) if isinstance(weights, dict) else {}
    models = dict(models) if isinstance(models, dict) else {}
    baseline = str(state.get("baseline") or (base.baseline if base else "baseline"))
    arms: dict[str, Arm] = {a.name: a for a in base.arms} if base else {}
    if baseline not in arms:
        arms[baseline] = Arm(baseline, 0.0)
    for name, model in models.items():
        if name not in arms:
            arms[name] = Arm(str(name), 0.0, model=str(model))
    out = [
        Arm(
            a.name,
            float(weights.get(a.name, a.weight)),
            a.model,
            a.tiers,
            a.gates,
            a.prompt_version,
            a.system_prompt,
        )
        for a in arms.values()
    ]
    sticky = base.sticky_by if base else "user"
    salt = base.salt if base else ""
    return RouteArms.build(route, baseline, sticky, salt, out)


def variant_route(route: RouteSettings, arm: Arm) -> RouteSettings:
    """The route as a cascade arm runs it: its tiers and gates in place of the route's."""
    return route.model_copy(
        update={"strategy": "cascade", "tiers": list(arm.tiers), "gates": list(arm.gates), "router": None}
    )


__all__ = ["Arm", "RouteArms", "bucket", "settings_arms", "variant_route", "with_state"]
