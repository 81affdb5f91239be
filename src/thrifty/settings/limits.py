"""Spend and rate limits, and the tenants (virtual keys, features) they apply to."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field

from thrifty.settings._base import _Strict


class BudgetSettings(_Strict):
    """Limits per UTC day and/or month, in USD and/or tokens (input + output). All optional."""

    usd_per_day: Decimal | None = Field(default=None, ge=0)
    usd_per_month: Decimal | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)


class RateLimitSettings(_Strict):
    """Per tenant, over the last 60 s. Tokens are counted as OpenAI does: prompt + max output."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class FeatureSettings(_Strict):
    budget: BudgetSettings | None = None


class TenantSettings(_Strict):
    # sha256 hex digests of virtual keys; keys made by `thrifty keys create` live in the store.
    key_hashes: list[str] = Field(default_factory=list)
    allowed_models: list[str] | None = None  # aliases or route:NAME; None means all
    budget: BudgetSettings | None = None
    features: dict[str, FeatureSettings] = Field(default_factory=dict)  # per-feature budgets
    rate_limit: RateLimitSettings | None = None
