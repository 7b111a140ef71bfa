"""Labelled scenes where location matters: Fashion-MNIST objects at known boxes on clutter.

The instrument behind the label-quality tables of docs/EVALUATION.md. One compositor serves two uses:
training views for the project's small image-text model (train split, `training_views`) and evaluation
scenes (test split, `render_scenes`), so the model has seen the kind of clutter that scenes hold but never
their objects. Pure numpy and torch; every output is a function of its seed.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)  # Fashion-MNIST's ten labels, in label order
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TILE = 28  # Fashion-MNIST image side
SCENE_SCALES = (1.0, 0.6, 0.4, 0.3, 0.2)  # object tile side / canvas shorter side
SCENE_SIZE = (192, 144)  # canvas (width, height)
TRAIN_SCALE = (0.33, 1.0)  # object tile side / view side in training views
_ALPHA_GAIN = 3.0  # ink above a third of full intensity is opaque; faint edges blend into the clutter


@dataclass(frozen=True)
class Objects:
    """Fashion-MNIST images of one split."""

    images: np.ndarray  # (n, 28, 28) uint8, object bright on black
    labels: np.ndarray  # (n,) int64 indices into CLASSES


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> Objects:
    """Read one split of Fashion-MNIST from its IDX files.

    Raises:
        FileNotFoundError: the files are missing, with the package that provides them.
    """
    if split not in _FILES:
        raise ValueError(f"split {split!r} is unknown; choose train or test")
    image_file, label_file = (Path(root) / name for name in _FILES[split])
    if not image_file.is_file() or not label_file.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files are missing under {root}; install them with "
            "`apt-get install dataset-fashion-mnist` (Debian) or pass the folder that holds them"
        )
    images = _read_idx(image_file)
    labels = _read_idx(label_file).astype(np.int64)
    if images.shape[1:] != (TILE, TILE) or len(images) != len(labels):
        raise ValueError(f"{image_file}: unexpected shapes {images.shape} and {labels.shape}")
    return Objects(images, labels)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dimensions as big-endian int32, then unsigned bytes."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


# ---------------------------------------------------------------- compositing


def clutter(generator: torch.Generator, batch: int, height: int, width: int) -> torch.Tensor:
    """Varied backgrounds (B, 3, H, W) in [0, 1]: coloured noise at several scales, stripes, patches.

    Each image mixes a base colour, low-frequency colour blobs, fine grain, and sometimes stripes and
    rectangles, so that no single texture statistic marks "background".
    """

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    canvas = uniform(batch, 3, 1, 1).expand(batch, 3, height, width) * 0.8
    for cells in (2, 4, 8):
        blobs = uniform(batch, 3, cells, cells) - 0.5
        strength = uniform(batch, 1, 1, 1) * 0.6
        canvas = canvas + strength * F.interpolate(blobs, size=(height, width), mode="bicubic", align_corners=False)
    canvas = canvas + (uniform(batch, 1, 1, 1) * 0.25) * (uniform(batch, 3, height, width) - 0.5)
    # stripes at a random angle and period on about a third of the images
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    angle = uniform(batch, 1, 1) * math.pi
    period = 4 + uniform(batch, 1, 1) * min(height, width) / 4
    wave = torch.sin(2 * math.pi * (xs * torch.cos(angle) + ys * torch.sin(angle)) / period)
    on = (uniform(batch, 1, 1) < 0.35).float() * uniform(batch, 1, 1) * 0.3
    canvas = canvas + (on * wave)[:, None] * (uniform(batch, 3, 1, 1) - 0.3)
    # a few flat rectangles
    for _ in range(3):
        x0, y0 = uniform(batch, 1, 1) * width, uniform(batch, 1, 1) * height
        w, h = uniform(batch, 1, 1) * width / 2, uniform(batch, 1, 1) * height / 2
        inside = ((xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)).float()
        inside = inside * (uniform(batch, 1, 1) < 0.5).float()
        canvas = canvas * (1 - inside[:, None]) + inside[:, None] * uniform(batch, 3, 1, 1)
    return canvas.clamp(0.0, 1.0)


def tinted(tiles: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and opacity of Fashion-MNIST tiles (B, 28, 28) uint8.

    The ink's intensity becomes shading under a random colour; its opacity follows the ink, so the
    object's shape and texture survive on any background.

    Returns:
        colour (B, 3, 28, 28) and alpha (B, 1, 28, 28), both in [0, 1].
    """
    ink = tiles.float()[:, None] / 255.0
    base = torch.rand((tiles.shape[0], 3, 1, 1), generator=generator) * 0.8 + 0.2
    colour = base * (0.3 + 0.7 * ink)
    alpha = (ink * _ALPHA_GAIN).clamp(0.0, 1.0)
    return colour, alpha


