"""thrifty: an LLM cost-control gateway, as an OpenAI-compatible proxy (`thrifty serve`) or in-process.

The library entry point is `Gateway`: the same pipeline the proxy runs, attributed to a tenant
without a key. Heavy modules load on first use, so `import thrifty` (and the CLI) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thrifty.errors import ThriftyError
from thrifty.settings import Settings, load_settings, resolve_secrets, settings_from_mapping

if TYPE_CHECKING:
    from thrifty.gateway import Gateway
    from thrifty.pipeline import Completion, RequestContext, Streamed

__version__ = "0.1.0"
__all__ = [
    "Completion",
    "Gateway",
    "RequestContext",
    "Settings",
    "Streamed",
    "ThriftyError",
    "__version__",
    "load_settings",
    "resolve_secrets",
    "settings_from_mapping",
]

_LAZY = {
    "Gateway": "thrifty.gateway",
    "Completion": "thrifty.pipeline",
    "RequestContext": "thrifty.pipeline",
    "Streamed": "thrifty.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'thrifty' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
