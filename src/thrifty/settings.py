"""One settings object, loaded from a YAML file and passed down; never read from globals.

Secrets are the only thing taken from the environment, and only under names the file gives
(`api_key_env`); they are resolved once at start by `resolve_secrets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from thrifty.errors import ConfigError

ProviderKind = Literal["openai", "anthropic", "replay"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderSettings(_Strict):
    kind: ProviderKind
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # Anthropic only: the API version header.
    anthropic_version: str = "2023-06-01"
    # Replay only: ZeroEval-format JSONL files or directories, thrifty recordings, or a recording set
    # shipped with thrifty (`builtin:quickstart`). Relative paths are relative to the settings file.
    data: list[str] = Field(default_factory=list)
    stream_chunk_chars: int = Field(default=24, ge=1)
    # Batch items of models without a batch price in genai-prices are charged the real-time price
    # less this fraction (0.5: half price); unset, they are charged the real-time price (said at start).
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1)

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderSettings:
        if self.kind in ("openai", "anthropic") and not self.base_url:
            raise ValueError(f"base_url is required for a provider of kind {self.kind!r}")
        if self.kind == "replay" and not self.data:
            raise ValueError("data is required for a replay provider (JSONL files or directories)")
        return self


class PriceOverride(_Strict):
    """USD per million tokens. `flat_per_mtok` prices every token alike (self-hosted models)."""

    input_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_per_mtok: Decimal | None = Field(default=None, ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_1h_per_mtok: Decimal | None = Field(default=None, ge=0)  # default: cache_write_per_mtok
    flat_per_mtok: Decimal | None = Field(default=None, ge=0)
    # Self-hosted by GPU time: what the GPU costs an hour and the tokens (input + output) it serves an
    # hour at full load (`thrifty release advance` measures it in its bench step); each token costs
    # gpu_usd_per_hour / (gpu_tokens_per_hour x gpu_utilisation), the share of hours the GPU is busy.
    gpu_usd_per_hour: Decimal | None = Field(default=None, gt=0)
    gpu_tokens_per_hour: int | None = Field(default=None, gt=0)
    gpu_utilisation: Decimal = Field(default=Decimal(1), gt=0, le=1)

    @model_validator(mode="after")
    def _complete(self) -> PriceOverride:
        if (self.gpu_usd_per_hour is None) != (self.gpu_tokens_per_hour is None):
            raise ValueError("GPU-time pricing needs both gpu_usd_per_hour and gpu_tokens_per_hour")
        if self.gpu_usd_per_hour is not None:
            if self.flat_per_mtok is not None or self.input_per_mtok is not None:
                raise ValueError("price a model by GPU time or per token, not both")
            return self
        if self.flat_per_mtok is None and (self.input_per_mtok is None or self.output_per_mtok is None):
            raise ValueError(
                "give flat_per_mtok, or both input_per_mtok and output_per_mtok "
                "(or, self-hosted by GPU time, gpu_usd_per_hour with gpu_tokens_per_hour)"
            )
        return self

    def gpu_flat_per_mtok(self) -> Decimal | None:
        """USD per million tokens implied by GPU time at the assumed utilisation."""
        if self.gpu_usd_per_hour is None or self.gpu_tokens_per_hour is None:
            return None
        return (
            self.gpu_usd_per_hour
            * Decimal(1_000_000)
            / (Decimal(self.gpu_tokens_per_hour) * self.gpu_utilisation)
        )


class BudgetSettings(_Strict):
    """Limits per UTC day and/or month, in USD and/or tokens (input + output). All optional."""

    usd_per_day: Decimal | None = Field(default=None, ge=0)
    usd_per_month: Decimal | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)


class RateLimitSettings(_Strict):
    """Per tenant, over the last 60 s. Tokens are counted as OpenAI does: prompt + max output."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class FeatureSettings(_Strict):
    budget: BudgetSettings | None = None


class ModelSettings(_Strict):
    provider: str
    upstream: str | None = None  # the provider's model id; defaults to the alias
    context_window: int | None = Field(default=None, gt=0)
    tokenizer: str | None = None  # o200k_base | cl100k_base; guessed from the name when absent
    price: PriceOverride | None = None
    price_model: str | None = None  # the genai-prices model ref, when it differs from `upstream`
    price_provider: str | None = None  # the genai-prices provider id
    # Assumed output ceiling when neither the client nor the route sets one (worst-case cost).
    max_output_tokens: int = Field(default=4096, gt=0)


