"""Token prices for the estimator, from the project's price source.

A model named in the settings is priced as the gateway prices it (its `price` override, else
genai-prices through `price_model`/`upstream`); any other name is looked up in genai-prices' bundled
snapshot. Tiered prices (the rate depends on the prompt's length) are read at the feature's average
prompt length, through genai-prices' own calculation.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from thrifty.errors import ThriftyError
from thrifty.planning.calculators import MILLION, TokenPrices
from thrifty.pricing.catalog import ModelPricing, Rates, genai_pricing, resolve_model_pricing
from thrifty.settings import Settings
from thrifty.types import Usage


@dataclass(frozen=True, slots=True)
class ModelPrices:
    model: str
    source: str  # "settings override" | "genai-prices" | "flags"
    realtime: TokenPrices
    batch: TokenPrices | None  # None: no batch price known
    batch_source: str | None = None  # "genai-prices" | "batch discount 0.5"


def _from_rates(rates: Rates) -> TokenPrices:
    return TokenPrices(rates.input, rates.output, rates.cached_input)


def _at_length(pricing: ModelPricing, prompt_tokens: int, *, batch: bool) -> TokenPrices:
    """Per-Mtok rates of a tiered model at one prompt length (differences of whole-call costs)."""
    n = max(prompt_tokens, 1)
    base = pricing.cost(Usage(input_tokens=n), batch=batch)
    with_output = pricing.cost(Usage(input_tokens=n, output_tokens=1_000_000), batch=batch)
    cached = pricing.cost(Usage(input_tokens=n, cached_input_tokens=n), batch=batch)
    return TokenPrices(base / n * MILLION, with_output - base, cached / n * MILLION)


def _discounted(prices: TokenPrices, discount: Decimal) -> TokenPrices:
    keep = Decimal(1) - discount
    return TokenPrices(prices.input * keep, prices.output * keep, prices.cached_input * keep)


def model_prices(
    model: str,
    settings: Settings | None,
    *,
    prompt_tokens: int,
    batch_discount: Decimal | None = None,
) -> ModelPrices:
    """The prices of `model`; a batch price from genai-prices, else from `batch_discount` (the flag,
    then the provider's `batch_discount` in the settings), else none."""
    pricing: ModelPricing | None
    configured = settings.models.get(model) if settings is not None else None
    if configured is not None and settings is not None:
        pricing = resolve_model_pricing(model, configured, settings.providers[configured.provider])
        source = "settings override" if configured.price is not None else "genai-prices"
        if batch_discount is None:
            batch_discount = settings.providers[configured.provider].batch_discount
    else:
        pricing = genai_pricing(model)
        source = "genai-prices"
    if pricing is None:
        raise ThriftyError(
            f"no price known for model {model!r}: name a model genai-prices knows (e.g. gpt-4o-mini), "
            "a model of the settings (--config) with a price, or give --input-price and --output-price"
        )
    if pricing.rates is not None:
        realtime = _from_rates(pricing.rates)
    else:
        realtime = _at_length(pricing, prompt_tokens, batch=False)
    batch: TokenPrices | None = None
    batch_source: str | None = None
    if pricing.batch_rates is not None:
        batch, batch_source = _from_rates(pricing.batch_rates), "genai-prices"
    elif batch_discount is not None:
        batch, batch_source = _discounted(realtime, batch_discount), f"batch discount {batch_discount}"
    return ModelPrices(model, source, realtime, batch, batch_source)


def flag_prices(model: str, prices: TokenPrices, batch_discount: Decimal | None) -> ModelPrices:
    batch = None if batch_discount is None else _discounted(prices, batch_discount)
    return ModelPrices(
        model, "flags", prices, batch, None if batch is None else f"batch discount {batch_discount}"
    )
