"""The Python API: load a model and vocabulary once, then label PIL images, arrays or tensors without Ray."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.models.load import LoadedModel, default_cache_dir, load_model
from pipeline.models.text_vectors import text_vectors
from pipeline.scoring.combine import ImageScore
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ViewFormat
from pipeline.stages.vocab import Vocabulary, load_vocabulary

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def to_pixels(image: ImageLike) -> torch.Tensor:
    """A uint8 RGB tensor (3, H, W) from a PIL image (EXIF orientation applied), an HWC array, a tensor or a path."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return to_pixels(ImageOps.exif_transpose(opened).convert("RGB"))
    if isinstance(image, Image.Image):
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return to_pixels(torch.from_numpy(np.asarray(upright, dtype=np.uint8).copy()).permute(2, 0, 1))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        array = np.ascontiguousarray(image)
        if not array.flags.writeable:  # np.asarray(pil_image) is read-only, and torch warns on such arrays
            array = array.copy()
        return to_pixels(torch.from_numpy(array).permute(2, 0, 1))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"the image has no pixels (shape {tuple(image.shape)})")
        if image.dtype == torch.uint8:
            return image.contiguous()
        if image.is_floating_point():
            return (image.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        raise ValueError(f"expected a uint8 or float tensor, got {image.dtype}")
    raise TypeError(f"cannot label a {type(image).__name__}; pass a PIL image, an array, a tensor or a path")


def content_key(pixels: torch.Tensor) -> str:
    """A key from the pixels themselves, so an image gets the same crops wherever it appears."""
    digest = hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=12)
    digest.update(str(tuple(pixels.shape)).encode())
    return digest.hexdigest()


class Labeler:
    """Model, class vectors and scorer, set up once; `label` scores any number of images.

    Example:
        >>> labeler = Labeler.load(["cat", "dog"], pretrained="/weights/vit-b-32.safetensors")
        >>> labeler.label([Image.open("cat.jpg")])[0].label
        'cat'
    """

    def __init__(self, model: LoadedModel, vocabulary: Vocabulary, scoring: ScoringConfig, vectors: torch.Tensor) -> None:
        self.model = model
        self.vocabulary = vocabulary
        self.scoring = scoring
        self.scorer = Scorer(
            encode_image=model.encode_image,
            classes=vocabulary.classes,
            vectors=vectors,
            logit_scale=model.logit_scale,
            view=ViewFormat(model.image_size, model.mean, model.std),
            config=scoring,
            device=model.device,
        )

    @classmethod
    def load(
        cls,
        labels: str | Sequence[str] | Mapping[str, Sequence[str]],
        model: str = ModelConfig.name,
        pretrained: str = ModelConfig.pretrained,
        scoring: ScoringConfig | None = None,
        device: str = "auto",
        precision: str = "auto",
        templates: Sequence[str] | None = None,
        cache_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Labeler:
        """Load a labeler.

        Args:
            labels: a labels file path, a list of class names, or a mapping {class: [descriptions]}.
            model: open_clip architecture (or a model-config JSON path).
            pretrained: open_clip tag, weights file, fsspec URI, or "random".
            scoring: method and parameters; default LGCA with the documented defaults.
            device, precision: as in ModelConfig.
            templates: prompt templates with `{}`; default open_clip's OpenAI ImageNet set.
            cache_dir: weights and text-embedding cache.
            storage_options: fsspec options for remote labels or weights.

        Raises:
            ConfigError: bad vocabulary, model or parameters.
        """
        scoring = scoring or ScoringConfig()
        model_config = ModelConfig(name=model, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir)
        vocabulary = _vocabulary_from(labels, templates, storage_options)
        loaded = load_model(model_config, storage_options)
        vectors = text_vectors(loaded, vocabulary, scoring, default_cache_dir(model_config))
        return cls(loaded, vocabulary, scoring, vectors)

    def label(
        self,
        images: Sequence[ImageLike],
        keys: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> list[ImageScore]:
        """Score images; `keys` fix each image's crops (default: a hash of its pixels, or its path)."""
        if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3):
            raise TypeError(f"label() takes a sequence of images, got a single {type(images).__name__}; wrap it in a list")
        pixels = [to_pixels(image) for image in images]
        if keys is not None and len(keys) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(keys)} keys")
        if keys is None:
            keys = [str(image) if isinstance(image, (str, os.PathLike)) else content_key(p) for image, p in zip(images, pixels)]
        results: list[ImageScore] = []
        for start in range(0, len(pixels), batch_size):
            results.extend(self.scorer.score(pixels[start : start + batch_size], keys[start : start + batch_size]))
        return results


def _vocabulary_from(
    labels: str | Sequence[str] | Mapping[str, Sequence[str]],
    templates: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
) -> Vocabulary:
    from pipeline.stages.vocab import parse_labels

    if isinstance(labels, (str, os.PathLike)):
        vocabulary = load_vocabulary(VocabularyConfig(labels=str(labels)), storage_options)
    else:
        text = json.dumps(dict(labels) if isinstance(labels, Mapping) else list(labels))
        classes, descriptions = parse_labels(text, "labels.json")
        vocabulary = Vocabulary(classes=classes, descriptions=descriptions)
    if templates is not None:
        vocabulary = Vocabulary(vocabulary.classes, vocabulary.descriptions, tuple(templates), vocabulary.prompt)
    return vocabulary
