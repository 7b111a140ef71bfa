"""Class text vectors for a loaded model and vocabulary, cached on disk under a key of everything they depend on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from pipeline.config import ScoringConfig
from pipeline.models.load import LoadedModel
from pipeline.scoring.text import class_vectors
from pipeline.stages.vocab import Vocabulary

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
) -> torch.Tensor:
    """Class vectors (C, D) on the CPU for `scoring.method`, cached on disk by model, vocabulary and method.

    Each scoring actor of a job computes them with its own model; the cache makes that once per node.
    """
    templates = vocabulary.templates if vocabulary.templates is not None else default_templates()
    descriptor_weights = scoring.descriptor_weights if scoring.method == "descriptors" else "softmax"
    # everything the vectors depend on: the weights and architecture (content hashes), the activation, the
    # sentences, the weighting, and where fp32 ran (CPU and CUDA kernels differ in the last bits)
    key_material = json.dumps(
        {
            "model": model.identity,
            "model_config_sha256": model.config_sha256,
            "quick_gelu": model.preprocessing.quick_gelu,
            "text_precision": "fp32",
            "device": model.device.type,
            "vocabulary": vocabulary.digest(),
            "templates": list(templates),
            "prompt": vocabulary.prompt,
            "method": scoring.method,
            "text_scale": scoring.text_scale,
            "descriptor_weights": descriptor_weights,
        },
        sort_keys=True,
    )
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_dir / "text" / f"{hashlib.sha256(key_material.encode()).hexdigest()}.safetensors"
        cached = _read_cached_vectors(cache_file, len(vocabulary.classes))
        if cached is not None:
            return cached
    vectors = class_vectors(
        scoring.method,
        vocabulary.classes,
        model.encode_text,
        vocabulary.descriptions,
        templates,
        vocabulary.prompt,
        scoring.text_scale,
        descriptor_weights,
    ).cpu()
    if cache_file is not None:
        _write_cached_vectors(cache_file, vectors)
    return vectors


def _read_cached_vectors(path: Path, classes: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        vectors = load_file(str(path))["vectors"]
    except Exception as error:  # a corrupt cache entry is recomputed, not trusted
        log.warning("ignoring unreadable text-embedding cache %s: %s", path, error)
        return None
    return vectors if vectors.shape[0] == classes else None


def _write_cached_vectors(path: Path, vectors: torch.Tensor) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        os.close(handle)
        save_file({"vectors": vectors.contiguous()}, temporary)
        os.replace(temporary, path)
    except OSError as error:  # a read-only cache only costs a recomputation
        log.warning("cannot write text-embedding cache %s: %s", path, error)
