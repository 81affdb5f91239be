"""Prices of the models in labelled routing data, and the per-call cost of a recorded reply.

No price is built in: a model is priced from a `--prices` file when it is named there, else by
genai-prices (the project's price source, as the gateway's PriceCatalog prices a model alias).
A model neither knows is left out of training and benchmarks, and the caller is told which.
Tokens are counted with o200k for every model: exact for the gpt-4o family, an approximation for
others, whose tokenizers are not available offline; the approximation is the same for every
strategy, so relative costs stay comparable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

from pydantic import ValidationError

from thrifty.errors import InvalidData
from thrifty.pricing.catalog import ModelPricing, Rates, genai_pricing
from thrifty.settings import PriceOverride
from thrifty.tokens import TokenCounter
from thrifty.types import Usage

PRICES_HINT = '{"MODEL": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}, ...} (USD per million tokens)'


def load_prices(path: str | Path) -> dict[str, ModelPricing]:
    """A `--prices` file: JSON, model id -> a price override as in settings (`models.X.price`)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidData(f"{p}: cannot read the prices file: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidData(f"{p}: not JSON ({exc}); expected {PRICES_HINT}") from exc
    if not isinstance(raw, dict):
        raise InvalidData(f"{p}: expected {PRICES_HINT}")
    out: dict[str, ModelPricing] = {}
    for model, price in raw.items():
        try:
            override = PriceOverride.model_validate(price)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise InvalidData(
                f"{p}: model {model!r}: {where}: {first['msg']}; expected {PRICES_HINT}"
            ) from exc
        out[str(model)] = ModelPricing(source="override", rates=Rates.from_override(override))
    return out


class CostModel:
    """Cost of one recorded call: its prompt and output tokens priced for that model."""

    def __init__(
        self, prices: Mapping[str, ModelPricing] | None = None, counter: TokenCounter | None = None
    ) -> None:
        self._given = dict(prices or {})
        self._resolved: dict[str, ModelPricing | None] = {}
        self._counter = counter or TokenCounter()

    def tokens(self, text: str) -> int:
        return self._counter.count_text(text, "o200k_base")

    def pricing(self, model: str) -> ModelPricing | None:
        if model not in self._resolved:
            self._resolved[model] = self._given.get(model) or genai_pricing(model)
        return self._resolved[model]

    def priced(self, model: str) -> bool:
        return self.pricing(model) is not None

    def unpriced(self) -> list[str]:
        """Models asked about that have no price (left out of training and benchmarks)."""
        return sorted(m for m, p in self._resolved.items() if p is None)

    def call_cost(self, model: str, prompt_tokens: int, output_tokens: int) -> Decimal:
        pricing = self.pricing(model)
        if pricing is None:
            raise KeyError(f"no price for model {model!r}")
        return pricing.cost(Usage(input_tokens=prompt_tokens, output_tokens=output_tokens))
