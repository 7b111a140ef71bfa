"""The Python API: load a model and vocabulary once, then label PIL images, arrays or tensors without Ray."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.config import DecodeConfig, ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.models.load import LoadedModel, default_cache_dir, load_model
from pipeline.models.text_vectors import text_vectors
from pipeline.schema import OK, READ_ERROR
from pipeline.scoring.combine import ImageScore
from pipeline.stages.decode import DecodedImage, decode_for_views, upright_pixels
from pipeline.stages.read_decode import ReadDecodeStage, decoded_pixels
from pipeline.stages.score_rows import scorer_for
from pipeline.vocab import Vocabulary, load_vocabulary

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def to_pixels(
    image: ImageLike, decode: DecodeConfig | None = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A uint8 RGB tensor (3, H, W) and the (width, height) of the upright original.

    Paths and PIL images go through the pipeline's own decoder (`decode_image`, `upright_pixels`): EXIF
    orientation, 16-bit scaling, transparency over grey and the reduced decode scale are those of `lgca run`,
    so a file gives the same pixels and the same scores through both. HWC arrays and CHW tensors are used
    as given (uint8, or float in [0, 1]).

    Raises:
        OSError: a file that cannot be read (missing, larger than the byte limit, ...).
        ValueError: a file that cannot be decoded (the message says why), or an array of the wrong shape.
    """
    decode = decode or DecodeConfig()
    if isinstance(image, (str, os.PathLike)):  # read and decoded by the job's own stage: its limits and messages
        path = os.fspath(image)
        rows = ReadDecodeStage(decode, storage_options or {})(pa.table({"key": [path], "path": [path]}))
        status, message = rows.column("status")[0].as_py(), rows.column("error_message")[0].as_py()
        if status == READ_ERROR:
            raise OSError(f"{image}: {message}")
        if status != OK:
            raise ValueError(f"cannot decode {image}: {message}")
        pixels = decoded_pixels(rows, 0)
        width, height = rows.column("width")[0].as_py(), rows.column("height")[0].as_py()
        return _from_decoded(DecodedImage(pixels, width, height))
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"the image has no pixels (size {image.size})")
        image.load()
        return _from_decoded(upright_pixels(image.copy(), decode.min_short_side))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"the image has no pixels (shape {image.shape})")
        if np.issubdtype(image.dtype, np.floating):
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        elif image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array or floats in [0, 1], got {image.dtype}")
        # through PIL too, for the same reduced scale (a box filter) as a file of these pixels
        return _from_decoded(upright_pixels(Image.fromarray(np.ascontiguousarray(image)), decode.min_short_side))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"the image has no pixels (shape {tuple(image.shape)})")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 or float tensor, got {image.dtype}")
        return to_pixels(image.detach().cpu().permute(1, 2, 0).contiguous().numpy(), decode)
    raise TypeError(f"cannot label a {type(image).__name__}; pass a PIL image, an array, a tensor or a path")


def _from_decoded(decoded: DecodedImage) -> tuple[torch.Tensor, tuple[int, int]]:
    pixels = decoded.pixels if decoded.pixels.flags.writeable else decoded.pixels.copy()  # torch warns on read-only arrays
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), (decoded.width, decoded.height)


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
        self.decode = decode_for_views(model.image_size, [scoring])
        self.scorer = scorer_for(model, vocabulary.classes, vectors, scoring)

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
        **model_options: Any,
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
            model_options: further ModelConfig fields, e.g. weights_tag="openai" for weights exported from that
                tag, or image_mean, image_std, interpolation, resize_mode, quick_gelu.

        Raises:
            ConfigError: bad vocabulary, model or parameters.
        """
        scoring = scoring or ScoringConfig()
        model_config = ModelConfig(
            name=model, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir, **model_options
        )
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
        """Score images; `keys` fix each image's crops (default: a hash of its pixels, or its path).

        A result whose `error` is set has no label: its scores were not finite.
        """
        if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3):
            raise TypeError(f"label() takes a sequence of images, got a single {type(images).__name__}; wrap it in a list")
        converted = [to_pixels(image, self.decode) for image in images]
        pixels = [p for p, _ in converted]
        sizes = [size for _, size in converted]
        if keys is not None and len(keys) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(keys)} keys")
        if keys is None:
            keys = [str(image) if isinstance(image, (str, os.PathLike)) else content_key(p) for image, p in zip(images, pixels)]
        results: list[ImageScore] = []
        for start in range(0, len(pixels), batch_size):
            window = slice(start, start + batch_size)
            results.extend(self.scorer.score(pixels[window], keys[window], sizes[window]))
        return results


def _vocabulary_from(
    labels: str | Sequence[str] | Mapping[str, Sequence[str]],
    templates: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
) -> Vocabulary:
    from pipeline.vocab import parse_labels

    if isinstance(labels, (str, os.PathLike)):
        vocabulary = load_vocabulary(VocabularyConfig(labels=str(labels)), storage_options)
    else:
        text = json.dumps(dict(labels) if isinstance(labels, Mapping) else list(labels))
        classes, descriptions = parse_labels(text, "labels.json")
        vocabulary = Vocabulary(classes=classes, descriptions=descriptions)
    if templates is not None:
        vocabulary = Vocabulary(vocabulary.classes, vocabulary.descriptions, tuple(templates), vocabulary.prompt)
    return vocabulary