class ExactCacheSettings(_Strict):
    enabled: bool = True
    ttl_s: float = Field(default=3600.0, gt=0)
    per_user: bool = False  # answers are personal: key them by x-thrifty-user too
    # Sampled answers (temperature > 0) differ on purpose; cache them only when asked to.
    any_temperature: bool = False


REDACT_PRESETS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "card_number": r"\b(?:\d[ -]?){12,18}\d\b",
    "phone": r"\+?\d[\d ()-]{7,}\d",
}


class RedactRule(_Strict):
    """One redaction applied before a recording is written: exactly one of `regex` (every match in
    every string of the request and the response), `preset` (a built-in regex) or `field` (a
    request body field removed, dotted, `*` for every item of a list: `user`, `metadata.email`,
    `messages.*.name`; `user` also drops the recorded user attribution)."""

    regex: str | None = None
    preset: Literal["email", "card_number", "phone"] | None = None
    field: str | None = None
    replace: str = "[redacted]"

    @model_validator(mode="after")
    def _one(self) -> RedactRule:
        given = [k for k in ("regex", "preset", "field") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a redact rule has exactly one of regex, preset, field")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex {self.regex!r} does not compile: {err}") from err
        if self.field is not None and (not self.field.strip() or self.field.startswith(".")):
            raise ValueError(f"field {self.field!r}: name a request body field, e.g. user or metadata.email")
        return self

    @property
    def pattern(self) -> str | None:
        return REDACT_PRESETS[self.preset] if self.preset is not None else self.regex


class RecordSettings(_Strict):
    """Per route, opt-in: store a sample of its requests and answers (redacted) for replays."""

    sample: float = Field(default=1.0, ge=0, le=1)
    redact: list[RedactRule] = Field(default_factory=list)


class CacheVerifySettings(_Strict):
    """Live verification of semantic hits, and per-partition thresholds that hold a wrong-hit bound
    (cache/semantic/adaptive.py and verify.py)."""

    enabled: bool = True
    # The share of paraphrase hits allowed to be wrong, held with `confidence` (one-sided).
    error_bound: float = Field(default=0.01, gt=0, lt=0.5)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    # Share of paraphrase hits verified by a shadow call: max_rate while little is known or right
    # after a wrong hit was found, falling to min_rate as the evidence grows.
    min_rate: float = Field(default=0.02, ge=0, le=1)
    max_rate: float = Field(default=0.1, gt=0, le=1)
    # How a fresh answer is compared with the cached one: evidence (the request's
    # x-thrifty-evidence ids against the entry's; no upstream call), text (normalised text equal),
    # json_field (one field of a JSON answer equal), judge (the question with both answers sent to
    # `judge_route`, whose yes/no says whether they are the same answer; its own ledger entry, role
    # judge). A request without evidence ids falls back to text under `evidence`.
    compare: Literal["evidence", "text", "json_field", "judge"] = "text"
    json_field: str | None = None  # compare: json_field, a dotted path ("intent", "answer.label")
    judge_route: str | None = None  # compare: judge, a route of these settings (a cheap model)
    # Shadow calls in flight at once; a hit sampled beyond this is not verified (and not counted).
    max_in_flight: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _field_named(self) -> CacheVerifySettings:
        if self.compare == "json_field" and not self.json_field:
            raise ValueError("verify.compare json_field needs verify.json_field: the field to compare")
        if self.compare == "judge" and not self.judge_route:
            raise ValueError("verify.compare judge needs verify.judge_route: the route that judges")
        if self.min_rate > self.max_rate:
            raise ValueError(f"verify.min_rate {self.min_rate} is above verify.max_rate {self.max_rate}")
        return self


