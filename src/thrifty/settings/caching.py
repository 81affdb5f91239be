"""A route's response caches: exact match, and semantic with live verification of hits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict


class ExactCacheSettings(_Strict):
    enabled: bool = True
    ttl_s: float = Field(default=3600.0, gt=0)
    per_user: bool = False  # answers are personal: key them by x-thrifty-user too
    # Sampled answers (temperature > 0) differ on purpose; cache them only when asked to.
    any_temperature: bool = False


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
