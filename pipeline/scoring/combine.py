"""Combining the views' embeddings into scores: region weights, S(x, c), view shares and the per-image result records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    method: str = ""  # the scoring that produced this result (under the cascade: descriptors or lgca)
    error: str | None = None  # set when the scores are not finite: the image gets a score_error row, no label
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # (D,) float32 f(x), normalised


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
    global_weight: float | torch.Tensor,
) -> torch.Tensor:
    """S(x, c) = lambda * <k0, T_c> + (1 - lambda) * <r, T_c>, r = normalise(sum_b w_b f(b)).

    r is a unit vector, so the region term is a cosine on CLIP's scale. With no regions S = <k0, T_c>.

    Args:
        global_emb: (B, D) k0; regions: (B, P, D); weights: (B, P) from `region_weights`.
        vectors: (C, D) class vectors T_c.
        global_weight: lambda in [0, 1], one for all images or (B,) per image.

    Returns:
        (B, C) scores.
    """
    global_sims = global_emb @ vectors.T
    if regions.shape[1] == 0:
        return global_sims
    region_emb = F.normalize(torch.einsum("bp,bpd->bd", weights, regions), dim=-1)
    if isinstance(global_weight, torch.Tensor):
        global_weight = global_weight[:, None]
    return global_weight * global_sims + (1.0 - global_weight) * (region_emb @ vectors.T)


def lineage_term(
    regions: torch.Tensor,
    levels: torch.Tensor,
    members: torch.Tensor,
    weight_logits: torch.Tensor,
    vectors: torch.Tensor,
    depth: int,
    aggregation: str = "embedding",
    level0_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The region term of revision 3: per expansion level a region score from the lineages' boxes at that
    level, averaged over the levels present (docs/METHOD.md, step 5).

    R(x, c) = (1 / (D + 1)) * sum_{t=0..D} R_t(x, c), where with weights u_b = softmax over the level's boxes of
    `weight_logits` (all zero: uniform) R_t is <normalise(sum_b u_b f(b)), T_c> (`embedding`) or
    sum_b u_b <f(b), T_c> (`similarity`). A box outside the lineages has no weight at all.

    Args:
        regions: (B, P, D) f(b) of the pool.
        levels: (B, P) int, the expansion level of each region.
        members: (B, P) bool, True for the lineages' boxes (selected crops and the boxes grown from them).
        weight_logits: (B, P) logits of u_b within a level (zeros for uniform weights).
        vectors: (C, D) class vectors.
        depth: D, the deepest level of any lineage in the batch (known on the host: no device read), -1 for none.
        aggregation: embedding or similarity.
        level0_logits: (B, P) if given, level 0 is every local crop (level 0 of the pool, member or not) with
            these logits (WCA's weights) instead of the selected crops.

    Returns:
        (B, C) region term, and (B,) the number of levels present, D + 1 (0 for an image without lineages,
        whose region term is then 0).
    """
    batch, classes = regions.shape[0], vectors.shape[0]
    term = torch.zeros((batch, classes), device=regions.device, dtype=torch.float32)
    present = torch.zeros(batch, device=regions.device, dtype=torch.float32)
    for level in range(depth + 1):
        at_level = levels == level
        logits = weight_logits
        if level == 0 and level0_logits is not None:
            logits = level0_logits
        else:
            at_level = at_level & members
        has = at_level.any(dim=1)  # (B,): an image with no box at this level adds nothing, and no level
        weights = torch.softmax(logits.float().masked_fill(~at_level, float("-inf")), dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # images without boxes at this level: all -inf rows
        if aggregation == "embedding":
            pooled = F.normalize(torch.einsum("bp,bpd->bd", weights, regions.float()), dim=-1)
            scores = pooled @ vectors.T.float()
        else:
            scores = torch.einsum("bp,bpc->bc", weights, regions.float() @ vectors.T.float())
        term = term + scores * has[:, None]
        present = present + has.float()
    return term / present.clamp(min=1.0)[:, None], present


def confidence_weight(global_sims: torch.Tensor, logit_scale: float, global_weight: float) -> torch.Tensor:
    """Per-image lambda of the `confidence` rule: lambda + (1 - lambda) * m, with m the global view's own top-1
    minus top-2 class probability. (B, C) similarities -> (B,) weights in [lambda, 1]."""
    if global_sims.shape[1] < 2:
        return torch.ones(global_sims.shape[0], device=global_sims.device)
    top = torch.softmax(logit_scale * global_sims.float(), dim=-1).topk(2, dim=-1).values
    return global_weight + (1.0 - global_weight) * (top[:, 0] - top[:, 1])


def lineage_shares(global_weight: float | torch.Tensor, present: torch.Tensor) -> list[tuple[float, float, float]]:
    """Shares of S under the lineage term: lambda for the global view, (1 - lambda) / (D + 1) for level 0 (the
    local crops) and the rest for the grown boxes; an image without lineages is all global view.

    Args:
        global_weight: lambda, one for all images or (B,) per image.
        present: (B,) D + 1 per image, from `lineage_term`.
    """
    levels = present.float().cpu().numpy()
    if isinstance(global_weight, torch.Tensor):
        lambdas = [float(v) for v in global_weight.float().cpu().numpy()]
    else:
        lambdas = [float(global_weight)] * len(levels)
    out = []
    for lam, count in zip(lambdas, levels):
        if count == 0:
            out.append((1.0, 0.0, 0.0))
            continue
        region = 1.0 - lam
        out.append((lam, region / float(count), region * float(count - 1) / float(count)))
    return out


def view_shares(weights: torch.Tensor, grown: torch.Tensor, global_weight: float | torch.Tensor) -> list[tuple[float, float, float]]:
    """The share of S carried by each group of views, from the region weights.

    Args:
        weights: (B, P) region weights from `region_weights`.
        grown: (B, P) bool, True for a grown box.
        global_weight: lambda, one for all images or (B,) per image; 1 when there are no regions.

    Returns:
        Per image (lambda, (1 - lambda) * crop weight, (1 - lambda) * grown weight).
    """
    grown_weight = (weights * grown).sum(dim=1)
    crop_weight = weights.sum(dim=1) - grown_weight
    lam = torch.as_tensor(global_weight, dtype=torch.float32, device=weights.device).expand(weights.shape[0])
    region_share = 1.0 - lam
    groups = torch.stack([lam, crop_weight * region_share, grown_weight * region_share], dim=1).float().cpu().numpy()
    if not isinstance(global_weight, torch.Tensor):  # one lambda for all: report it exactly, not as float32
        return [(float(global_weight), float(c), float(r)) for _, c, r in groups]
    return [(float(g), float(c), float(r)) for g, c, r in groups]


def region_best_classes(
    regions: torch.Tensor, order: list[list[int]], vectors: torch.Tensor, logit_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each reported region's best class and that class's probability for the region alone.

    Only the regions in `order` are scored (with C = 21,000 classes, every region of a batch would cost
    hundreds of MB), and only the best class and its probability leave the device, in one transfer.

    Args:
        regions: (B, P, D) f(b).
        order: per image, the pool indices to report.
        vectors: (C, D) class vectors.
        logit_scale: the model's temperature.

    Returns:
        (B, R) best class indices and (B, R) their probabilities, R the longest `order`; rows padded at the end.
    """
    batch = regions.shape[0]
    width = max((len(indices) for indices in order), default=0)
    if width == 0:
        return np.zeros((batch, 0), dtype=np.int64), np.zeros((batch, 0), dtype=np.float32)
    index = np.zeros((batch, width), dtype=np.int64)
    for b, indices in enumerate(order):
        index[b, : len(indices)] = indices
    picked = regions.gather(1, torch.from_numpy(index).to(regions.device)[..., None].expand(-1, -1, regions.shape[2]))
    logits = logit_scale * (picked @ vectors.T).float()  # (B, R, C)
    top, best = logits.max(dim=-1)
    probability = torch.exp(top - torch.logsumexp(logits, dim=-1))  # softmax at the argmax, without the (B, R, C) softmax
    both = torch.stack([best.float(), probability], dim=0).cpu().numpy()
    return both[0].astype(np.int64), both[1].astype(np.float32)


def salient_boxes(
    order: list[int],
    boxes: np.ndarray,
    levels: np.ndarray,
    parents: np.ndarray,
    saliency: np.ndarray,
    best: np.ndarray,
    best_probability: np.ndarray,
    classes: Sequence[str],
) -> list[SalientBox]:
    """The salient boxes of one image, each with its best class for the region alone.

    Args:
        order: pool indices of the boxes to report, in output order; a box's parent comes before it.
        boxes, levels, parents, saliency: (P, 4), (P,), (P,) and (P,) over the image's pool.
        best, best_probability: (>= len(order),) from `region_best_classes`, in the order of `order`.
        classes: class names.

    Returns:
        One SalientBox per entry of `order`; parents are positions in this list.
    """
    position = {pool_index: out_index for out_index, pool_index in enumerate(order)}
    out = []
    for out_index, pool_index in enumerate(order):
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
                label=classes[int(best[out_index])],
                score=float(best_probability[out_index]),
            )
        )
    return out


def image_scores(
    keys: Sequence[str],
    similarity: torch.Tensor,
    classes: Sequence[str],
    logit_scale: float,
    topk: int,
    boxes: Sequence[list[SalientBox]],
    shares: Sequence[tuple[float, float, float]],
    method: str = "",
    global_emb: torch.Tensor | None = None,
) -> list[ImageScore]:
    """The results of a batch from its scores S(x, c): one softmax and one transfer for the whole batch.

    Args:
        keys: the images' keys.
        similarity: (B, C) S(x, c).
        classes: class names, in the order of `similarity`'s columns.
        logit_scale: the model's temperature, applied before the class softmax.
        topk: how many leading classes to list.
        boxes: per image its salient boxes (empty for all methods but lgca).
        shares: per image, from `view_shares`.
        method: the scoring that produced `similarity`, recorded in each result.
        global_emb: (B, D) the global views' embeddings f(x), kept in each result (`--embeddings`).

    Returns:
        One ImageScore per image; ties in probability keep class order. An image whose scores are not finite
        (NaN or infinite embeddings) gets an ImageScore with `error` set and no label, never a label.
    """
    probabilities = torch.softmax(logit_scale * similarity.float(), dim=-1).cpu().numpy()
    embeddings = global_emb.float().cpu().numpy() if global_emb is not None else None
    out = []
    for b, key in enumerate(keys):
        row = probabilities[b]
        if not np.isfinite(row).all():
            out.append(_not_finite(key, row, shares[b], method))
            continue
        ranked = np.argsort(-row, kind="stable")
        order = ranked[:topk]
        second = float(row[ranked[1]]) if len(ranked) > 1 else 0.0
        out.append(
            ImageScore(
                key=key,
                probabilities=row,
                label=classes[order[0]],
                score=float(row[order[0]]),
                topk_labels=[classes[i] for i in order],
                topk_scores=[float(row[i]) for i in order],
                margin=float(row[order[0]]) - second,
                boxes=list(boxes[b]),
                view_shares=shares[b],
                method=method,
                embedding=embeddings[b] if embeddings is not None else None,
            )
        )
    return out


def _not_finite(key: str, row: np.ndarray, shares: tuple[float, float, float], method: str) -> ImageScore:
    bad = int((~np.isfinite(row)).sum())
    return ImageScore(
        key=key,
        probabilities=row,
        label="",
        score=float("nan"),
        topk_labels=[],
        topk_scores=[],
        margin=float("nan"),
        boxes=[],
        view_shares=shares,
        method=method,
        error=f"scores are not finite ({bad} of {len(row)} class probabilities are NaN or infinite): the image embedding "
        "or the temperatures overflowed; try --precision fp32",
    )