class SemanticCacheSettings(_Strict):
    """Answers a paraphrase of an earlier question from the cache (see cache/semantic/stage.py)."""

    enabled: bool = True
    ttl_s: float = Field(default=86400.0, gt=0)
    # Decision parameters written by `thrifty cache tune --out`; the built-in ones (learned on
    # Banking77) when absent. Relative paths are relative to the settings file.
    params: str | None = None
    # Overrides the learned probability threshold: higher answers less often and more safely.
    threshold: float | None = Field(default=None, gt=0, le=1)
    per_user: bool = False
    any_temperature: bool = False
    # Entries per route; the oldest are dropped beyond this (bounded memory over days).
    max_entries: int = Field(default=100_000, ge=1)
    # Below this many entries a partition answers only repeats of a cached question (up to case,
    # spacing and punctuation): in a sparse cache the nearest entry is often a neighbouring
    # question nobody cached yet, and the learned rule, tuned on a dense cache, would trust it.
    min_entries: int = Field(default=1000, ge=0)
    # Bump when the safety policy changes: answers given under an older policy are not served.
    safety_policy_version: str = "1"
    # Sampled shadow calls that check hits, and thresholds that move to hold a wrong-hit bound on
    # this route's own traffic (off when absent: the shipped rule as it is).
    verify: CacheVerifySettings | None = None


class SectionBudget(_Strict):
    """A token budget for one section of a prompt and what happens when a request is over it."""

    budget: int = Field(gt=0)
    # reject: 400 naming the section; trim: shorten it (history: drop the oldest turns; retrieved:
    # pack the best evidence; tools: shorten tool results structurally; output: clamp max_tokens);
    # compact (history only): summarise older turns; warn (system/developer only): pass, noted.
    over: Literal["reject", "trim", "compact", "warn"] | None = None


class HistoryBudget(SectionBudget):
    summary_route: str | None = None  # compact: the (cheap) route whose model writes the summaries
    summary_tokens: int = Field(default=300, gt=0)  # compact: the summary's max_tokens
    # compact: the share of the room beside the summary a new summary leaves to verbatim turns; the
    # rest is headroom for the turns to come. Lower: fewer summary calls, fewer turns kept verbatim.
    verbatim_share: float = Field(default=0.5, gt=0, le=1)
    # compact: a new summary also leaves headroom for this many turns of the chat's average size, so
    # a chat is summarised at most about once every so many turns (fewer verbatim turns if needed).
    turns_per_summary: int = Field(default=4, ge=1, le=100)


class OutputBudget(SectionBudget):
    # Ask the model to plan a short answer instead of being cut off at max_tokens: true for the
    # built-in sentence, or your own text ("{budget}" is replaced by the budget).
    brevity: bool | str = False


class ContextSettings(_Strict):
    """Per-section token budgets of a route (see context/). Sections left out are not limited."""

    system: SectionBudget | None = None
    developer: SectionBudget | None = None
    history: HistoryBudget | None = None
    retrieved: SectionBudget | None = None
    tools: SectionBudget | None = None
    output: OutputBudget | None = None

    @model_validator(mode="after")
    def _policies(self) -> ContextSettings:
        allowed = {
            "system": ("reject", "warn"),
            "developer": ("reject", "warn"),
            "history": ("reject", "trim", "compact"),
            "retrieved": ("reject", "trim"),
            "tools": ("reject", "trim"),
            "output": ("reject", "trim"),
        }
        for name, choices in allowed.items():
            section = getattr(self, name)
            if section is not None and section.over is not None and section.over not in choices:
                why = " (thrifty never rewrites a system prompt)" if name in ("system", "developer") else ""
                raise ValueError(f"{name}.over must be one of {', '.join(choices)}{why}")
        history = self.history
        if history is not None and history.over == "compact" and not history.summary_route:
            raise ValueError("history.over: compact needs history.summary_route (a cheap route)")
        if history is not None and history.over == "compact" and history.summary_tokens >= history.budget:
            raise ValueError("history.summary_tokens must be smaller than history.budget")
        return self

    def policy(self, section: str) -> str:
        """The section's over-budget policy, with the defaults filled in."""
        budget: SectionBudget | None = getattr(self, section)
        if budget is None:
            return "none"
        if budget.over is not None:
            return budget.over
        return "reject" if section in ("system", "developer") else "trim"


GateKind = Literal[
    "json_schema",
    "pydantic",
    "agreement",
    "router_scorer",
    "logprob",
    "self_confidence",
    "python",
    "self_consistency",
]


