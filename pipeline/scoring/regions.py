"""Region geometry: seeded crop sampling per image key, IoU, box expansion and salient-region selection, in
normalised xyxy of the upright original image."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np


def image_seed(seed: int, key: str) -> int:
    """A 64-bit seed from the job seed and the image key, stable across processes and machines.

    Python's `hash` is salted per process, so a resumed job would sample other crops; blake2b is not.
    """
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_crops(
    key: str,
    width: int,
    height: int,
    count: int,
    scale: tuple[float, float],
    seed: int,
    layout: str = "random",
    content: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> np.ndarray:
    """Square local crops of one image, as normalised xyxy boxes.

    Args:
        key: the image's stable key; with `seed` it fixes the random crops.
        width, height: size of the upright original image, so boxes do not depend on the decode scale.
        count: N, the number of crops; the first i crops do not depend on it (for count >= i).
        scale: (alpha, beta); a crop's side is u * min(width, height), u ~ U[alpha, beta].
        seed: the job seed.
        layout: "random" (uniform placement) or "grid" (sqrt(N) x sqrt(N) tiles of side
            (alpha + beta) / 2 * min(width, height), evenly spaced, corners included).
        content: the picture's normalised box inside a letter box (`letterbox.content_box`): crops are laid out
            in it, their sides a share of its shorter side. The whole image by default.

    Returns:
        float64 array (count, 4) of x0, y0, x1, y1 in [0, 1].
    """
    if count == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if content != (0.0, 0.0, 1.0, 1.0):  # laid out in the picture, then placed back in the whole image
        cx0, cy0, cx1, cy1 = content
        inner = sample_crops(key, max(1, round(width * (cx1 - cx0))), max(1, round(height * (cy1 - cy0))), count, scale, seed, layout)
        return inner * np.array([cx1 - cx0, cy1 - cy0] * 2) + np.array([cx0, cy0] * 2)
    short = float(min(width, height))
    if layout == "grid":
        side = math.isqrt(count)
        sides = np.full(count, (scale[0] + scale[1]) / 2 * short)
        fractions = np.linspace(0.0, 1.0, side) if side > 1 else np.array([0.5])
        fx, fy = np.meshgrid(fractions, fractions, indexing="xy")
        fx, fy = fx.ravel(), fy.ravel()
    else:
        # one (side, fx, fy) row per crop, drawn row by row: crop i is the same box for every count > i,
        # so a sweep over N compares nested crop sets
        draws = np.random.default_rng(image_seed(seed, key)).uniform(size=(count, 3))
        sides = (scale[0] + (scale[1] - scale[0]) * draws[:, 0]) * short
        fx, fy = draws[:, 1], draws[:, 2]
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


def grow_boxes(
    boxes: np.ndarray,
    growth: float | np.ndarray,
    width: float | np.ndarray,
    height: float | np.ndarray,
) -> np.ndarray:
    """Grow normalised xyxy boxes into squares about their centres, capped at the image's shorter side.

    The new side in pixels is min(side * growth, min(width, height)), side being the parent's longer side,
    so a grown view is never the whole image squashed. A box that would cross an edge is shifted back
    inside, so the grown box always contains its parent (a non-square parent keeps its extent along an
    axis where the square would be narrower; crops and grown boxes are square).

    Args:
        boxes: (n, 4) normalised xyxy of the upright original image.
        growth: gamma >= 1, one for all boxes or one per box.
        width, height: the upright original's size in pixels, one for all boxes or one per box.

    Returns:
        float64 array (n, 4) of grown boxes in [0, 1].
    """
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), len(boxes))
    height = np.broadcast_to(np.asarray(height, dtype=np.float64), len(boxes))
    parent_w = (boxes[:, 2] - boxes[:, 0]) * width
    parent_h = (boxes[:, 3] - boxes[:, 1]) * height
    side = np.minimum(np.maximum(parent_w, parent_h) * growth, np.minimum(width, height))
    new_w = np.minimum(np.maximum(side, parent_w) / width, 1.0)
    new_h = np.minimum(np.maximum(side, parent_h) / height, 1.0)
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    x0 = np.clip(centre_x - new_w / 2, 0.0, 1.0 - new_w)
    y0 = np.clip(centre_y - new_h / 2, 0.0, 1.0 - new_h)
    return np.stack([x0, y0, x0 + new_w, y0 + new_h], axis=1)


def growth_to_target(
    boxes: np.ndarray,
    width: float | np.ndarray,
    height: float | np.ndarray,
    target: float,
    steps_left: int,
) -> np.ndarray:
    """Per-box growth that makes each box's side reach `target * min(width, height)` in `steps_left` steps.

    Geometric: (target side / side) ** (1 / steps_left), at least 1. Applied at every step with the steps
    still to go, a lineage selected at the first step grows by the same factor (target / s0) ** (1 / T) each
    step, and one selected later still reaches the target at the last step.

    Args:
        boxes: (n, 4) normalised xyxy; sizes as in `grow_boxes`.
        target: the side to reach, as a fraction of the shorter side, in (0, 1].
        steps_left: growth steps including this one, >= 1.

    Returns:
        float64 array (n,) of growth factors >= 1.
    """
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), len(boxes))
    height = np.broadcast_to(np.asarray(height, dtype=np.float64), len(boxes))
    side = np.maximum((boxes[:, 2] - boxes[:, 0]) * width, (boxes[:, 3] - boxes[:, 1]) * height)
    goal = target * np.minimum(width, height)
    return np.maximum((goal / np.maximum(side, 1e-12)) ** (1.0 / steps_left), 1.0)


def select_salient(
    saliency: np.ndarray,
    boxes: np.ndarray,
    eligible: np.ndarray,
    count: int,
    max_iou: float,
    earlier: Sequence[int] = (),
    parents: np.ndarray | None = None,
) -> list[int]:
    """Indices of the `count` most salient eligible regions, each a place distinct from the others.

    Regions are taken greedily by saliency; one that overlaps above `max_iou` a region already chosen in
    this call, or a region of `earlier` (selected at earlier steps) other than its own ancestors, is passed
    over: a lineage may keep growing, but lineages stay distinct places. If that leaves fewer than `count`,
    the most salient passed-over ones fill the gap, so a step always grows `count` regions while at least
    that many are eligible.

    Args:
        saliency, boxes, eligible: (P,), (P, 4) and (P,) bool over the pool.
        count: K.
        max_iou: the overlap allowed.
        earlier: pool indices selected at earlier steps.
        parents: (P,) pool index of each region's parent, -1 for a root; needed with `earlier`.

    Returns:
        Pool indices, greedy picks in saliency order, then the fill.
    """
    order = [int(i) for i in np.argsort(-saliency, kind="stable") if eligible[i]]
    earlier = list(earlier)
    earlier_iou = box_iou(boxes, boxes[earlier]) if earlier else np.zeros((len(boxes), 0))
    chosen: list[int] = []
    for index in order:
        if len(chosen) == count:
            break
        if chosen and box_iou(boxes[index : index + 1], boxes[chosen]).max() > max_iou:
            continue
        if earlier:
            ancestors = _ancestors(index, parents)
            if any(iou > max_iou and j not in ancestors for j, iou in zip(earlier, earlier_iou[index])):
                continue
        chosen.append(index)
    rest = [i for i in order if i not in chosen]
    chosen.extend(rest[: max(0, count - len(chosen))])
    return chosen


def _ancestors(index: int, parents: np.ndarray | None) -> set[int]:
    """Pool indices of a region's parent, grandparent, ... up to its root."""
    found: set[int] = set()
    if parents is None:
        return found
    parent = int(parents[index])
    while parent >= 0:
        found.add(parent)
        parent = int(parents[parent])
    return found
