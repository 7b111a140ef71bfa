"""Label vocabularies: class names, descriptions and prompt templates, read and validated as text."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from pipeline.config import ConfigError, VocabularyConfig


class VocabularyError(ConfigError):
    """A vocabulary or templates file is unusable; the message names the offending entry."""


@dataclass(frozen=True)
class Vocabulary:
    """Classes in output order, optional descriptions per class, and the prompts used to embed them."""

    classes: tuple[str, ...]
    descriptions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # class -> sentences (may be absent)
    templates: tuple[str, ...] | None = None  # "{}" marks the class; None: the model's default ensemble
    prompt: str = "a photo of a {}."

    def digest(self) -> str:
        """sha256 of the canonical content: equal vocabularies hash equal whatever file they came from."""
        canonical = json.dumps(
            {
                "classes": list(self.classes),
                "descriptions": {name: list(self.descriptions.get(name, ())) for name in self.classes},
                "templates": list(self.templates) if self.templates is not None else None,
                "prompt": self.prompt,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_vocabulary(config: VocabularyConfig, storage_options: Mapping[str, Any] | None = None) -> Vocabulary:
    """Read the labels file (and templates file) named by `config`.

    Formats by extension: `.txt` one class per line (blank lines and `#` comments ignored); `.json`,
    `.yaml`, `.yml` either a list of class names or a descriptors mapping `{class: [sentence, ...]}`
    (the CuPL / DCLIP format). Local paths and fsspec URIs are accepted.

    Raises:
        VocabularyError: unreadable file, no classes, duplicate or empty class names, non-string entries,
            templates without a `{}` placeholder.
    """
    text = _read_text(config.labels, "labels", storage_options)
    classes, descriptions = parse_labels(text, config.labels)
    templates = None
    if config.templates:
        templates = parse_templates(_read_text(config.templates, "templates", storage_options), config.templates)
    return Vocabulary(classes=classes, descriptions=descriptions, templates=templates, prompt=config.prompt)


def parse_labels(text: str, source: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Classes and descriptions from the text of a labels file named `source` (its extension picks the format)."""
    lowered = source.lower()
    if lowered.endswith(".json"):
        data = _parse_structured(lambda: json.loads(text), source)
    elif lowered.endswith((".yaml", ".yml")):
        data = _parse_structured(lambda: yaml.safe_load(text), source)
    else:
        data = [
            (number, line.strip())
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
        return _validated_classes([(f"line {n}", name) for n, name in data], source), {}
    if isinstance(data, list):
        return _validated_classes([(f"entry {i}", item) for i, item in enumerate(data)], source), {}
    if isinstance(data, dict):
        classes = _validated_classes([(f"key {k!r}", k) for k in data], source)
        descriptions = {}
        for name, sentences in data.items():
            descriptions[name.strip()] = _validated_descriptions(name, sentences, source)
        return classes, descriptions
    raise VocabularyError(f"{source}: expected a list of class names or a mapping {{class: [descriptions]}}, got {type(data).__name__}")


def parse_templates(text: str, source: str) -> tuple[str, ...]:
    """Prompt templates, one per line, each with `{}` (or `{c}`) where the class name goes."""
    templates = []
    for number, line in enumerate(text.splitlines(), start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        template = template.replace("{c}", "{}")
        if template.count("{}") != 1:
            raise VocabularyError(f"{source} line {number}: template {template!r} needs exactly one {{}} for the class")
        try:
            template.format("class")
        except (KeyError, IndexError, ValueError):  # another field such as {style}, or a stray brace
            raise VocabularyError(
                f"{source} line {number}: template {template!r} has braces other than the one {{}}; write literal braces as {{{{ }}}}"
            ) from None
        templates.append(template)
    if not templates:
        raise VocabularyError(f"{source}: no templates found; write one per line, e.g. 'a photo of a {{}}.'")
    return tuple(templates)


def _read_text(path: str, what: str, storage_options: Mapping[str, Any] | None) -> str:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError:
        raise VocabularyError(f"{what} file {path} does not exist; check the path") from None
    except UnicodeDecodeError as error:
        raise VocabularyError(f"{what} file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise VocabularyError(f"cannot read {what} file {path}: {error}") from None


def _parse_structured(parse: Any, source: str) -> Any:
    try:
        return parse()
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise VocabularyError(f"{source} is not valid {source.rsplit('.', 1)[-1].upper()}: {error}") from None


def _validated_classes(entries: list[tuple[str, Any]], source: str) -> tuple[str, ...]:
    if not entries:
        raise VocabularyError(f"{source} has no classes; list at least one class name")
    seen: dict[str, str] = {}
    classes = []
    for where, item in entries:
        if not isinstance(item, str):
            raise VocabularyError(f"{source} {where}: class names must be strings, got {type(item).__name__} {item!r}")
        name = item.strip()
        if not name:
            raise VocabularyError(f"{source} {where}: empty class name")
        if name in seen:
            raise VocabularyError(f"{source} {where}: duplicate class {name!r} (first at {seen[name]})")
        seen[name] = where
        classes.append(name)
    return tuple(classes)


def _validated_descriptions(name: str, sentences: Any, source: str) -> tuple[str, ...]:
    if sentences is None:
        return ()
    if not isinstance(sentences, list):
        raise VocabularyError(f"{source} class {name!r}: descriptions must be a list of strings, got {type(sentences).__name__}")
    out = []
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            raise VocabularyError(f"{source} class {name!r} description {index}: expected a non-empty string, got {sentence!r}")
        out.append(sentence.strip())
    return tuple(out)