class GateSettings(_Strict):
    """One quality check of a cascade tier's draft; a route's gates must all pass to accept it."""

    kind: GateKind
    # json_schema: the JSON schema the reply (parsed as JSON) must satisfy.
    json_schema: dict[str, Any] | None = None
    # pydantic: "package.module:Model"; python: "package.module:function(request, response)".
    target: str | None = None
    # agreement / self_confidence: the field of the JSON reply compared or read ("answer", "confidence");
    # agreement without a field compares the whole normalised reply.
    field: str | None = None
    voters: list[str] = Field(default_factory=list)  # agreement: model aliases asked the same question
    # agreement: voters that must agree (default all); self_consistency: samples that must agree
    # (default a majority of `samples`).
    min_agree: int | None = Field(default=None, ge=1)
    # self_consistency: the draft tier is sampled this many times (one call with n where the
    # provider has it, else that many calls); the draft is accepted when min_agree answers agree.
    samples: int | None = Field(default=None, ge=2, le=16)
    # router_scorer / logprob / self_confidence: the lowest probability or confidence accepted.
    threshold: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _complete(self) -> GateSettings:
        needs: dict[str, tuple[str, object]] = {
            "json_schema": ("json_schema", self.json_schema),
            "pydantic": ("target", self.target),
            "python": ("target", self.target),
            "agreement": ("voters", self.voters),
            "logprob": ("threshold", self.threshold),
            "self_confidence": ("threshold", self.threshold),
        }
        if self.kind in needs and not needs[self.kind][1]:
            raise ValueError(f"a {self.kind} gate needs {needs[self.kind][0]}")
        if self.kind == "self_confidence" and not self.field:
            raise ValueError("a self_confidence gate needs field (the JSON reply's confidence field)")
        if self.kind == "self_consistency":
            if self.samples is None:
                raise ValueError("a self_consistency gate needs samples (how many times to sample the draft)")
            if self.min_agree is not None and self.min_agree > self.samples:
                raise ValueError(f"self_consistency: min_agree {self.min_agree} > samples {self.samples}")
        return self


class RouterArtifactSettings(_Strict):
    """A router trained by `thrifty route train`."""

    path: str
    task: str | None = None  # the task the artifact was calibrated on; unknown tasks are routed cautiously
    # The artifact's model ids (as in the training data) -> this gateway's model aliases.
    models: dict[str, str] = Field(default_factory=dict)


_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> float:
    """'24h', '30m', '2d', '90s' -> seconds; raises ValueError naming the accepted forms."""
    text = text.strip().lower()
    if len(text) >= 2 and text[-1] in _WINDOW_UNITS and text[:-1].isdigit() and int(text[:-1]) > 0:
        return float(int(text[:-1]) * _WINDOW_UNITS[text[-1]])
    raise ValueError(f"{text!r} is not a time window; give a number and a unit: 90s, 30m, 24h, 2d")


class DeferSettings(_Strict):
    """Latency-tolerant work: answered later, through the providers' batch APIs at batch prices."""

    after: str = "24h"  # the longest the caller is willing to wait (the providers' window is 24h)
    max_batch: int = Field(default=1000, ge=1)  # flush the queue into a provider batch at this many
    max_age_s: float = Field(default=300.0, ge=0)  # ... or when its oldest request waited this long
    webhook_url: str | None = None  # POSTed the job with its answer when it is done

    @model_validator(mode="after")
    def _window(self) -> DeferSettings:
        if self.max_age_s >= parse_window(self.after):
            raise ValueError(
                f"max_age_s ({self.max_age_s:g}) must be shorter than the window after ({self.after})"
            )
        return self


class BatchSettings(_Strict):
    poll_interval_s: float = Field(default=30.0, gt=0)  # how often submitted provider batches are polled
    max_lines: int = Field(default=50_000, ge=1)  # per input file (OpenAI's limit)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)  # per input file (OpenAI's limit)
    # Where uploaded input files are kept; default: a folder beside the SQLite file.
    files_dir: str | None = None
    defer: DeferSettings = Field(default_factory=DeferSettings)  # for requests with x-thrifty-defer
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # How long a runner's claim on a piece of work (validating a job, a provider batch, a webhook)
    # lasts without renewal: after a crash, another process (or the restarted one) takes it over then.
    lease_s: float = Field(default=30.0, gt=0)


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


class TenantSettings(_Strict):
    # sha256 hex digests of virtual keys; keys made by `thrifty keys create` live in the store.
    key_hashes: list[str] = Field(default_factory=list)
    allowed_models: list[str] | None = None  # aliases or route:NAME; None means all
    budget: BudgetSettings | None = None
    features: dict[str, FeatureSettings] = Field(default_factory=dict)  # per-feature budgets
    rate_limit: RateLimitSettings | None = None


