"""One batch adapter per configured provider, beside its real-time adapter."""

from __future__ import annotations

from collections.abc import Mapping

from thrifty.batch.adapters.base import BatchAdapter
from thrifty.providers.base import Provider
from thrifty.settings import Settings


def build_adapters(
    settings: Settings, secrets: Mapping[str, str | None], providers: Mapping[str, Provider]
) -> dict[str, BatchAdapter]:
    from thrifty.providers.registry import missing_keys

    adapters: dict[str, BatchAdapter] = {}
    unset = missing_keys(settings, secrets)  # said at start by build_providers; refused before the wire
    from thrifty.providers.replay import ReplayProvider

    for name, p in settings.providers.items():
        replay = providers.get(name)
        if isinstance(replay, ReplayProvider):
            # Whatever the settings' kind: a replay provider put in its place (`thrifty simulate`)
            # answers its batches too, offline.
            from thrifty.batch.adapters.replay import ReplayBatchAdapter

            adapters[name] = ReplayBatchAdapter(name, replay)
        elif p.kind == "openai":
            from thrifty.batch.adapters.openai import OpenAIBatchAdapter

            adapters[name] = OpenAIBatchAdapter(name, p, secrets.get(name), unset.get(name))
        elif p.kind == "anthropic":
            from thrifty.batch.adapters.anthropic import AnthropicBatchAdapter

            adapters[name] = AnthropicBatchAdapter(name, p, secrets.get(name), unset.get(name))
    return adapters
