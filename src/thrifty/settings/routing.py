"""How a route picks its model: cascade quality gates and a trained router's artifact."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict

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
