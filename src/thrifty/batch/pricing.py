"""Batch prices: genai-prices' batch variant, else the provider's batch_discount, else said at start.

Where neither is known, an item is charged the real-time price, the upper bound of what it costs,
and the gateway says so at start: a discount nobody published is never invented.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from thrifty.pricing import PriceCatalog
from thrifty.settings import ModelSettings, ProviderSettings
from thrifty.types import Usage

_ONE = Decimal(1)


class BatchPricer:
    def __init__(
        self,
        catalog: PriceCatalog,
        models: Mapping[str, ModelSettings],
        providers: Mapping[str, ProviderSettings],
    ) -> None:
        self._catalog = catalog
        self._factor: dict[str, Decimal | None] = {}  # alias -> share of the real-time price, or None
        self.basis: dict[str, str] = {}
        for alias, model in models.items():
            pricing = catalog.pricing(alias)
            discount = providers[model.provider].batch_discount
            if pricing is None:
                self.basis[alias] = "unpriced"
            elif pricing.batch_rates is not None:
                self.basis[alias] = "genai-prices batch price"
            elif discount is not None:
                self._factor[alias] = _ONE - discount
                self.basis[alias] = f"providers.{model.provider}.batch_discount {discount}"
            else:
                self.basis[alias] = "real-time price (no batch price known)"

    def gaps(self, models: Mapping[str, ModelSettings]) -> list[str]:
        """The start-up warning (one line) naming the models whose batch items get the real-time price."""
        missing = [
            f"{alias!r} ({m.provider})"
            for alias, m in models.items()
            if self.basis.get(alias) == "real-time price (no batch price known)"
        ]
        if not missing:
            return []
        return [
            f"no batch price for model{'s' if len(missing) > 1 else ''} {', '.join(missing)}: genai-prices "
            "has none and the provider sets no batch_discount, so their batch items are recorded at the "
            "real-time price; set providers.NAME.batch_discount (e.g. 0.5) where the provider gives one"
        ]

    def cost(self, alias: str, usage: Usage) -> Decimal | None:
        pricing = self._catalog.pricing(alias)
        if pricing is None:
            return None
        if pricing.batch_rates is not None:
            return pricing.batch_rates.cost(usage)
        realtime = pricing.cost(usage)
        factor = self._factor.get(alias)
        return realtime if factor is None else realtime * factor

    def realtime(self, alias: str, usage: Usage) -> Decimal | None:
        return self._catalog.cost(alias, usage)
