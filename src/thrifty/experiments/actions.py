"""Recorded actions on a route's arms: promote, stop, the stop rule's check, and setting weights
(a release's canary). Each writes the arms it leaves and its log line in one transaction; a
running gateway picks the arms up within `experiments.refresh_s`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thrifty.errors import InvalidData
from thrifty.experiments.assign import RouteArms, settings_arms, with_state
from thrifty.experiments.stats import ArmStats, FailureRule, arm_stats, stop_decisions
from thrifty.experiments.stoprule import StopDecision
from thrifty.experiments.store import ExperimentStore
from thrifty.settings import Settings, StopRuleSettings


def route_arms(settings: Settings, store: ExperimentStore, route: str) -> RouteArms:
    r = settings.routes.get(route)
    if r is None:
        known = ", ".join(sorted(settings.routes)) or "none"
        raise InvalidData(f"there is no route {route!r} (routes: {known})")
    base = settings_arms(route, r.experiment) if r.experiment is not None else None
    state = store.state(route)
    if state is None:
        if base is None:
            raise InvalidData(
                f"route {route!r} has no experiment: give it experiment.variants in the settings, "
                f"or start one with `thrifty release plan {route} --candidate MODEL`"
            )
        return base
    return with_state(route, base, r.model, state)


def state_of(arms: RouteArms) -> dict[str, Any]:
    return {
        "baseline": arms.baseline,
        "weights": arms.weights(),
        "models": {a.name: a.model for a in arms.arms if a.model is not None},
    }


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    route: str
    baseline: str
    weights: dict[str, float]
    stats: dict[str, ArmStats]
    decisions: dict[str, StopDecision]

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "baseline": self.baseline,
            "weights": self.weights,
            "variants": [
                {
                    **s.to_json(),
                    "weight": self.weights.get(name, 0.0),
                    "stop_rule": None
                    if name not in self.decisions
                    else {
                        "stop": self.decisions[name].stop,
                        "difference": round(self.decisions[name].difference, 6),
                        "interval": [round(self.decisions[name].low, 6), round(self.decisions[name].high, 6)],
                        "reason": self.decisions[name].reason,
                    },
                }
                for name, s in self.stats.items()
            ],
        }


def report(settings: Settings, store: ExperimentStore, route: str) -> ExperimentReport:
    arms = route_arms(settings, store, route)
    experiment = settings.routes[route].experiment
    rule = experiment.stop if experiment is not None else StopRuleSettings()
    stats = arm_stats(store.variant_rows(route), FailureRule.of(experiment), [a.name for a in arms.arms])
    return ExperimentReport(
        route, arms.baseline, arms.weights(), stats, stop_decisions(stats, arms.baseline, rule)
    )


def _arm(arms: RouteArms, variant: str) -> None:
    if arms.arm(variant) is None:
        known = ", ".join(a.name for a in arms.arms)
        raise InvalidData(f"route {arms.route!r} has no variant {variant!r} (variants: {known})")


def promote(settings: Settings, store: ExperimentStore, route: str, variant: str, reason: str) -> RouteArms:
    """All traffic to `variant`, which becomes the baseline."""
    arms = route_arms(settings, store, route)
    _arm(arms, variant)
    state = state_of(arms)
    state["weights"] = {name: (1.0 if name == variant else 0.0) for name in state["weights"]}
    state["baseline"] = variant
    store.record(route, "promote", reason, variant=variant, state=state)
    return route_arms(settings, store, route)


def stop(
    settings: Settings,
    store: ExperimentStore,
    route: str,
    variant: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> RouteArms:
    """No more traffic to `variant`; its users go back to the others."""
    arms = route_arms(settings, store, route)
    _arm(arms, variant)
    if variant == arms.baseline:
        raise InvalidData(f"{variant!r} is the baseline of route {route!r}: promote another variant instead")
    state = state_of(arms)
    state["weights"][variant] = 0.0
    if not any(w > 0 for w in state["weights"].values()):
        state["weights"][arms.baseline] = 1.0
    store.record(route, "stop", reason, variant=variant, details=details, state=state)
    return route_arms(settings, store, route)


def set_weights(
    settings: Settings,
    store: ExperimentStore,
    route: str,
    weights: dict[str, float],
    reason: str,
    *,
    models: dict[str, str] | None = None,
    baseline: str | None = None,
    action: str = "weights",
    release: dict[str, Any] | None = None,
    clear_release: bool = False,
) -> None:
    r = settings.routes[route]
    base = settings_arms(route, r.experiment) if r.experiment is not None else None
    state = store.state(route) or (
        state_of(base) if base else {"baseline": "baseline", "weights": {}, "models": {}}
    )
    state = {**state, "weights": {**state.get("weights", {}), **weights}}
    if models:
        state["models"] = {**state.get("models", {}), **models}
    if baseline is not None:
        state["baseline"] = baseline
    store.record(route, action, reason, state=state, release=release, clear_release=clear_release)


def check(settings: Settings, store: ExperimentStore, route: str) -> tuple[ExperimentReport, list[str]]:
    """Run the stop rule on every live arm; stop (and record) those it says to stop."""
    found = report(settings, store, route)
    stopped = []
    for name, decision in found.decisions.items():
        if decision.stop and found.weights.get(name, 0.0) > 0:
            stop(
                settings,
                store,
                route,
                name,
                "stop rule: " + decision.reason,
                details={
                    "stats": found.stats[name].to_json(),
                    "baseline": found.stats[found.baseline].to_json(),
                }
                if found.baseline in found.stats
                else {"stats": found.stats[name].to_json()},
            )
            stopped.append(name)
    if stopped:
        found = report(settings, store, route)
    return found, stopped


__all__ = ["ExperimentReport", "check", "promote", "report", "route_arms", "set_weights", "state_of", "stop"]
