"""The feature spec `thrifty estimate` reads: a small YAML file, flags, or both (flags win).

feature: support-answers          # a name for the table (optional)
model: gpt-4o-mini                # a genai-prices model id, or a model of the settings
avg_input_tokens: 3500
avg_output_tokens: 350
requests_per_day: 20000
latency_class: interactive        # or deferrable (may wait for the batch API: batch_share 1)
days_per_month: 30
cache_hit_rate: 0.12              # requests the exact cache (or a deduplicated repeat) answers
    semantic_hit_rate: 0.18           # of the requests left, those the semantic cache answers
prompt_cache_share: 0.5           # input tokens read from the provider's prompt cache
batch_share: 0                    # calls sent through the batch API (deferrable work only)
retry_factor: 1.03                # upstream calls per request that reaches the provider
cascade: {cheap_model: gpt-4o-mini, cheap_success_rate: 0.7, escalation_extra_input_tokens: 400}
self_hosting: {gpu_usd_per_hour: 2.5, gpu_tokens_per_second: 2500, utilisation: 0.6,
               ops_usd_per_month: 3000, compare: [gpt-4o]}
fine_tuning: {setup_usd: 500, model: ft-mini, avg_input_tokens: 800}
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from thrifty.errors import InvalidData


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSpec(_Spec):
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)  # default: the input price


class CascadeSpec(_Spec):
    cheap_model: str
    cheap_success_rate: Decimal = Field(ge=0, le=1)
    escalation_extra_input_tokens: Decimal = Field(default=Decimal(0), ge=0)
    escalation_extra_output_tokens: Decimal = Field(default=Decimal(0), ge=0)


class SelfHostingSpec(_Spec):
    gpu_usd_per_hour: Decimal = Field(gt=0)
    gpu_tokens_per_second: Decimal = Field(gt=0)  # input + output tokens per GPU at full load
    utilisation: Decimal = Field(gt=0, le=1)
    ops_usd_per_month: Decimal = Field(default=Decimal(0), ge=0)
    compare: list[str] = Field(default_factory=list)  # more API models (the feature's is always in)


class FineTuningSpec(_Spec):
    setup_usd: Decimal = Field(ge=0)
    usd_per_call: Decimal | None = Field(default=None, ge=0)  # or price `model` at these tokens:
    model: str | None = None
    avg_input_tokens: Decimal | None = Field(default=None, ge=0)  # default: the feature's
    avg_output_tokens: Decimal | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_price(self) -> FineTuningSpec:
        if (self.usd_per_call is None) == (self.model is None):
            raise ValueError("give usd_per_call or model (the fine-tuned model, priced), not both")
        return self


class FeatureSpec(_Spec):
    feature: str | None = None
    model: str
    avg_input_tokens: Decimal = Field(ge=0)
    avg_output_tokens: Decimal = Field(ge=0)
    requests_per_day: Decimal = Field(ge=0)
    latency_class: Literal["interactive", "deferrable"] = "interactive"
    days_per_month: Decimal = Field(default=Decimal(30), gt=0, le=31)
    cache_hit_rate: Decimal = Field(default=Decimal(0), ge=0, le=1)
    semantic_hit_rate: Decimal = Field(default=Decimal(0), ge=0, le=1)
    prompt_cache_share: Decimal = Field(default=Decimal(0), ge=0, le=1)
    batch_share: Decimal | None = Field(default=None, ge=0, le=1)  # default: 1 if deferrable, else 0
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1)  # for models without batch prices
    retry_factor: Decimal = Field(default=Decimal(1), ge=1)
    price: PriceSpec | None = None  # instead of the price source
    cascade: CascadeSpec | None = None
    self_hosting: SelfHostingSpec | None = None
    fine_tuning: FineTuningSpec | None = None

    @model_validator(mode="after")
    def _batch_needs_deferrable(self) -> FeatureSpec:
        if self.batch_share and self.latency_class != "deferrable":
            raise ValueError(
                "batch_share is for work that can wait for the batch API (up to 24 h): "
                "set latency_class: deferrable (--latency-class deferrable)"
            )
        return self

    @property
    def effective_batch_share(self) -> Decimal:
        if self.batch_share is not None:
            return self.batch_share
        return Decimal(1) if self.latency_class == "deferrable" else Decimal(0)


def read_spec_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InvalidData(f"cannot read feature spec {path}: {err.strerror}") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InvalidData(f"{path} is not a YAML feature spec: {err}") from err
    if not isinstance(data, dict):
        raise InvalidData(f"{path}: a feature spec is a mapping (model: ..., avg_input_tokens: ...)")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over `base`, one level into the nested sections (cascade, self_hosting, ...)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_spec(data: dict[str, Any], source: str) -> FeatureSpec:
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as err:
        problems = []
        for item in err.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(top level)"
            flag = "--" + str(item["loc"][-1]).replace("_", "-") if item["loc"] else ""
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}{f' ({flag})' if flag and len(item['loc']) == 1 else ''}: {message}")
        raise InvalidData(f"invalid feature spec ({source}): " + "; ".join(problems)) from err
