"""Class text vectors for a loaded model and vocabulary, cached on disk under a key of everything they depend on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import ScoringConfig
from pipeline.models.load import LoadedModel
from pipeline.scoring.text import class_vectors, sentence_count
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)


def default_templates() -> tuple[str, ...]:
    """open_clip's OpenAI ImageNet prompt templates, as format strings with `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def text_vectors(
    model: LoadedModel,
    vocabulary: Vocabulary,
    scoring: ScoringConfig,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class vectors (C, D) on the CPU for `scoring.method`, cached on disk by model, vocabulary and method.

    Each scoring actor of a job computes them with its own model; the cache makes that once per node (a
    large vocabulary is embedded once per job instead, `run.embedding`). `progress` is called with the
    sentences embedded since its last call, `vocabulary_sentences` in all.
    """
    cache_file = cache_dir / "text" / f"{vectors_key(model, vocabulary, scoring)}.safetensors" if cache_dir is not None else None
    if cache_file is not None:
        cached = read_vectors(cache_file, len(vocabulary.classes))
        if cached is not None:
            return cached
    vectors = class_vectors(
        scoring.method,
        vocabulary.classes,
        model.encode_text,
        vocabulary.descriptions,
        _templates(vocabulary),
        vocabulary.prompt,
        scoring.text_scale,
        _descriptor_weights(scoring),
        progress,
    ).cpu()
    if cache_file is not None:
        _write_cached_vectors(cache_file, vectors)
    return vectors


def vectors_key(model: LoadedModel, vocabulary: Vocabulary, scoring: ScoringConfig) -> str:
    """A hash of everything class vectors depend on: the weights and architecture (content hashes), the
    activation, the sentences, the weighting, and where fp32 ran (CPU and CUDA kernels differ in the last bits)."""
    material = json.dumps(
        {
            "model": model.identity,
            "model_config_sha256": model.config_sha256,
            "quick_gelu": model.preprocessing.quick_gelu,
            "text_precision": "fp32",
            "device": model.device.type,
            "vocabulary": vocabulary.digest(),
            "templates": list(_templates(vocabulary)),
            "prompt": vocabulary.prompt,
            "method": scoring.method,
            "text_scale": scoring.text_scale,
            "descriptor_weights": _descriptor_weights(scoring),
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def vocabulary_sentences(vocabulary: Vocabulary, scoring: ScoringConfig) -> int:
    """How many sentences embedding `vocabulary` for `scoring.method` takes."""
    return sentence_count(scoring.method, vocabulary.classes, vocabulary.descriptions, _templates(vocabulary), _descriptor_weights(scoring))


def read_vectors(path: Path, classes: int) -> torch.Tensor | None:
    """Vectors from a safetensors file, or None when it is missing, unreadable or for another vocabulary size."""
    if not path.is_file():
        return None
    try:
        return vectors_from_bytes(path.read_bytes(), classes)
    except Exception as error:  # a corrupt cache entry is recomputed, not trusted
        log.warning("ignoring unreadable text-embedding cache %s: %s", path, error)
        return None


def vectors_from_bytes(data: bytes, classes: int) -> torch.Tensor | None:
    from safetensors.torch import load

    vectors = load(data)["vectors"]
    return vectors if vectors.shape[0] == classes else None


def vectors_to_bytes(vectors: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"vectors": vectors.contiguous()})


def _templates(vocabulary: Vocabulary) -> tuple[str, ...]:
    return tuple(vocabulary.templates) if vocabulary.templates is not None else default_templates()


def _descriptor_weights(scoring: ScoringConfig) -> str:
    return scoring.descriptor_weights if scoring.method == "descriptors" else "softmax"


def _write_cached_vectors(path: Path, vectors: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        with os.fdopen(handle, "wb") as out:
            out.write(vectors_to_bytes(vectors))
        os.replace(temporary, path)
    except OSError as error:  # a read-only cache only costs a recomputation
        log.warning("cannot write text-embedding cache %s: %s", path, error)
