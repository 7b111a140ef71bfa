"""Output values made JSON-safe: floats rounded (null when missing or non-finite), pass-through columns as JSON types."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SCORE_DECIMALS = 6  # class scores, margins and saliencies in the exports


def number(value: Any, decimals: int) -> float | None:
    """A float rounded for JSON, or None for a missing or non-finite value (JSON has no NaN).

    Args:
        value: a number, or None.
        decimals: digits kept after the decimal point.

    Returns:
        The rounded float, or None.
    """
    if value is None:
        return None
    value = float(value)
    return round(value, decimals) if math.isfinite(value) else None


def numbers(values: Sequence[Any] | None, decimals: int) -> list[float | None] | None:
    """`number` over a list; None for a missing list."""
    return None if values is None else [number(v, decimals) for v in values]


def jsonable(value: Any) -> Any:
    """Pass-through values as JSON: numbers, strings, booleans and lists as they are, anything else as text.

    Args:
        value: a value of a pass-through (manifest) column as pyarrow gives it.

    Returns:
        A value json.dumps accepts with allow_nan=False: non-finite floats become None, bytes hex text,
        dict keys text, anything else its str().
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
