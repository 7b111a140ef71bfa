"""An analytic CLIP stand-in whose semantics are known: images embed by colour content, texts by colour words.

It lets tests check the LGCA mechanics (which regions are salient, how views are weighted) against ground
truth without real weights. It says nothing about accuracy on real photographs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.scoring.views import ViewFormat

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
}
COLOURS = tuple(PALETTE)
VIEW = ViewFormat(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
MATCH_DISTANCE = 60.0  # a pixel within this RGB distance of a palette colour counts as that colour


@dataclass
class ColourEncoder:
    """Image encoder: the share of pixels near each palette colour, plus one 'background' share.

    Calls and rows are counted so tests can check the number of encoder passes.
    """

    view: ViewFormat = VIEW
    calls: int = 0
    rows: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += views.shape[0]
        self.batch_sizes.append(views.shape[0])
        mean = torch.tensor(self.view.mean, device=views.device).view(1, 3, 1, 1)
        std = torch.tensor(self.view.std, device=views.device).view(1, 3, 1, 1)
        rgb = (views.float() * std + mean) * 255.0  # (B, 3, S, S)
        palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=views.device)  # (P, 3)
        distance = torch.linalg.vector_norm(rgb[:, None] - palette[None, :, :, None, None], dim=2)  # (B, P, S, S)
        nearest = distance.min(dim=1)
        matched = nearest.values < MATCH_DISTANCE
        shares = torch.stack([(matched & (nearest.indices == p)).float().mean(dim=(1, 2)) for p in range(len(PALETTE))], dim=1)
        background = 1.0 - shares.sum(dim=1, keepdim=True)
        return torch.cat([shares, background], dim=1) + 1e-3


def encode_colour_text(texts: list[str]) -> torch.Tensor:
    """Text encoder: one-hot on the colour words a sentence names; 'background' for none."""
    out = torch.full((len(texts), len(PALETTE) + 1), 1e-3)
    for row, text in enumerate(texts):
        named = [i for i, colour in enumerate(COLOURS) if colour in text.lower()]
        for index in named or [len(PALETTE)]:
            out[row, index] = 1.0
    return out


@dataclass(frozen=True)
class Scene:
    pixels: torch.Tensor  # uint8 (3, H, W)
    colour: str
    box: tuple[float, float, float, float]  # object, normalised xyxy

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def make_scene(rng: np.random.Generator, width: int = 160, height: int = 120, side: int = 30) -> Scene:
    """One coloured square object on a neutral grey textured background."""
    background = rng.normal(128, 18, size=(height, width, 1)).clip(70, 190)
    image = np.repeat(background, 3, axis=2)
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    x0 = int(rng.integers(0, width - side))
    y0 = int(rng.integers(0, height - side))
    image[y0 : y0 + side, x0 : x0 + side] = PALETTE[colour]
    pixels = torch.from_numpy(image.astype(np.uint8)).permute(2, 0, 1).contiguous()
    return Scene(pixels, colour, (x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height))
