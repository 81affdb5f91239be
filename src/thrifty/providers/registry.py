"""Build one provider object (one connection pool) per configured provider."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from thrifty.providers.base import Provider
from thrifty.settings import Settings
from thrifty.tokens import TokenCounter

log = logging.getLogger(__name__)


def missing_keys(settings: Settings, secrets: Mapping[str, str | None]) -> dict[str, str]:
    """Provider name -> the environment variable it names for its key, where that was not set."""
    return {
        name: p.api_key_env
        for name, p in settings.providers.items()
        if p.api_key_env and not secrets.get(name)
    }


def build_providers(
    settings: Settings, secrets: Mapping[str, str | None], counter: TokenCounter
) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    unset = missing_keys(settings, secrets)
    for name, env in unset.items():
        log.warning(
            "provider %r has no API key: %s is not set (providers.%s.api_key_env); its calls will fail "
            "with 502 provider_key_missing until thrifty is restarted with it",
            name,
            env,
            name,
        )
    for name, p in settings.providers.items():
        if p.kind == "openai":
            from thrifty.providers.openai import OpenAIProvider

            providers[name] = OpenAIProvider(name, p, secrets.get(name), missing_key_env=unset.get(name))
        elif p.kind == "anthropic":
            from thrifty.providers.anthropic import AnthropicProvider

            providers[name] = AnthropicProvider(name, p, secrets.get(name), missing_key_env=unset.get(name))
        else:
            from thrifty.providers.replay import ReplayProvider

            providers[name] = ReplayProvider(name, p, counter)
    return providers
