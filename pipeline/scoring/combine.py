"""Combining the views' embeddings into scores: region weights, S(x, c), view shares and the per-image result records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SalientBox:
    """A region selected for expansion (level 0) or grown from one (level t), in normalised xyxy."""

    x0: float
    y0: float
    x1: float
    y1: float
    level: int
    parent: int  # index of the parent in the same image's box list; -1 for a selected local crop
    saliency: float
    label: str  # best class of the region alone
    score: float  # that class's probability for the region alone


@dataclass(frozen=True)
class ImageScore:
    """Scores of one image."""

    key: str
    probabilities: np.ndarray  # (C,) float32, sums to 1
    label: str
    score: float
    topk_labels: list[str]
    topk_scores: list[float]
    margin: float  # top-1 probability minus top-2 probability
    boxes: list[SalientBox]
    view_shares: tuple[float, float, float]  # share of S carried by (global view, local crops, grown boxes)


def region_weights(
    global_emb: torch.Tensor,
    regions: torch.Tensor,
    image_scale: float,
    grown: torch.Tensor | None = None,
    expand_weight: float = 1.0,
) -> torch.Tensor:
    """WCA's region weights w_b = softmax_b(exp(image_scale) * <f(b), k0> + log m_b), over regions only.

    Args:
        global_emb: (B, D) k0.
        regions: (B, P, D) f(b) of local crops and grown boxes.
        image_scale: the weight temperature.
        grown: (B, P) bool, True for a grown box; m_b is `expand_weight` there and 1 for a crop.
        expand_weight: m of grown boxes; 0 removes them.

    Returns:
        (B, P) weights, each row summing to 1 (empty rows when P = 0).
    """
    logits = math.exp(image_scale) * torch.einsum("bpd,bd->bp", regions, global_emb)
    if grown is not None and expand_weight != 1.0:
        # multiplying a softmax weight by m is adding log m to its logit
        log_m = math.log(expand_weight) if expand_weight > 0 else float("-inf")
        logits = torch.where(grown, logits + log_m, logits)
    return torch.softmax(logits, dim=1)


def view_score(
    global_emb: torch.Tensor,
    regions: torch.Tensor,
    weights: torch.Tensor,
    vectors: torch.Tensor,
    global_weight: float,
) -> torch.Tensor:
    """S(x, c) = lambda * <k0, T_c> + (1 - lambda) * <r, T_c>, r = normalise(sum_b w_b f(b)).

    r is a unit vector, so the region term is a cosine on CLIP's scale. With no regions S = <k0, T_c>.

    Args:
        global_emb: (B, D) k0; regions: (B, P, D); weights: (B, P) from `region_weights`.
        vectors: (C, D) class vectors T_c.
        global_weight: lambda in [0, 1].

    Returns:
        (B, C) scores.
    """
    global_sims = global_emb @ vectors.T
    if regions.shape[1] == 0:
        return global_sims
    region_emb = F.normalize(torch.einsum("bp,bpd->bd", weights, regions), dim=-1)
    return global_weight * global_sims + (1.0 - global_weight) * (region_emb @ vectors.T)


def view_shares(weights: torch.Tensor, grown: torch.Tensor, global_weight: float) -> list[tuple[float, float, float]]:
    """The share of S carried by each group of views, from the region weights.

    Args:
        weights: (B, P) region weights from `region_weights`.
        grown: (B, P) bool, True for a grown box.
        global_weight: lambda; 1 when there are no regions.

    Returns:
        Per image (lambda, (1 - lambda) * crop weight, (1 - lambda) * grown weight).
    """
    grown_weight = (weights * grown).sum(dim=1)
    crop_weight = weights.sum(dim=1) - grown_weight
    region_share = 1.0 - global_weight
    groups = torch.stack([crop_weight * region_share, grown_weight * region_share], dim=1).float().cpu().numpy()
    return [(float(global_weight), float(c), float(g)) for c, g in groups]


def salient_boxes(
    order: list[int],
    boxes: np.ndarray,
    levels: np.ndarray,
    parents: np.ndarray,
    saliency: np.ndarray,
    region_probs: np.ndarray,
    classes: Sequence[str],
) -> list[SalientBox]:
    """The salient boxes of one image, each with its best class for the region alone.

    Args:
        order: pool indices of the boxes to report, in output order; a box's parent comes before it.
        boxes, levels, parents, saliency: (P, 4), (P,), (P,) and (P,) over the image's pool.
        region_probs: (P, C) class probabilities of each region alone.
        classes: class names, in the order of `region_probs`' columns.

    Returns:
        One SalientBox per entry of `order`; parents are positions in this list.
    """
    position = {pool_index: out_index for out_index, pool_index in enumerate(order)}
    out = []
    for pool_index in order:
        best = int(region_probs[pool_index].argmax())
        parent = int(parents[pool_index])
        x0, y0, x1, y1 = (float(v) for v in boxes[pool_index])
        out.append(
            SalientBox(
                x0=x0,
                y0=y0,
                x1=x1,
                y1=y1,
                level=int(levels[pool_index]),
                parent=position[parent] if parent >= 0 else -1,
                saliency=float(saliency[pool_index]),
                label=classes[best],
                score=float(region_probs[pool_index, best]),
            )
        )
    return out


def image_score(
    key: str,
    similarity: torch.Tensor,
    classes: Sequence[str],
    logit_scale: float,
    topk: int,
    boxes: list[SalientBox],
    shares: tuple[float, float, float],
) -> ImageScore:
    """The result of one image from its scores S(x, c).

    Args:
        key: the image's key.
        similarity: (C,) S(x, c).
        classes: class names, in the order of `similarity`.
        logit_scale: the model's temperature, applied before the class softmax.
        topk: how many leading classes to list.
        boxes: the image's salient boxes (empty for all methods but lgca).
        shares: from `view_shares`.

    Returns:
        The ImageScore; ties in probability keep class order.
    """
    probabilities = torch.softmax(logit_scale * similarity.float(), dim=-1).cpu().numpy()
    ranked = np.argsort(-probabilities, kind="stable")
    order = ranked[:topk]
    second = float(probabilities[ranked[1]]) if len(ranked) > 1 else 0.0
    return ImageScore(
        key=key,
        probabilities=probabilities,
        label=classes[order[0]],
        score=float(probabilities[order[0]]),
        topk_labels=[classes[i] for i in order],
        topk_scores=[float(probabilities[i]) for i in order],
        margin=float(probabilities[order[0]]) - second,
        boxes=boxes,
        view_shares=shares,
    )
