"""Progressive expansion: the saliency rules and the repeated select-and-grow loop over a batch's region pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ScoringConfig
from pipeline.scoring.combine import region_weights, view_score
from pipeline.scoring.regions import grow_boxes, growth_to_target, select_salient

BoxEncoder = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # owners (M,), normalised xyxy (M, 4) -> (M, D)


@dataclass
class RegionPool:
    """The regions of a batch: the local crops, then the grown boxes in the order they were grown."""

    boxes: np.ndarray  # (B, P, 4) normalised xyxy
    levels: np.ndarray  # (B, P) 0 for local crops, t for a box grown t times
    parents: np.ndarray  # (B, P) pool index of the parent, -1 for local crops
    embeddings: torch.Tensor  # (B, P, D) f(b)
    saliency: torch.Tensor  # (B, P) sigma(b)
    selected: list[list[int]]  # per image, pool indices of the selected crops and grown boxes, in output order


def region_saliency(
    embeddings: torch.Tensor,
    global_emb: torch.Tensor,
    vectors: torch.Tensor,
    logit_scale: float,
    rule: str,
    leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """sigma(b) of regions under one rule.

    class: max_c s(b, c). global: <f(b), f(x)>. margin: top-1 minus top-2 of the region's own class
    probabilities softmax_c(logit_scale * s(b, c)). agreement: s(b, leading class of the image).

    Args:
        embeddings: (B, P, D) f(b).
        global_emb: (B, D) f(x).
        vectors: (C, D) class vectors T_c.
        logit_scale: the model's temperature, for margin.
        rule: class, global, margin or agreement.
        leading: (B,) the images' leading classes from `leading_class`; needed for agreement.

    Returns:
        (B, P) saliency.

    Raises:
        ValueError: agreement without `leading`.
    """
    if rule == "global":
        return torch.einsum("bpd,bd->bp", embeddings, global_emb)
    sims = embeddings @ vectors.T  # (B, P, C)
    if rule == "class":
        return sims.max(dim=-1).values
    if rule == "margin":
        if sims.shape[-1] < 2:
            return torch.ones(sims.shape[:-1], device=sims.device)  # one class: certain
        top = torch.softmax(logit_scale * sims, dim=-1).topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if leading is None:
        raise ValueError(f"saliency {rule!r} needs the images' leading classes; pass leading_class(...)")
    index = leading.view(-1, 1, 1).expand(sims.shape[0], sims.shape[1], 1)
    return sims.gather(-1, index).squeeze(-1)


def leading_class(crop_emb: torch.Tensor, global_emb: torch.Tensor, vectors: torch.Tensor, config: ScoringConfig) -> torch.Tensor | None:
    """The leading class of each image under the crops-and-global score, for the agreement rule.

    Args:
        crop_emb: (B, N, D) f(b) of the local crops.
        global_emb: (B, D) f(x).
        vectors: (C, D) class vectors T_c.
        config: its saliency rule, image_scale and lambda (`view_global_weight`).

    Returns:
        (B,) class indices, or None when the rule is not agreement.
    """
    if config.saliency != "agreement":
        return None
    weights = region_weights(global_emb, crop_emb, config.image_scale)
    return view_score(global_emb, crop_emb, weights, vectors, config.view_global_weight).argmax(dim=-1)


def expand_regions(
    crop_boxes: np.ndarray,
    crop_emb: torch.Tensor,
    global_emb: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    vectors: torch.Tensor,
    logit_scale: float,
    config: ScoringConfig,
    encode: BoxEncoder,
) -> RegionPool:
    """Score the local crops' saliency and, for lgca, grow the K most salient regions over T steps.

    Each step selects, per image, the K most salient regions not yet expanded and distinct from every earlier
    selection but their own ancestors (`select_salient`), preferring those that can still grow; grows them
    (`grow_boxes`, by `growth` or towards `growth_target`); encodes the K grown boxes of every image in one
    `encode` call; and adds them to the pool one level above their parents. With `selection = lineages` only
    the first step selects; each later step grows the K boxes the step before grew. So exactly K * T boxes per
    image are encoded. The leading class of the agreement rule is fixed from the crops, before expansion.

    Args:
        crop_boxes: (B, N, 4) normalised xyxy of the local crops.
        crop_emb: (B, N, D) their embeddings.
        global_emb: (B, D) f(x).
        sizes: (width, height) of each upright original.
        vectors: (C, D) class vectors under which saliency is scored.
        logit_scale: the model's temperature.
        config: method, saliency rule, K (`regions`), T (`steps`), growth and overlap.
        encode: embeds normalised xyxy boxes of the batch's images, given each box's image index.

    Returns:
        The pool: the crops, then K * T grown boxes per image for lgca (none for other methods).
    """
    cfg = config
    batch, crops = crop_boxes.shape[:2]
    dim = global_emb.shape[1]
    boxes, embeddings = crop_boxes, crop_emb
    leading = leading_class(embeddings, global_emb, vectors, cfg)  # fixed before expansion
    saliency = region_saliency(embeddings, global_emb, vectors, logit_scale, cfg.saliency, leading)  # (B, N)
    levels = np.zeros((batch, crops), dtype=np.int64)
    parents = np.full((batch, crops), -1, dtype=np.int64)
    expanded = np.zeros((batch, crops), dtype=bool)
    selected: list[list[int]] = [[] for _ in range(batch)]  # output order: selected crops and grown boxes
    picked: list[list[int]] = [[] for _ in range(batch)]  # every region selected for expansion so far
    owner_w = np.repeat(np.array([w for w, _ in sizes], dtype=np.float64), cfg.regions)
    owner_h = np.repeat(np.array([h for _, h in sizes], dtype=np.float64), cfg.regions)

    steps = cfg.steps if cfg.method == "lgca" and cfg.regions else 0
    for step in range(steps):
        pool_size = boxes.shape[1]
        if step and cfg.selection == "lineages":  # the same K lineages every step: grow what the last step grew
            picks = np.tile(np.arange(pool_size - cfg.regions, pool_size), (batch, 1))
        else:
            picks = _select(boxes, saliency, expanded, parents, levels, picked, selected, sizes, cfg)
        for b in range(batch):
            picked[b].extend(int(i) for i in picks[b])
        chosen = np.take_along_axis(boxes, picks[..., None], axis=1).reshape(-1, 4)
        if cfg.growth_target is None:
            growth: float | np.ndarray = cfg.growth
        else:
            growth = growth_to_target(chosen, owner_w, owner_h, cfg.growth_target, steps - step)
        grown = grow_boxes(chosen, growth, owner_w, owner_h)
        new_emb = encode(np.repeat(np.arange(batch), cfg.regions), grown)
        new_emb = new_emb.view(batch, cfg.regions, dim)
        np.put_along_axis(expanded, picks, True, axis=1)
        boxes = np.concatenate([boxes, grown.reshape(batch, cfg.regions, 4)], axis=1)
        levels = np.concatenate([levels, np.take_along_axis(levels, picks, axis=1) + 1], axis=1)
        parents = np.concatenate([parents, picks], axis=1)
        expanded = np.concatenate([expanded, np.zeros((batch, cfg.regions), dtype=bool)], axis=1)
        embeddings = torch.cat([embeddings, new_emb], dim=1)
        saliency = torch.cat([saliency, region_saliency(new_emb, global_emb, vectors, logit_scale, cfg.saliency, leading)], dim=1)
        for b in range(batch):
            selected[b].extend(range(pool_size, pool_size + cfg.regions))
    return RegionPool(boxes, levels, parents, embeddings, saliency, selected)


def _select(
    boxes: np.ndarray,
    saliency: torch.Tensor,
    expanded: np.ndarray,
    parents: np.ndarray,
    levels: np.ndarray,
    picked: list[list[int]],
    selected: list[list[int]],
    sizes: Sequence[tuple[int, int]],
    cfg: ScoringConfig,
) -> np.ndarray:
    """(B, K) pool indices of the regions one step grows (`select_salient` per image); a selected local crop
    starts a lineage, so it joins `selected`."""
    saliency_np = saliency.float().cpu().numpy()
    picks = np.empty((boxes.shape[0], cfg.regions), dtype=np.int64)
    growable = _growable(boxes, sizes, cfg)
    for b in range(boxes.shape[0]):
        eligible = ~expanded[b] & growable[b]
        if eligible.sum() < cfg.regions:  # too few can still grow: repeat capped ones rather than fail
            eligible = ~expanded[b]
        picks[b] = select_salient(saliency_np[b], boxes[b], eligible, cfg.regions, cfg.overlap_iou, picked[b], parents[b])
        selected[b].extend(int(i) for i in picks[b] if levels[b, i] == 0)
    return picks


def _growable(boxes: np.ndarray, sizes: Sequence[tuple[int, int]], config: ScoringConfig) -> np.ndarray:
    """(B, P) whether growing each region would change it: its side is below the cap (the shorter side, or
    the growth target). A capped lineage would otherwise spend its passes re-encoding the same box, and on
    a square image that box is the whole image, which hands the region term back to the global view."""
    width = np.array([w for w, _ in sizes], dtype=np.float64)[:, None]
    height = np.array([h for _, h in sizes], dtype=np.float64)[:, None]
    side = np.maximum((boxes[..., 2] - boxes[..., 0]) * width, (boxes[..., 3] - boxes[..., 1]) * height)
    cap = np.minimum(width, height) * (config.growth_target or 1.0)
    return (side < cap * (1 - 1e-6)) & (config.growth > 1.0 or config.growth_target is not None)
