"""Prices: genai-prices' snapshot plus overrides, to the exact Decimal."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from thrifty.pricing.catalog import PriceCatalog, Rates, resolve_model_pricing
from thrifty.settings import ModelSettings, PriceOverride, ProviderSettings
from thrifty.types import Usage

OPENAI = ProviderSettings(kind="openai", base_url="http://127.0.0.1:1/v1")
ANTHROPIC = ProviderSettings(kind="anthropic", base_url="http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("model", "provider", "provider_id"),
    [
        ("gpt-4o-mini-2024-07-18", OPENAI, "openai"),
        ("gpt-4o-2024-08-06", OPENAI, "openai"),
        ("gpt-3.5-turbo-0125", OPENAI, "openai"),
        ("claude-3-5-sonnet-20240620", ANTHROPIC, "anthropic"),
        ("claude-3-haiku-20240307", ANTHROPIC, "anthropic"),
        ("gemini-1.5-flash", OPENAI, None),  # tiered by prompt length: delegated to genai-prices
    ],
)
def test_fast_path_equals_genai_prices(model, provider, provider_id):
    pricing = resolve_model_pricing(model, ModelSettings(provider="p", upstream=model), provider)
    assert pricing is not None
    rng = random.Random(model)
    for _ in range(200):
        inp = rng.randint(0, 300_000)
        cached = rng.randint(0, inp)
        write = rng.randint(0, inp - cached) if provider is ANTHROPIC else 0
        out = rng.randint(0, 20_000)
        usage = Usage(
            input_tokens=inp, cached_input_tokens=cached, cache_write_tokens=write, output_tokens=out
        )
        reference = calc_price(
            GenaiUsage(
                input_tokens=inp, cache_read_tokens=cached, cache_write_tokens=write, output_tokens=out
            ),
            model_ref=model,
            provider_id=provider_id,
        ).total_price
        assert pricing.cost(usage) == reference


def test_anthropic_cache_read_and_write_hand_computed():
    pricing = resolve_model_pricing(
        "claude-3-5-sonnet-20240620",
        ModelSettings(provider="a", upstream="claude-3-5-sonnet-20240620"),
        ANTHROPIC,
    )
    assert pricing is not None
    # Sonnet 3.5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per 1M tokens.
    usage = Usage(input_tokens=10_000, cached_input_tokens=6_000, cache_write_tokens=3_000, output_tokens=500)
    assert pricing.cost(usage) == Decimal("0.0030") + Decimal("0.0018") + Decimal("0.01125") + Decimal(
        "0.0075"
    )


def test_overrides_and_flat_prices():
    rates = Rates.from_override(PriceOverride(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("4")))
    # Without their own rates, cached and cache-write tokens cost the input rate.
    assert rates.cost(Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=10)) == Decimal(
        "0.00104"
    )
    flat = Rates.from_override(PriceOverride(flat_per_mtok=Decimal("0.02")))
    assert flat.cost(Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == Decimal("0.04")
    with pytest.raises(ValueError, match="flat_per_mtok"):
        PriceOverride(input_per_mtok=Decimal("1"))


def test_unpriced_model_costs_none_and_batch_prices_are_known_only_where_they_exist():
    catalog = PriceCatalog.from_settings(
        {
            "mini": ModelSettings(provider="o", upstream="gpt-4o-mini-2024-07-18"),
            "mystery": ModelSettings(provider="o", upstream="no-such-model-anywhere"),
            "sonnet": ModelSettings(provider="a", upstream="claude-3-5-sonnet-20240620"),
        },
        {"o": OPENAI, "a": ANTHROPIC},
    )
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert catalog.cost("mystery", usage) is None and not catalog.is_priced("mystery")
    assert catalog.cost("mini", usage) == Decimal("0.75")
    assert catalog.cost("mini", usage, batch=True) == Decimal("0.375")  # OpenAI's batch API: half price
    sonnet = catalog.pricing("sonnet")
    assert (
        sonnet is not None and sonnet.batch_rates is None
    )  # the snapshot has no batch price: no discount claimed
    assert catalog.cost("sonnet", usage, batch=True) == catalog.cost("sonnet", usage)
