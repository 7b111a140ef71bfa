"""Job specs: a YAML or JSON mapping (what `lgca submit` and `jobs/label_images.py --spec` read) to a JobConfig,
with unknown keys and wrong types named, and secrets refused (they travel in storage option files, never specs)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from pipeline.config import ConfigError, DecodeConfig, ExecutionConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig, require
from pipeline.credentials import is_secret_option


def config_from_mapping(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build a config dataclass from a mapping, naming unknown keys.

    Raises:
        ConfigError: a key is not a field of `cls`, or a value is invalid.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    require(not unknown, f"unknown key(s) in {where}: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    for name, value in values.items():
        expected, optional = _scalar_type(hints[name])
        if expected is not None and not (optional and value is None) and not _fits(value, expected):
            nullable = " or null" if optional else ""
            raise ConfigError(f"{where}: `{name}` must be {expected.__name__}{nullable}, got {type(value).__name__} {value!r}")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def _scalar_type(annotation: Any) -> tuple[type | None, bool]:
    """(int, float, str or bool, else None; whether None is allowed) for a field annotation such as `int | None`."""
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    scalars = [arg for arg in args if arg in (int, float, str, bool)]
    return (scalars[0] if len(scalars) == 1 else None), type(None) in args


def _secret_names(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of secret-looking keys in storage options, nested mappings (client_kwargs, ...) included."""
    found = []
    for name, value in options.items():
        dotted = f"{prefix}{name}"
        if is_secret_option(str(name)):
            found.append(dotted)
        elif isinstance(value, Mapping):
            found.extend(_secret_names(value, f"{dotted}."))
    return found


def _fits(value: Any, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False  # YAML's `yes` must not pass for a number
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


JOB_SECTIONS = {
    "vocabulary": VocabularyConfig,
    "model": ModelConfig,
    "scoring": ScoringConfig,
    "decode": DecodeConfig,
    "execution": ExecutionConfig,
}


JOB_SCALARS = ("inputs", "output", "resume", "retry_failed", "overwrite", "embeddings", "image_column", "storage_options")


def job_from_spec(spec: Mapping[str, Any], where: str = "job spec") -> tuple[JobConfig, dict[str, Any]]:
    """A JobConfig and non-secret storage options from a parsed job spec (YAML or JSON).

    The spec mirrors JobConfig: top-level `inputs`, `output`, `resume`, `retry_failed`, `overwrite`, `embeddings`,
    `image_column`, `storage_options`,
    and one mapping per section (`vocabulary`, `model`, `scoring`, `decode`, `execution`).

    Raises:
        ConfigError: an unknown key (named with its section), a wrong type, or an invalid value.
    """
    require(isinstance(spec, Mapping), f"{where} must be a mapping of keys to values, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(JOB_SECTIONS) - set(JOB_SCALARS))
    require(not unknown, f"unknown key(s) in {where}: {', '.join(unknown)}; valid keys: {', '.join(sorted([*JOB_SECTIONS, *JOB_SCALARS]))}")
    sections = {}
    for name, cls in JOB_SECTIONS.items():
        values = spec.get(name) or {}
        require(isinstance(values, Mapping), f"{where}: `{name}` must be a mapping, got {type(values).__name__}")
        if "crop_scale" in values:
            values = {**values, "crop_scale": tuple(values["crop_scale"])}
        sections[name] = config_from_mapping(cls, values, f"{where} `{name}`")
    inputs = spec.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    require(
        isinstance(inputs, list) and bool(inputs) and all(isinstance(i, str) for i in inputs),
        f"{where}: `inputs` must be a non-empty list of paths or URIs",
    )
    output = spec.get("output")
    require(isinstance(output, str) and bool(output), f"{where}: `output` must be a path or URI")
    for flag in ("resume", "retry_failed", "overwrite", "embeddings"):
        require(isinstance(spec.get(flag, False), bool), f"{where}: `{flag}` must be true or false")
    image_column = spec.get("image_column")
    require(image_column is None or isinstance(image_column, str), f"{where}: `image_column` must be a column name")
    storage = spec.get("storage_options") or {}
    require(isinstance(storage, Mapping), f"{where}: `storage_options` must be a mapping")
    secrets = sorted(_secret_names(storage))
    require(
        not secrets,
        f"{where}: `storage_options` must not hold secrets ({', '.join(secrets)}); "
        "give credentials through AWS environment variables, files or service accounts",
    )
    assert isinstance(inputs, list) and isinstance(output, str)  # checked above; tells the type checker
    job = JobConfig(
        inputs=tuple(inputs),
        output=output,
        resume=spec.get("resume", False),
        retry_failed=spec.get("retry_failed", False),
        overwrite=spec.get("overwrite", False),
        embeddings=spec.get("embeddings", False),
        image_column=image_column,
        **sections,
    )
    return job, dict(storage)