def paste(
    canvas: torch.Tensor,
    colour: torch.Tensor,
    alpha: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Composite the `source` part of each tile onto `target` pixels of each canvas.

    Args:
        canvas: (B, 3, H, W) in [0, 1].
        colour, alpha: tiles (B, 3, t, t) and (B, 1, t, t).
        source: (B, 4) xyxy part of each tile, as fractions of the tile (0..1); (0, 0, 1, 1) is all of it.
        target: (B, 4) xyxy pixel box of the canvas that the part fills.

    Returns:
        The composited canvases; pixels outside a target box are unchanged.
    """
    batch, _, height, width = canvas.shape
    xs = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5).view(1, height, 1)
    tx0, ty0, tx1, ty1 = (target[:, i].view(batch, 1, 1) for i in range(4))
    sx0, sy0, sx1, sy1 = (source[:, i].view(batch, 1, 1) for i in range(4))
    u = sx0 + (xs - tx0) / (tx1 - tx0) * (sx1 - sx0)  # (B, 1, W): position in the tile, fraction of its side
    v = sy0 + (ys - ty0) / (ty1 - ty0) * (sy1 - sy0)  # (B, H, 1)
    grid = torch.stack([(u * 2 - 1).expand(batch, height, width), (v * 2 - 1).expand(batch, height, width)], dim=-1)
    inside = ((u >= sx0) & (u <= sx1) & (v >= sy0) & (v <= sy1)).float()[:, None]  # (B, 1, H, W)
    sampled = F.grid_sample(torch.cat([colour * alpha, alpha], dim=1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    premultiplied, opacity = sampled[:, :3] * inside, sampled[:, 3:] * inside
    return canvas * (1 - opacity) + premultiplied


def _fragments(
    canvas: torch.Tensor,
    objects: Objects,
    pool: np.ndarray,
    count: int,
    tile_side: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Paste up to `count` fragments of random objects from `pool` onto each canvas, at random places.

    A fragment is a third to two thirds of a tile, at the magnification of the canvas's own object
    (`tile_side` (B, 1) pixels per tile), so it reads as a piece of something, never as a whole object.
    """
    batch, _, height, width = canvas.shape
    for _ in range(count):
        picks = pool[torch.randint(len(pool), (batch,), generator=generator).numpy()]
        colour, alpha = tinted(torch.from_numpy(objects.images[picks]), generator)
        part = torch.rand((batch, 1), generator=generator) * (2 / 3 - 1 / 3) + 1 / 3
        sx0 = torch.rand((batch, 1), generator=generator) * (1 - part)
        sy0 = torch.rand((batch, 1), generator=generator) * (1 - part)
        source = torch.cat([sx0, sy0, sx0 + part, sy0 + part], dim=1)
        side = part * tile_side
        x0 = torch.rand((batch, 1), generator=generator) * (width - side)
        y0 = torch.rand((batch, 1), generator=generator) * (height - side)
        target = torch.cat([x0, y0, x0 + side, y0 + side], dim=1)
        show = (torch.rand((batch, 1, 1, 1), generator=generator) < 0.8).float()
        canvas = canvas * (1 - show) + show * paste(canvas, colour, alpha, source, target)
    return canvas


def tight_boxes(tiles: np.ndarray, tile_boxes: np.ndarray) -> np.ndarray:
    """The object's own extent (ink above the opacity threshold) inside each placed tile, pixel xyxy.

    Args:
        tiles: (B, 28, 28) uint8.
        tile_boxes: (B, 4) pixel xyxy where each whole tile was pasted.
    """
    out = np.empty((len(tiles), 4), dtype=np.float64)
    for i, (tile, box) in enumerate(zip(tiles, tile_boxes)):
        rows = np.nonzero((tile.astype(np.float32) / 255 * _ALPHA_GAIN >= 0.5).any(axis=1))[0]
        cols = np.nonzero((tile.astype(np.float32) / 255 * _ALPHA_GAIN >= 0.5).any(axis=0))[0]
        if len(rows) == 0:
            out[i] = box
            continue
        cell = (box[2] - box[0]) / TILE
        out[i] = (box[0] + cols[0] * cell, box[1] + rows[0] * cell, box[0] + (cols[-1] + 1) * cell, box[1] + (rows[-1] + 1) * cell)
    return out


# ---------------------------------------------------------------- training views


def training_views(
    objects: Objects,
    indices: np.ndarray,
    size: int,
    generator: torch.Generator,
    plain: float = 0.15,
    present: np.ndarray | None = None,
) -> torch.Tensor:
    """Training views (B, 3, size, size) in [0, 1], one object each, as CLIP's data looks.

    Each view holds the object `indices` at a tile side from a third of the view to all of it, at a
    random place, over clutter with fragments of other objects (or, with probability `plain`, over the
    dataset's own black), rendered at twice the size and reduced, as the scorer's antialiased resize would.
    Where `present` (B,) is False the object is left out: the view is clutter and fragments only, which
    teaches the model that a piece of something is not a whole object.
    """
    batch, render = len(indices), 2 * size
    side = (torch.rand((batch, 1), generator=generator) * (TRAIN_SCALE[1] - TRAIN_SCALE[0]) + TRAIN_SCALE[0]) * render
    count = int(torch.randint(0, 4, (1,), generator=generator))
    canvas = _fragments(clutter(generator, batch, render, render), objects, np.arange(len(objects.labels)), count, side, generator)
    black = (torch.rand((batch, 1, 1, 1), generator=generator) < plain).float()
    canvas = canvas * (1 - black)
    colour, alpha = tinted(torch.from_numpy(objects.images[indices]), generator)
    if present is not None:
        alpha = alpha * torch.from_numpy(np.asarray(present, dtype=np.float32)).view(batch, 1, 1, 1)
    x0 = torch.rand((batch, 1), generator=generator) * (render - side)
    y0 = torch.rand((batch, 1), generator=generator) * (render - side)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(batch, 4)
    canvas = paste(canvas, colour, alpha, whole, torch.cat([x0, y0, x0 + side, y0 + side], dim=1))
    return F.avg_pool2d(canvas, 2)


# ---------------------------------------------------------------- evaluation scenes


@dataclass(frozen=True)
class Scene:
    """One rendered scene and its truth."""

    key: str  # scale-<s>/<class>/<index>.jpg, unique in a scene set
    label: str
    scale: float  # object tile side / canvas shorter side
    box: tuple[float, float, float, float]  # the object's extent, normalised xyxy of the canvas
    tile_box: tuple[float, float, float, float]  # the square where the whole tile was placed, normalised xyxy
    pixels: np.ndarray  # (H, W, 3) uint8


def render_scenes(
    objects: Objects,
    per_class: int,
    scales: tuple[float, ...] = SCENE_SCALES,
    seed: int = 0,
    size: tuple[int, int] = SCENE_SIZE,
    fragments: int = 4,
) -> list[Scene]:
    """Scenes of every class at every scale: one labelled object at a known box over clutter.

    The object's tile spans `scale` of the canvas's shorter side at a uniformly random place; up to
    `fragments` parts of objects of other classes lie behind it. At scale 1 the object fills the shorter
    side; at 0.6 and above a crop of half the shorter side holds only part of it (a sleeve, a heel); at 0.3
    and below the whole image shows mostly clutter.

    Args:
        objects: the split to draw objects from (the test split, for measurements).
        per_class: scenes per class and scale; objects are drawn without replacement within a class.
        scales: object scales.
        seed: fixes every choice.
        size: canvas (width, height).
        fragments: fragments of other classes behind the object.

    Returns:
        Scenes ordered by scale, class and index.
    """
    width, height = size
    short = min(width, height)
    rng = np.random.default_rng(seed)
    scenes = []
    for scale_index, scale in enumerate(scales):
        generator = torch.Generator().manual_seed(seed * 1000 + scale_index)
        picks: list[int] = []  # object indices
        labels: list[int] = []
        for label in range(len(CLASSES)):
            members = np.nonzero(objects.labels == label)[0]
            if len(members) < per_class:
                raise ValueError(f"class {CLASSES[label]} has {len(members)} objects, fewer than {per_class}")
            picks.extend(rng.choice(members, size=per_class, replace=False))
            labels.extend([label] * per_class)
        picks_array = np.asarray(picks)
        batch = len(picks_array)
        side = scale * short
        canvas = clutter(generator, batch, height, width)
        for label in range(len(CLASSES)):
            rows = np.nonzero(np.asarray(labels) == label)[0]
            others = np.nonzero(objects.labels != label)[0]
            canvas[rows] = _fragments(canvas[rows], objects, others, fragments, torch.full((len(rows), 1), side), generator)
        x0 = rng.uniform(0, width - side, size=batch)
        y0 = rng.uniform(0, height - side, size=batch)
        tile_boxes = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
        colour, alpha = tinted(torch.from_numpy(objects.images[picks_array]), generator)
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(batch, 4)
        canvas = paste(canvas, colour, alpha, whole, torch.from_numpy(tile_boxes).float())
        pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        tight = tight_boxes(objects.images[picks_array], tile_boxes)
        scale_name = f"scale-{scale:.2f}"
        for i in range(batch):
            name = CLASSES[labels[i]]
            norm = np.array([width, height, width, height], dtype=np.float64)
            scenes.append(
                Scene(
                    key=f"{scale_name}/{name}/{i % per_class:04d}.jpg",
                    label=name,
                    scale=float(scale),
                    box=_xyxy(np.clip(tight[i] / norm, 0, 1)),
                    tile_box=_xyxy(np.clip(tile_boxes[i] / norm, 0, 1)),
                    pixels=np.ascontiguousarray(pixels[i]),
                )
            )
    return scenes


def _xyxy(box: np.ndarray) -> tuple[float, float, float, float]:
    """A (4,) box as the (x0, y0, x1, y1) floats of a Scene."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


__all__ = [
    "CLASSES",
    "FASHION_MNIST_DIR",
    "Objects",
    "SCENE_SCALES",
    "SCENE_SIZE",
    "Scene",
    "clutter",
    "load_fashion_mnist",
    "paste",
    "render_scenes",
    "tight_boxes",
    "tinted",
    "training_views",
]