class StorageSettings(_Strict):
    # sqlite:///PATH (embedded default) or postgresql://USER@HOST:PORT/DB (several replicas).
    url: str = "sqlite:///thrifty.db"
    # NORMAL survives a killed process (WAL); FULL also survives power loss, at an fsync per batch.
    synchronous: Literal["normal", "full"] = "normal"
    ledger_batch_max: int = Field(default=512, ge=1)
    # PostgreSQL only: completed rows go here (fsynced) while the database is unreachable and are
    # replayed when it returns; the per-replica SQLite file for what is not shared (semantic cache).
    spool_path: str = "thrifty-ledger.spool.jsonl"
    local_path: str = "thrifty-local.db"
    pool_size: int = Field(default=8, ge=1)
    key_refresh_s: float = Field(default=2.0, gt=0)  # keys created or revoked elsewhere apply this soon

    @model_validator(mode="after")
    def _known_url(self) -> StorageSettings:
        if not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"url must be sqlite:///PATH or postgresql://..., got {self.url!r}")
        return self

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url.startswith("sqlite:///") else "postgresql"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: the whole store, or with PostgreSQL the per-replica local file."""
        if self.backend == "postgresql":
            return Path(self.local_path)
        return Path(self.url.removeprefix("sqlite:///"))


class SharedStateSettings(_Strict):
    """Redis for what several replicas must share atomically (budgets, rate limits)."""

    url: str | None = None  # redis://HOST:PORT/DB; unset: in-process state (one replica)
    prefix: str = "thrifty:"  # key prefix, so several deployments can share one Redis
    # Redis unreachable: refuse with a 503 naming Redis, or fall back to per-replica limits.
    fault_mode: Literal["fail_closed", "degrade_local"] = "fail_closed"
    timeout_s: float = Field(default=0.5, gt=0)
    # A reservation its replica never settled (it died) is released after this long.
    reservation_lease_s: float = Field(default=900.0, gt=0)
    # How often a replica reads the breakers other replicas opened (off the request path).
    breaker_poll_s: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _known_url(self) -> SharedStateSettings:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be redis://HOST:PORT/DB, got {self.url!r}")
        return self


class ExperimentsSettings(_Strict):
    # How soon a promote, stop or release step recorded by the CLI reaches a running gateway.
    refresh_s: float = Field(default=5.0, gt=0)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)


class ResilienceSettings(_Strict):
    max_retries: int = Field(default=2, ge=0)  # per target, for routes that do not set their own
    retry_base_s: float = Field(default=0.25, ge=0)  # backoff: base x 2^n, full jitter
    retry_max_s: float = Field(default=8.0, ge=0)  # also caps a provider's Retry-After
    retry_budget_per_minute: int = Field(default=60, ge=0)  # extra calls per target per minute
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open the circuit
    breaker_cooldown_s: float = Field(default=30.0, gt=0)  # open this long, then one probe


class AlertSettings(_Strict):
    webhook_url: str | None = None  # Slack-compatible incoming webhook; alerts are stored either way
    budget_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    anomaly_check_s: float = Field(default=60.0, gt=0)  # how often spend and rate anomalies are checked
    spend_spike_factor: float = Field(default=2.0, gt=1)  # feature's last hour vs the 7-day median
    rate_spike_factor: float = Field(default=10.0, gt=1)  # tenant's last hour vs the 7-day median
    # Drift watch of routes a trained router drives as a cascade: an alert when a route's
    # escalation rate over the last window departs from its calibrated rate by more than the margin.
    escalation_drift_margin: float = Field(default=0.15, gt=0, lt=1)
    escalation_drift_window_s: float = Field(default=3600.0, gt=0)
    escalation_drift_min_requests: int = Field(default=50, ge=1)


class IdempotencySettings(_Strict):
    ttl_s: float = Field(default=86400.0, gt=0)  # how long a finished result answers repeats
    # Finished results kept (oldest dropped beyond this); also the most keys running at once in
    # one process: a running key is never dropped, a new key past it is refused (503).
    max_entries: int = Field(default=10000, ge=1)
    # The longest a live gateway holds a running key (or a coalesced flight) before a repeat may
    # generate anew; longer than the slowest request (timeouts x retries).
    lease_s: float = Field(default=600.0, gt=0)
    # The lease a running key or flight is actually written with, renewed every third of it while
    # its owner works (up to `lease_s`): when the owner dies, a repeat waits at most this long
    # instead of `lease_s`. Above a Redis round trip or an SQLite write under load by far.
    flight_lease_s: float = Field(default=15.0, ge=0.3, le=3600)

    @model_validator(mode="after")
    def _flight_lease_within_lease(self) -> IdempotencySettings:
        if "flight_lease_s" in self.model_fields_set and self.flight_lease_s > self.lease_s:
            raise ValueError(
                f"idempotency.flight_lease_s ({self.flight_lease_s:g}) must not exceed "
                f"idempotency.lease_s ({self.lease_s:g})"
            )
        return self

    @property
    def running_lease_s(self) -> float:
        """The renewed lease: `flight_lease_s`, or `lease_s` when that is set shorter (and the
        short lease is the default)."""
        return min(self.flight_lease_s, self.lease_s)


class SemanticSettings(_Strict):
    """The semantic cache's shared embedding model (routes switch the cache on with semantic_cache)."""

    # Worker threads for query embeddings (onnxruntime releases the GIL): each does ~200 queries/s.
    embed_threads: int = Field(default=1, ge=1, le=64)
    # Routes that verify hits: how often what verification learned per partition is written to the
    # SQLite file (for `thrifty cache stats` and restarts); it is always written at shutdown.
    state_flush_s: float = Field(default=2.0, ge=0)
    # Semantic hits of routes that verify are kept this long (7 days), so feedback on one
    # (`x-thrifty-cache-wrong`) is matched after a restart or on another replica; older feedback
    # matches nothing.
    hit_retention_s: float = Field(default=7 * 86400.0, gt=0)


