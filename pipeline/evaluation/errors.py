"""The error type of `lgca eval` and the capped name lists its messages show."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import ConfigError

NAMES_SHOWN = 20  # class names or keys listed in one message


class EvaluationError(ConfigError):
    """Labelled data or evaluation settings are unusable; the message names the offending item and the fix."""


def shown_names(names: Sequence[str]) -> str:
    """At most NAMES_SHOWN of `names`, comma-separated, with how many more there are."""
    more = f", ... and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


__all__ = [
    "EvaluationError",
    "NAMES_SHOWN",
    "shown_names",
]
