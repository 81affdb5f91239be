"""One route: its model and every per-route layer (limits, caches, routing, context, batch, ...)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict
from thrifty.settings.batch import DeferSettings
from thrifty.settings.caching import ExactCacheSettings, SemanticCacheSettings
from thrifty.settings.context import ContextSettings
from thrifty.settings.experiments import ExperimentSettings
from thrifty.settings.limits import BudgetSettings
from thrifty.settings.recording import RecordSettings
from thrifty.settings.routing import GateSettings, RouterArtifactSettings


class RouteSettings(_Strict):
    model: str
    max_input_tokens: int | None = Field(default=None, gt=0)
    # Server-side ceiling on max_tokens: the client's value is clamped to it, never trusted.
    max_output_tokens: int | None = Field(default=None, gt=0)
    # A request without max_tokens is sent the ceiling the guards reserve for (the model's
    # max_output_tokens). False forwards no cap: then max_output_tokens must be the model's real
    # maximum output, as that is what is reserved (OpenAI-compatible models only).
    send_output_ceiling: bool = True
    # Reject before the call when the worst-case cost of the request is above this.
    max_cost_per_request_usd: Decimal | None = Field(default=None, gt=0)
    budget: BudgetSettings | None = None
    # Merge identical in-flight requests of one tenant into one upstream call (deterministic routes).
    coalesce: bool = False
    # Agent loops: at most this many calls per `x-thrifty-session` on this route.
    max_steps_per_session: int | None = Field(default=None, ge=1)
    fallbacks: list[str] = Field(default_factory=list)  # model aliases tried in order when `model` fails
    max_retries: int | None = Field(default=None, ge=0)  # per target; default resilience.max_retries
    cache: ExactCacheSettings | None = None  # exact-match response cache for this route
    semantic_cache: SemanticCacheSettings | None = None  # paraphrases answered from the cache
    # Anthropic targets: mark the static prefix (tools, system prompt) for the provider's cache.
    prompt_cache: bool = False
    # How the model is chosen: `fixed` (always `model`), `classifier` (the trained router picks a
    # tier before the call), `cascade` (cheapest tier first, escalate when a quality gate fails).
    strategy: Literal["fixed", "classifier", "cascade"] = "fixed"
    tiers: list[str] = Field(default_factory=list)  # cascade: model aliases, cheapest first
    gates: list[GateSettings] = Field(default_factory=list)  # cascade: all must pass to accept a draft
    max_escalations: int | None = Field(default=None, ge=0)  # cascade: default len(tiers) - 1
    # cascade: the escalated call also sees the rejected draft and why it was rejected.
    include_rejected_draft: bool = False
    router: RouterArtifactSettings | None = None  # classifier, or a cascade the trained router drives
    # Task types (x-thrifty-task) that always go to one model, e.g. {"legal": "gpt-4o"}.
    pin: dict[str, str] = Field(default_factory=dict)
    # Per-section token budgets (system, developer, history, retrieved, tools, output).
    context: ContextSettings | None = None
    # Requests on this route are deferrable: accepted at once (202 + a job id), sent in a provider batch.
    defer: DeferSettings | None = None
    # Store (a sample of) the route's requests and answers, redacted, for `thrifty simulate`.
    record: RecordSettings | None = None
    # A/B or canary variants of this route (see docs/experiments.md).
    experiment: ExperimentSettings | None = None

    def cascade_tiers(self) -> list[str]:
        """The tiers a cascade may call, in order, within max_escalations."""
        limit = self.max_escalations if self.max_escalations is not None else len(self.tiers) - 1
        return self.tiers[: limit + 1]

    @model_validator(mode="after")
    def _strategy(self) -> RouteSettings:
        if self.strategy == "classifier" and self.router is None:
            raise ValueError("strategy classifier needs router (an artifact from `thrifty route train`)")
        if self.strategy == "cascade" and self.router is None and len(self.tiers) < 2:
            raise ValueError("strategy cascade needs tiers (two or more model aliases) or a trained router")
        if self.strategy == "fixed" and (self.tiers or self.gates):
            raise ValueError("tiers and gates apply to strategy cascade only")
        if any(g.kind == "router_scorer" for g in self.gates) and self.router is None:
            raise ValueError("a router_scorer gate needs router: {path: ...} (from `thrifty route train`)")
        return self
