"""Prices of models and the cost of a Usage, in Decimal USD."""

from thrifty.pricing.catalog import ModelPricing, PriceCatalog, Rates

__all__ = ["ModelPricing", "PriceCatalog", "Rates"]
