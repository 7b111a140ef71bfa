"""A tiny real open_clip architecture with seeded random weights, fast enough for a 2-core CPU."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig, ScoringConfig
from pipeline.models.load import LoadedModel, load_model
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.text import class_vectors
from pipeline.stages.score_rows import scorer_for as build_scorer

from .support import TINY_MODEL

CLASSES = ("cat", "dog", "coffee cup", "rocket", "astronaut")
DESCRIPTIONS = {
    "cat": ("a small furry pet with whiskers", "a cat sitting on a sofa", "a kitten"),
    "dog": ("a loyal pet that barks", "a dog on a leash"),
    "coffee cup": ("a cup of hot coffee", "a mug with a saucer"),
    "rocket": ("a rocket on a launch pad", "a space launch vehicle"),
    "astronaut": ("a person in a space suit",),
}


def tiny_model(seed: int = 0, **overrides: str) -> LoadedModel:
    return load_model(ModelConfig(name=TINY_MODEL, pretrained="random", random_seed=seed, **overrides))


def scorer_for(
    model: LoadedModel,
    config: ScoringConfig,
    classes=CLASSES,
    descriptions=DESCRIPTIONS,
    templates=("a photo of a {}.", "a picture of the {}."),
    encode_image=None,
) -> Scorer:
    vectors = class_vectors(config.method, classes, model.encode_text, descriptions, templates, "a photo of a {}.", config.text_scale)
    return build_scorer(model, classes, vectors, config, encode_image)


def random_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images of assorted sizes (aspect ratios from portrait to panorama)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = [(96, 64), (64, 96), (120, 40), (50, 50), (80, 72)][index % 5]
        coarse = rng.integers(0, 256, size=(3, height // 8 + 1, width // 8 + 1)).astype(np.float32)
        upsampled = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(height, width), mode="bilinear")
        images.append(upsampled[0].round().clamp(0, 255).to(torch.uint8))
    return images
