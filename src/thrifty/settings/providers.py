"""Upstream providers, the models they serve and how those models are priced."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict

ProviderKind = Literal["openai", "anthropic", "replay"]


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
    # The most one image part of a prompt may bill (reservations); by the model's family when absent
    # (guard/media.py), and the largest family's for a model of no known family.
    max_image_tokens: int | None = Field(default=None, gt=0)


class PricingSettings(_Strict):
    reject_unpriced: bool = False
