"""Parameter sweeps of `lgca eval`: the parameters each method uses, parsed sweep items and the settings they give."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    CROP_LAYOUTS,
    GLOBAL_WEIGHT_RULES,
    LEVEL0_BOXES,
    LEVEL_AGGREGATIONS,
    LINEAGE_WEIGHTS,
    REGION_POOLS,
    SALIENCY_RULES,
    SELECTIONS,
    ConfigError,
    ScoringConfig,
)
from pipeline.evaluation.errors import EvaluationError

# The scoring parameters each method depends on; they go into its result record, and a sweep may only
# vary parameters of a requested method. `topk` and `micro_batch` change no prediction.
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "clip": (),
    "ensemble": (),
    "descriptors": ("text_scale",),
    "wca": ("text_scale", "crops", "crop_scale", "crop_layout", "letterbox", "image_scale", "global_weight", "seed"),
    "lgca": (
        "text_scale",
        "crops",
        "crop_scale",
        "crop_layout",
        "letterbox",
        "image_scale",
        "global_weight",
        "expand_weight",
        "seed",
        "saliency",
        "steps",
        "regions",
        "growth",
        "growth_target",
        "overlap_iou",
        "region_pool",
        "selection",
        "level_aggregation",
        "lineage_weights",
        "saliency_scale",
        "level0",
        "global_weight_rule",
    ),
}
_CHOICES = {
    "saliency": SALIENCY_RULES,
    "crop_layout": CROP_LAYOUTS,
    "region_pool": REGION_POOLS,
    "selection": SELECTIONS,
    "level_aggregation": LEVEL_AGGREGATIONS,
    "lineage_weights": LINEAGE_WEIGHTS,
    "level0": LEVEL0_BOXES,
    "global_weight_rule": GLOBAL_WEIGHT_RULES,
}
# A sweep value is checked alone on a configuration where only the field's own rules can fail: no regions
# to outnumber the crops, and a square number of crops for the grid layout. Combinations are checked later.
_PROBE = ScoringConfig(method="lgca", crops=10_000, regions=0)


@dataclass(frozen=True)
class Setting:
    """One point of a parameter sweep: the swept values, and the configuration they give."""

    changes: Mapping[str, Any]  # swept field -> value; empty without a sweep
    scoring: ScoringConfig


def parse_sweep(items: Sequence[str], methods: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """Parse `FIELD=V1,V2,...` items into values per ScoringConfig field.

    Values take the field's type; `crop_scale` values are written `ALPHA:BETA`.

    Args:
        items: e.g. ["steps=1,2,3", "saliency=class,global"].
        methods: the requested methods; a field must change at least one of them.

    Raises:
        EvaluationError: a malformed item, an unknown or repeated field, a field none of `methods` uses,
            a value of the wrong type, outside the field's choices or invalid whatever the other
            parameters (e.g. steps=-1), each named.
    """
    fields = {f.name: f for f in dataclasses.fields(ScoringConfig)}
    used = {name for method in methods for name in METHOD_PARAMETERS[method]}
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not raw.strip():
            raise EvaluationError(f"--sweep item {item!r} is not FIELD=V1,V2,...; write e.g. steps=1,2,3")
        if name == "method":
            raise EvaluationError("--sweep cannot vary method; list methods with --methods")
        if name not in fields:
            sweepable = sorted(set(fields) - {"method"})
            raise EvaluationError(f"--sweep field {name!r} is not a scoring parameter; choose from {', '.join(sweepable)}")
        if name in grid:
            raise EvaluationError(f"--sweep lists {name} twice; give all its values in one item, e.g. {name}=1,2")
        if name not in used:
            users = [m for m, names in METHOD_PARAMETERS.items() if name in names]
            needs = f"it changes only {', '.join(users)}" if users else "it changes no prediction"
            raise EvaluationError(f"--sweep field {name} changes none of the methods {', '.join(methods)}: {needs}")
        values = tuple(_sweep_value(name, text.strip(), fields[name].default) for text in raw.split(","))
        if len(set(values)) != len(values):
            raise EvaluationError(f"--sweep {name} repeats a value: {raw}")
        grid[name] = values
    if not grid:
        raise EvaluationError("--sweep needs at least one FIELD=V1,V2,... item")
    return grid


def sweep_settings(base: ScoringConfig, grid: Mapping[str, Sequence[Any]]) -> tuple[list[Setting], list[tuple[dict[str, Any], str]]]:
    """The cartesian product of `grid` over `base`, split into valid settings and skipped ones with the reason.

    A combination ScoringConfig rejects (e.g. more regions than crops) is skipped, not an error.

    Args:
        base: the configuration the swept values replace fields of.
        grid: field -> values, as `parse_sweep` returns them.

    Returns:
        The valid settings, and the skipped combinations with ScoringConfig's reason.

    Raises:
        EvaluationError: no combination is valid.
    """
    names = list(grid)
    settings: list[Setting] = []
    skipped: list[tuple[dict[str, Any], str]] = []
    for values in itertools.product(*(grid[name] for name in names)):
        changes = dict(zip(names, values))
        try:
            settings.append(Setting(changes, dataclasses.replace(base, **changes)))
        except ConfigError as error:
            skipped.append((changes, str(error)))
    if not settings:
        raise EvaluationError(f"no setting of the sweep is valid; e.g. {describe_changes(skipped[0][0])}: {skipped[0][1]}")
    return settings, skipped


def describe_changes(changes: Mapping[str, Any]) -> str:
    """`steps=2 saliency=global`, as a sweep item would write them."""
    return " ".join(f"{name}={_written(value)}" for name, value in changes.items())


def _sweep_value(name: str, text: str, default: Any) -> Any:
    try:
        if name == "crop_scale":
            alpha, sep, beta = text.partition(":")
            if not sep:
                raise ValueError
            value: Any = (float(alpha), float(beta))
        elif isinstance(default, bool):
            raise ValueError
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        elif default is None:  # the optional numbers (global_weight, growth_target); "none" is the method default
            value = None if text.lower() == "none" else float(text)
        else:
            value = text
    except ValueError:
        if name == "crop_scale":
            example = "ALPHA:BETA such as 0.4:0.8"
        else:
            example = "a number or none" if default is None else type(default).__name__
        raise EvaluationError(f"--sweep {name}: value {text!r} is not {example}") from None
    if name in _CHOICES and value not in _CHOICES[name]:
        raise EvaluationError(f"--sweep {name}: value {text!r} is unknown; choose from {', '.join(_CHOICES[name])}")
    try:
        dataclasses.replace(_PROBE, **{name: value})
    except ConfigError as error:
        raise EvaluationError(f"--sweep {name}={text} is invalid: {error}") from None
    return value


def _written(value: Any) -> str:
    return ":".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


__all__ = [
    "Setting",
    "describe_changes",
    "parse_sweep",
    "sweep_settings",
]
