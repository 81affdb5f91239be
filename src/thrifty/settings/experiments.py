"""A/B and canary experiments on a route: variants, the stop rule, how fast CLI steps apply."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict
from thrifty.settings.routing import GateSettings


class StopRuleSettings(_Strict):
    """The sequential test that stops a variant whose failure rate is worse than the baseline's by
    more than `margin` (absolute: 0.005 is half a point), with a false-stop rate of at most `alpha`
    however often it is checked (a mixture SPRT; see docs/experiments.md)."""

    margin: float = Field(default=0.0, ge=0, lt=1)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    # The mixture's scale: the size of difference the test is tuned to find fastest.
    tau: float = Field(default=0.02, gt=0, lt=1)
    min_requests: int = Field(default=100, ge=1)  # per arm, before the test may stop anything


class VariantSettings(_Strict):
    """One arm of an experiment: the route as configured, or with its model, prompt version, system
    prompt or cascade tiers replaced."""

    weight: float = Field(ge=0)
    model: str | None = None  # a fixed model for this arm
    tiers: list[str] = Field(default_factory=list)  # a cascade for this arm, cheapest first
    gates: list[GateSettings] = Field(default_factory=list)  # the cascade's quality gates
    prompt_version: str | None = None  # recorded as the request's prompt version
    system_prompt: str | None = None  # replaces (or adds) the request's system message

    @model_validator(mode="after")
    def _one_kind(self) -> VariantSettings:
        if self.model is not None and self.tiers:
            raise ValueError("a variant sets model or tiers (a cascade), not both")
        if self.tiers and len(self.tiers) < 2:
            raise ValueError("a cascade variant needs two or more tiers")
        if self.gates and not self.tiers:
            raise ValueError("gates apply to a cascade variant (give tiers)")
        return self


class ExperimentSettings(_Strict):
    """Variants of a route with weights (A/B or canary), assigned sticky by a hash of the user."""

    variants: dict[str, VariantSettings]
    baseline: str | None = None  # the arm the others are compared with; default the first
    sticky_by: Literal["user", "tenant"] = "user"  # requests without a user fall back to the tenant
    salt: str = ""  # change it to reshuffle who gets which arm
    stop: StopRuleSettings = Field(default_factory=StopRuleSettings)
    # Feedback labels that count a request as failed (besides correct: false and errors).
    failure_labels: list[str] = Field(default_factory=lambda: ["wrong", "bad", "cache_wrong"])
    # Feedback scores below this count as failed (unset: scores are reported, not judged).
    min_score: float | None = None

    @model_validator(mode="after")
    def _arms(self) -> ExperimentSettings:
        if not self.variants:
            raise ValueError("an experiment needs at least one variant")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants")
        if sum(v.weight for v in self.variants.values()) <= 0:
            raise ValueError("the variants' weights must add up to more than 0")
        for name in self.variants:
            if not name or "/" in name or not name.isprintable() or len(name) > 64:
                raise ValueError(f"variant name {name!r}: 1-64 printable characters, no '/'")
        return self

    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.variants))


class ExperimentsSettings(_Strict):
    # How soon a promote, stop or release step recorded by the CLI reaches a running gateway.
    refresh_s: float = Field(default=5.0, gt=0)
