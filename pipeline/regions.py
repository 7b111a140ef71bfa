"""Region geometry: seeded crop sampling per image key, IoU, and box expansion, in normalised xyxy."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def image_seed(seed: int, key: str) -> int:
    """A 64-bit seed from the job seed and the image key, stable across processes and machines.

    Python's `hash` is salted per process, so a resumed job would sample other crops; blake2b is not.
    """
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_crops(
    key: str,
    width: int,
    height: int,
    count: int,
    scale: tuple[float, float],
    seed: int,
    layout: str = "random",
) -> np.ndarray:
    """Square local crops of one image, as normalised xyxy boxes.

    Args:
        key: the image's stable key; with `seed` it fixes the random crops.
        width, height: size of the upright original image, so boxes do not depend on the decode scale.
        count: N, the number of crops.
        scale: (alpha, beta); a crop's side is u * min(width, height), u ~ U[alpha, beta].
        seed: the job seed.
        layout: "random" (uniform placement) or "grid" (sqrt(N) x sqrt(N) tiles of side
            (alpha + beta) / 2 * min(width, height), evenly spaced, corners included).

    Returns:
        float64 array (count, 4) of x0, y0, x1, y1 in [0, 1].
    """
    if count == 0:
        return np.zeros((0, 4), dtype=np.float64)
    short = float(min(width, height))
    if layout == "grid":
        side = math.isqrt(count)
        sides = np.full(count, (scale[0] + scale[1]) / 2 * short)
        fractions = np.linspace(0.0, 1.0, side) if side > 1 else np.array([0.5])
        fx, fy = np.meshgrid(fractions, fractions, indexing="xy")
        fx, fy = fx.ravel(), fy.ravel()
    else:
        rng = np.random.default_rng(image_seed(seed, key))
        sides = rng.uniform(scale[0], scale[1], size=count) * short
        fx = rng.uniform(0.0, 1.0, size=count)
        fy = rng.uniform(0.0, 1.0, size=count)
    box_w = sides / width
    box_h = sides / height
    x0 = fx * (1.0 - box_w)
    y0 = fy * (1.0 - box_h)
    return np.stack([x0, y0, x0 + box_w, y0 + box_h], axis=1)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (A, 4) x (B, 4) -> (A, B)."""
    left = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    top = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    right = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    bottom = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def grow_boxes(boxes: np.ndarray, growth: float) -> np.ndarray:
    """Grow normalised xyxy boxes about their centres by `growth` per axis, kept inside the image.

    A box that would cross an edge is shifted back inside first and clipped only if it is larger than
    the image, so the grown box always contains its parent.
    """
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    new_w = np.minimum((boxes[:, 2] - boxes[:, 0]) * growth, 1.0)
    new_h = np.minimum((boxes[:, 3] - boxes[:, 1]) * growth, 1.0)
    x0 = np.clip(centre_x - new_w / 2, 0.0, 1.0 - new_w)
    y0 = np.clip(centre_y - new_h / 2, 0.0, 1.0 - new_h)
    return np.stack([x0, y0, x0 + new_w, y0 + new_h], axis=1)


def select_salient(
    saliency: np.ndarray,
    boxes: np.ndarray,
    eligible: np.ndarray,
    count: int,
    max_iou: float,
) -> list[int]:
    """Indices of the `count` most salient eligible regions that overlap each other at most `max_iou`.

    Regions are taken greedily by saliency; one that overlaps an already chosen region above `max_iou`
    is passed over. If that leaves fewer than `count`, the most salient passed-over ones fill the gap,
    so a step always grows `count` regions while at least that many are eligible.
    """
    order = [int(i) for i in np.argsort(-saliency, kind="stable") if eligible[i]]
    chosen: list[int] = []
    for index in order:
        if len(chosen) == count:
            break
        if not chosen or box_iou(boxes[index : index + 1], boxes[chosen]).max() <= max_iou:
            chosen.append(index)
    rest = [i for i in order if i not in chosen]
    chosen.extend(rest[: max(0, count - len(chosen))])
    return chosen
