"""The error of the models package, apart so that every module of it can raise it without importing another."""

from __future__ import annotations

from pipeline.config import ConfigError


class ModelError(ConfigError):
    """The model or its weights cannot be loaded; the message names the fix."""
