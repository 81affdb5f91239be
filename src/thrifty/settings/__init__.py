"""One settings object, loaded from a YAML file and passed down; never read from globals.

Secrets are the only thing taken from the environment, and only under names the file gives
(`api_key_env`); they are resolved once at start by `resolve_secrets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from thrifty.errors import ConfigError
from thrifty.settings._base import _Strict
from thrifty.settings.batch import BatchSettings, DeferSettings, parse_window
from thrifty.settings.caching import CacheVerifySettings, ExactCacheSettings, SemanticCacheSettings
from thrifty.settings.context import ContextSettings, HistoryBudget, OutputBudget, SectionBudget
from thrifty.settings.experiments import (
    ExperimentSettings,
    ExperimentsSettings,
    StopRuleSettings,
    VariantSettings,
)
from thrifty.settings.limits import BudgetSettings, FeatureSettings, RateLimitSettings, TenantSettings
from thrifty.settings.observability import AlertSettings, DashboardSettings, MetricsSettings, TracingSettings
from thrifty.settings.providers import (
    ModelSettings,
    PriceOverride,
    PricingSettings,
    ProviderKind,
    ProviderSettings,
)
from thrifty.settings.recording import REDACT_PRESETS, RecordSettings, RedactRule
from thrifty.settings.routes import RouteSettings
from thrifty.settings.routing import GateKind, GateSettings, RouterArtifactSettings
from thrifty.settings.runtime import (
    IdempotencySettings,
    ResilienceSettings,
    SemanticSettings,
    ServerSettings,
    SharedStateSettings,
    StorageSettings,
)

# The models live in modules by concern; they are re-exported here so that callers import every
# settings name from `thrifty.settings` alone and never depend on the package's inner layout.
__all__ = [
    "REDACT_PRESETS",
    "AlertSettings",
    "BatchSettings",
    "BudgetSettings",
    "CacheVerifySettings",
    "ContextSettings",
    "DashboardSettings",
    "DeferSettings",
    "ExactCacheSettings",
    "ExperimentSettings",
    "ExperimentsSettings",
    "FeatureSettings",
    "GateKind",
    "GateSettings",
    "HistoryBudget",
    "IdempotencySettings",
    "MetricsSettings",
    "ModelSettings",
    "OutputBudget",
    "PriceOverride",
    "PricingSettings",
    "ProviderKind",
    "ProviderSettings",
    "RateLimitSettings",
    "RecordSettings",
    "RedactRule",
    "ResilienceSettings",
    "RouteSettings",
    "RouterArtifactSettings",
    "SectionBudget",
    "SemanticCacheSettings",
    "SemanticSettings",
    "ServerSettings",
    "Settings",
    "SharedStateSettings",
    "StopRuleSettings",
    "StorageSettings",
    "TenantSettings",
    "TracingSettings",
    "VariantSettings",
    "load_settings",
    "parse_window",
    "resolve_secrets",
    "settings_from_mapping",
]


class Settings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    shared_state: SharedStateSettings = Field(default_factory=SharedStateSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    budget: BudgetSettings | None = None  # the whole organisation
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    semantic: SemanticSettings = Field(default_factory=SemanticSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    experiments: ExperimentsSettings = Field(default_factory=ExperimentsSettings)
    providers: dict[str, ProviderSettings]
    models: dict[str, ModelSettings]
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for alias, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(
                    f"models.{alias}.provider: unknown provider {model.provider!r} "
                    f"(known: {', '.join(sorted(self.providers)) or 'none'})"
                )
        for name, route in self.routes.items():
            if route.model not in self.models:
                raise ValueError(f"routes.{name}.model: unknown model {route.model!r}")
            for fallback in route.fallbacks:
                if fallback not in self.models:
                    raise ValueError(f"routes.{name}.fallbacks: unknown model {fallback!r}")
            named = [
                ("tiers", route.tiers),
                ("pin", list(route.pin.values())),
                ("gates.voters", [v for g in route.gates for v in g.voters]),
                ("router.models", list(route.router.models.values()) if route.router else []),
                (
                    "experiment.variants",
                    [
                        a
                        for v in (route.experiment.variants.values() if route.experiment else ())
                        for a in ([v.model] if v.model else [])
                        + v.tiers
                        + [voter for g in v.gates for voter in g.voters]
                    ],
                ),
            ]
            for where, aliases in named:
                for alias in aliases:
                    if alias not in self.models:
                        raise ValueError(f"routes.{name}.{where}: unknown model {alias!r}")
            if not route.send_output_ceiling:
                reachable = [route.model, *route.fallbacks, *(a for _, aliases in named for a in aliases)]
                capped = [a for a in reachable if self.providers[self.models[a].provider].kind == "anthropic"]
                if capped:
                    raise ValueError(
                        f"routes.{name}.send_output_ceiling: false is for OpenAI-compatible models; "
                        f"{capped[0]!r} is an Anthropic model, which always needs max_tokens"
                    )
            summary_route = (
                route.context.history.summary_route if route.context and route.context.history else None
            )
            if summary_route is not None and summary_route not in self.routes:
                raise ValueError(
                    f"routes.{name}.context.history.summary_route: unknown route {summary_route!r}"
                )
            verify = route.semantic_cache.verify if route.semantic_cache else None
            if verify is not None and verify.judge_route is not None:
                if verify.judge_route not in self.routes:
                    raise ValueError(
                        f"routes.{name}.semantic_cache.verify.judge_route: "
                        f"unknown route {verify.judge_route!r}"
                    )
                if verify.judge_route == name:
                    raise ValueError(
                        f"routes.{name}.semantic_cache.verify.judge_route: a route cannot judge its own cache"
                    )
        for tenant, tset in self.tenants.items():
            for h in tset.key_hashes:
                if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                    raise ValueError(f"tenants.{tenant}.key_hashes: {h!r} is not a sha256 hex digest")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "settings", base_dir: Path | None = None
) -> Settings:
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from err
    if base_dir is not None:
        settings = _anchor_paths(settings, base_dir)
    return settings


def load_settings(path: Path | str) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "a settings file is YAML saved as UTF-8"
        ) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return settings_from_mapping(data, source=str(path), base_dir=path.parent)


def _anchor_paths(settings: Settings, base_dir: Path) -> Settings:
    """Relative paths in a settings file are relative to that file, not to the cwd."""
    url = settings.storage.url
    storage = settings.storage
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_absolute():
        storage = storage.model_copy(
            update={"url": "sqlite:///" + str(base_dir / url.removeprefix("sqlite:///"))}
        )
    storage = storage.model_copy(
        update={
            name: str(base_dir / value)
            for name, value in (("spool_path", storage.spool_path), ("local_path", storage.local_path))
            if not Path(value).is_absolute()
        }
    )
    routes = {name: _anchor_route(r, base_dir) for name, r in settings.routes.items()}
    providers = {
        name: p.model_copy(
            update={
                "data": [
                    d if Path(d).is_absolute() or d.startswith("builtin:") else str(base_dir / d)
                    for d in p.data
                ]
            }
        )
        for name, p in settings.providers.items()
    }
    return settings.model_copy(update={"storage": storage, "providers": providers, "routes": routes})


def _anchor_route(route: RouteSettings, base_dir: Path) -> RouteSettings:
    update: dict[str, Any] = {}
    semantic = route.semantic_cache
    if semantic is not None and semantic.params is not None and not Path(semantic.params).is_absolute():
        update["semantic_cache"] = semantic.model_copy(update={"params": str(base_dir / semantic.params)})
    if route.router is not None and not Path(route.router.path).is_absolute():
        update["router"] = route.router.model_copy(update={"path": str(base_dir / route.router.path)})
    return route.model_copy(update=update) if update else route


def resolve_secrets(settings: Settings, environ: Mapping[str, str]) -> dict[str, str | None]:
    """Provider name -> API key, read from the environment variables the settings name."""
    return {
        name: (environ.get(p.api_key_env) if p.api_key_env else None)
        for name, p in settings.providers.items()
    }