class PricingSettings(_Strict):
    reject_unpriced: bool = False


class DashboardSettings(_Strict):
    """`GET /dashboard`: read-only over the ledger. A tenant's virtual key sees its own tenant."""

    enabled: bool = True
    # sha256 hex digests of admin keys (`printf %s KEY | sha256sum`): they see every tenant, and
    # /metrics. Any string works as an admin key; make it long and random.
    admin_key_hashes: list[str] = Field(default_factory=list)
    top_n: int = Field(default=10, ge=1, le=1000)  # rows in the top features / tenants / users tables
    explorer_rows: int = Field(default=50, ge=1, le=1000)  # requests per explorer page
    # How often the gateway looks for new ledger rows to fold into the rollups (off the requests'
    # path); it folds once `fold_min_rows` wait or the last fold is `fold_max_age_s` old. The page is
    # exact either way (rows not folded yet are read from the ledger); these bound that tail.
    fold_interval_s: float = Field(default=1.0, gt=0, le=3600)
    fold_min_rows: int = Field(default=2000, ge=0)
    fold_max_age_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _hashes(self) -> DashboardSettings:
        for h in self.admin_key_hashes:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"admin_key_hashes: {h!r} is not a sha256 hex digest")
        return self


class MetricsSettings(_Strict):
    """`GET /metrics` in Prometheus' text format, updated from each committed ledger batch."""

    enabled: bool = True
    # Distinct values kept per label (tenant, feature, route, model); later ones count as "other".
    max_label_values: int = Field(default=50, ge=1)
    # Spend per tenant is not for everyone: scrapes send an admin key (Bearer) unless this is off.
    require_admin_key: bool = True


