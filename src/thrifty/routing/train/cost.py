"""Benchmark prices and the per-call cost of a recorded reply.

Prices are the list prices (USD per million tokens) at the time these models were current, as the
data README gives them. Tokens are counted with o200k for every model: exact for the gpt-4o family,
an approximation for Claude, Gemini and gpt-3.5 (cl100k), whose tokenizers are not available
offline; the approximation is the same for every strategy, so relative costs stay comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from thrifty.tokens import TokenCounter

MINI = "gpt-4o-mini-2024-07-18"
GPT4O = "gpt-4o-2024-08-06"
HAIKU = "claude-3-haiku-20240307"
SONNET = "claude-3-5-sonnet-20240620"
FLASH = "gemini-1.5-flash"
GPT35 = "gpt-3.5-turbo-0125"

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Price:
    input_per_m: Decimal
    output_per_m: Decimal

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (input_tokens * self.input_per_m + output_tokens * self.output_per_m) / _MILLION


PRICES: Mapping[str, Price] = {
    MINI: Price(Decimal("0.15"), Decimal("0.60")),
    GPT4O: Price(Decimal("2.50"), Decimal("10.00")),
    HAIKU: Price(Decimal("0.25"), Decimal("1.25")),
    SONNET: Price(Decimal("3.00"), Decimal("15.00")),
    FLASH: Price(Decimal("0.075"), Decimal("0.30")),
    GPT35: Price(Decimal("0.50"), Decimal("1.50")),
}

# The tiers the cascade may draw from; "cheap" models are the voters, "strong" ones the fallback.
CHEAP_MODELS: tuple[str, ...] = (MINI, FLASH, HAIKU, GPT35)
STRONG_MODELS: tuple[str, ...] = (GPT4O, SONNET)


class CostModel:
    """Cost of one recorded call: tokens(prompt) x input price + tokens(output) x output price."""

    def __init__(self, prices: Mapping[str, Price] = PRICES, counter: TokenCounter | None = None) -> None:
        self._prices = prices
        self._counter = counter or TokenCounter()

    def tokens(self, text: str) -> int:
        return self._counter.count_text(text, "o200k_base")

    def priced(self, model: str) -> bool:
        return model in self._prices

    def call_cost(self, model: str, prompt_tokens: int, output_tokens: int) -> Decimal:
        price = self._prices.get(model)
        if price is None:
            raise KeyError(f"no benchmark price for model {model!r}")
        return price.cost(prompt_tokens, output_tokens)
