"""Build one provider object (one connection pool) per configured provider."""

from __future__ import annotations

from collections.abc import Mapping

from thrifty.providers.base import Provider
from thrifty.settings import Settings
from thrifty.tokens import TokenCounter


def build_providers(
    settings: Settings, secrets: Mapping[str, str | None], counter: TokenCounter
) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, p in settings.providers.items():
        if p.kind == "openai":
            from thrifty.providers.openai import OpenAIProvider

            providers[name] = OpenAIProvider(name, p, secrets.get(name))
        elif p.kind == "anthropic":
            from thrifty.providers.anthropic import AnthropicProvider

            providers[name] = AnthropicProvider(name, p, secrets.get(name))
        else:
            from thrifty.providers.replay import ReplayProvider

            providers[name] = ReplayProvider(name, p, counter)
    return providers