class TracingSettings(_Strict):
    """OpenTelemetry spans per request, one child per upstream attempt (`pip install thrifty[otel]`)."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP over HTTP
    service_name: str = "thrifty"


class Settings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    shared_state: SharedStateSettings = Field(default_factory=SharedStateSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    budget: BudgetSettings | None = None  # the whole organisation
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    semantic: SemanticSettings = Field(default_factory=SemanticSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    experiments: ExperimentsSettings = Field(default_factory=ExperimentsSettings)
    providers: dict[str, ProviderSettings]
    models: dict[str, ModelSettings]
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for alias, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(
                    f"models.{alias}.provider: unknown provider {model.provider!r} "
                    f"(known: {', '.join(sorted(self.providers)) or 'none'})"
                )
        for name, route in self.routes.items():
            if route.model not in self.models:
                raise ValueError(f"routes.{name}.model: unknown model {route.model!r}")
            for fallback in route.fallbacks:
                if fallback not in self.models:
                    raise ValueError(f"routes.{name}.fallbacks: unknown model {fallback!r}")
            named = [
                ("tiers", route.tiers),
                ("pin", list(route.pin.values())),
                ("gates.voters", [v for g in route.gates for v in g.voters]),
                ("router.models", list(route.router.models.values()) if route.router else []),
                (
                    "experiment.variants",
                    [
                        a
                        for v in (route.experiment.variants.values() if route.experiment else ())
                        for a in ([v.model] if v.model else [])
                        + v.tiers
                        + [voter for g in v.gates for voter in g.voters]
                    ],
                ),
            ]
            for where, aliases in named:
                for alias in aliases:
                    if alias not in self.models:
                        raise ValueError(f"routes.{name}.{where}: unknown model {alias!r}")
            if not route.send_output_ceiling:
                reachable = [route.model, *route.fallbacks, *(a for _, aliases in named for a in aliases)]
                capped = [a for a in reachable if self.providers[self.models[a].provider].kind == "anthropic"]
                if capped:
                    raise ValueError(
                        f"routes.{name}.send_output_ceiling: false is for OpenAI-compatible models; "
                        f"{capped[0]!r} is an Anthropic model, which always needs max_tokens"
                    )
            summary_route = (
                route.context.history.summary_route if route.context and route.context.history else None
            )
            if summary_route is not None and summary_route not in self.routes:
                raise ValueError(
                    f"routes.{name}.context.history.summary_route: unknown route {summary_route!r}"
                )
            verify = route.semantic_cache.verify if route.semantic_cache else None
            if verify is not None and verify.judge_route is not None:
                if verify.judge_route not in self.routes:
                    raise ValueError(
                        f"routes.{name}.semantic_cache.verify.judge_route: "
                        f"unknown route {verify.judge_route!r}"
                    )
                if verify.judge_route == name:
                    raise ValueError(
                        f"routes.{name}.semantic_cache.verify.judge_route: a route cannot judge its own cache"
                    )
        for tenant, tset in self.tenants.items():
            for h in tset.key_hashes:
                if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                    raise ValueError(f"tenants.{tenant}.key_hashes: {h!r} is not a sha256 hex digest")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "settings", base_dir: Path | None = None
) -> Settings:
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from err
    if base_dir is not None:
        settings = _anchor_paths(settings, base_dir)
    return settings


def load_settings(path: Path | str) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "a settings file is YAML saved as UTF-8"
        ) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return settings_from_mapping(data, source=str(path), base_dir=path.parent)


def _anchor_paths(settings: Settings, base_dir: Path) -> Settings:
    """Relative paths in a settings file are relative to that file, not to the cwd."""
    url = settings.storage.url
    storage = settings.storage
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_absolute():
        storage = storage.model_copy(
            update={"url": "sqlite:///" + str(base_dir / url.removeprefix("sqlite:///"))}
        )
    storage = storage.model_copy(
        update={
            name: str(base_dir / value)
            for name, value in (("spool_path", storage.spool_path), ("local_path", storage.local_path))
            if not Path(value).is_absolute()
        }
    )
    routes = {name: _anchor_route(r, base_dir) for name, r in settings.routes.items()}
    providers = {
        name: p.model_copy(
            update={
                "data": [
                    d if Path(d).is_absolute() or d.startswith("builtin:") else str(base_dir / d)
                    for d in p.data
                ]
            }
        )
        for name, p in settings.providers.items()
    }
    return settings.model_copy(update={"storage": storage, "providers": providers, "routes": routes})


def _anchor_route(route: RouteSettings, base_dir: Path) -> RouteSettings:
    update: dict[str, Any] = {}
    semantic = route.semantic_cache
    if semantic is not None and semantic.params is not None and not Path(semantic.params).is_absolute():
        update["semantic_cache"] = semantic.model_copy(update={"params": str(base_dir / semantic.params)})
    if route.router is not None and not Path(route.router.path).is_absolute():
        update["router"] = route.router.model_copy(update={"path": str(base_dir / route.router.path)})
    return route.model_copy(update=update) if update else route


def resolve_secrets(settings: Settings, environ: Mapping[str, str]) -> dict[str, str | None]:
    """Provider name -> API key, read from the environment variables the settings name."""
    return {
        name: (environ.get(p.api_key_env) if p.api_key_env else None)
        for name, p in settings.providers.items()
    }
