"""Price catalogue: genai-prices' bundled snapshot, overridden per model by settings.

Prices are resolved once per model alias at start. The cost of a Usage is then a handful of
Decimal multiplications (`Rates.cost`) for the usual flat per-token prices; tiered prices (price
depends on prompt length) are handed to genai-prices itself. Both paths agree to the last digit;
tests/test_pricing.py checks that against genai-prices on real models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.settings import ModelSettings, PriceOverride, ProviderSettings
from thrifty.types import Usage

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic"}


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens. Cache rates default to the input rate, as genai-prices does."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal  # 5-minute writes (Anthropic), or the only kind there is
    cache_write_1h: Decimal  # 1-hour writes; the 5-minute rate where no other is known

    def cost(self, usage: Usage) -> Decimal:
        uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        total = (
            uncached * self.input
            + usage.cached_input_tokens * self.cached_input
            + (usage.cache_write_tokens - usage.cache_write_1h_tokens) * self.cache_write
            + usage.cache_write_1h_tokens * self.cache_write_1h
            + usage.output_tokens * self.output
        )
        return total / _MILLION

    @classmethod
    def from_override(cls, price: PriceOverride) -> Rates:
        gpu = price.gpu_flat_per_mtok()
        if price.flat_per_mtok is not None or gpu is not None:
            flat = price.flat_per_mtok if price.flat_per_mtok is not None else gpu
            assert flat is not None
            return cls(flat, flat, flat, flat, flat)
        assert price.input_per_mtok is not None and price.output_per_mtok is not None
        inp = price.input_per_mtok
        write = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else inp
        return cls(
            input=inp,
            output=price.output_per_mtok,
            cached_input=price.cached_input_per_mtok if price.cached_input_per_mtok is not None else inp,
            cache_write=write,
            cache_write_1h=price.cache_write_1h_per_mtok
            if price.cache_write_1h_per_mtok is not None
            else write,
        )


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """How one model alias is priced: flat `rates`, or a genai-prices ModelPrice with tiers."""

    source: str  # "override" | "genai-prices"
    rates: Rates | None
    tiered: Any = None  # genai_prices.types.ModelPrice when prices depend on prompt length
    batch_rates: Rates | None = None  # None when no batch price is known

    def cost(self, usage: Usage, *, batch: bool = False) -> Decimal:
        if batch and self.batch_rates is not None:
            return self.batch_rates.cost(usage)
        if self.rates is not None:
            return self.rates.cost(usage)
        return _genai_cost(self.tiered, usage)


def _genai_usage(usage: Usage) -> Any:
    from genai_prices import Usage as GenaiUsage

    return GenaiUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        output_tokens=usage.output_tokens,
    )


def _genai_cost(model_price: Any, usage: Usage) -> Decimal:
    result: Decimal = model_price.calc_price(_genai_usage(usage))["total_price"]
    return result


def _flat_rates(model_price: Any) -> Rates | None:
    """Rates when every token price is a plain Decimal; None when any is tiered."""
    values = {}
    for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "cache_write_1h_mtok"):
        value = getattr(model_price, key, None)
        if value is not None and not isinstance(value, Decimal):
            return None
        values[key] = value
    inp, out = values["input_mtok"], values["output_mtok"]
    if inp is None or out is None:
        return None
    write = values["cache_write_mtok"] if values["cache_write_mtok"] is not None else inp
    return Rates(
        input=inp,
        output=out,
        cached_input=values["cache_read_mtok"] if values["cache_read_mtok"] is not None else inp,
        cache_write=write,
        cache_write_1h=values["cache_write_1h_mtok"] if values["cache_write_1h_mtok"] is not None else write,
    )


def lookup_genai(model_ref: str, provider_id: str | None, *, batch: bool = False) -> Any | None:
    """The genai-prices ModelPrice for a model, or None when the snapshot does not know it."""
    from genai_prices import Usage as GenaiUsage
    from genai_prices import calc_price

    context = {"processing": "batch"} if batch else None
    try:
        calc = calc_price(
            GenaiUsage(input_tokens=0, output_tokens=0),
            model_ref=model_ref,
            provider_id=provider_id,
            price_context=context,
        )
    except LookupError:
        return None
    return calc.model_price


class PriceCatalog:
    """Model alias -> ModelPricing, resolved once from settings and genai-prices."""

    def __init__(self, pricing: Mapping[str, ModelPricing | None]) -> None:
        self._pricing = dict(pricing)

    @classmethod
    def from_settings(
        cls, models: Mapping[str, ModelSettings], providers: Mapping[str, ProviderSettings]
    ) -> PriceCatalog:
        resolved: dict[str, ModelPricing | None] = {}
        for alias, model in models.items():
            resolved[alias] = resolve_model_pricing(alias, model, providers[model.provider])
            if resolved[alias] is None:
                log.warning(
                    "model %r has no known price: its calls are recorded with cost NULL; "
                    "add models.%s.price to settings to price it",
                    alias,
                    alias,
                )
        return cls(resolved)

    def pricing(self, alias: str) -> ModelPricing | None:
        return self._pricing.get(alias)

    def is_priced(self, alias: str) -> bool:
        return self._pricing.get(alias) is not None

    def cost(self, alias: str, usage: Usage, *, batch: bool = False) -> Decimal | None:
        pricing = self._pricing.get(alias)
        if pricing is None:
            return None
        return pricing.cost(usage, batch=batch)


def resolve_model_pricing(
    alias: str, model: ModelSettings, provider: ProviderSettings
) -> ModelPricing | None:
    if model.price is not None:
        return ModelPricing(source="override", rates=Rates.from_override(model.price))
    ref = model.price_model or model.upstream or alias
    provider_id = model.price_provider or _PROVIDER_IDS.get(provider.kind)
    standard = lookup_genai(ref, provider_id)
    if standard is None and provider_id is not None and model.price_provider is None:
        # An OpenAI-compatible server may host another vendor's model: let genai-prices match it.
        standard = lookup_genai(ref, None)
        provider_id = None
    if standard is None:
        return None
    return _from_genai(ref, provider_id, standard)


def genai_pricing(model_ref: str, provider_id: str | None = None) -> ModelPricing | None:
    """How genai-prices prices a model id (any provider unless one is named); None if unknown."""
    standard = lookup_genai(model_ref, provider_id)
    return None if standard is None else _from_genai(model_ref, provider_id, standard)


def _from_genai(ref: str, provider_id: str | None, standard: Any) -> ModelPricing:
    batch = lookup_genai(ref, provider_id, batch=True)
    batch_rates = _flat_rates(batch) if batch is not None and batch != standard else None
    rates = _flat_rates(standard)
    return ModelPricing(
        source="genai-prices",
        rates=rates,
        tiered=standard if rates is None else None,
        batch_rates=batch_rates,
    )
