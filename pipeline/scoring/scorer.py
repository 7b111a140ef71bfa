"""The Scorer: the methods clip, ensemble, descriptors, wca and lgca on an injected image encoder, one batch a call.

It encodes a batch's views (global view, local crops, grown regions) into a ViewSet and combines them with a
method's class vectors. Pure torch and numpy: no Ray, no I/O, no open_clip. The definitions are those of
docs/METHOD.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ScoringConfig
from pipeline.scoring.combine import (
    ImageScore,
    SalientBox,
    confidence_weight,
    image_scores,
    lineage_shares,
    lineage_term,
    region_best_classes,
    region_weights,
    salient_boxes,
    view_score,
    view_shares,
)
from pipeline.scoring.expansion import expand_regions
from pipeline.scoring.letterbox import content_box
from pipeline.scoring.regions import sample_crops
from pipeline.scoring.views import ImageEncoder, ViewCutter, ViewFormat, ViewSet, encode_views


class Scorer:
    """Scores batches of decoded images against fixed class vectors with one method.

    Heavy state (class vectors on the device) is set up once; `score` takes one batch per call.
    """

    def __init__(
        self,
        encode_image: ImageEncoder,
        classes: Sequence[str],
        vectors: torch.Tensor,
        logit_scale: float,
        view: ViewFormat,
        config: ScoringConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        """
        Args:
            encode_image: maps (B, 3, S, S) normalised views to (B, D) embeddings (normalised here anyway).
            classes: class names, in the order of `vectors`.
            vectors: class vectors T_c (C, D) for `config.method`, from `class_vectors`.
            logit_scale: the model's temperature, applied before the class softmax.
            view: the encoder's input size and normalisation.
            config: method and parameters.
            device: where views are cut and the class vectors live.
        """
        if vectors.shape[0] != len(classes):
            raise ValueError(f"{vectors.shape[0]} class vectors for {len(classes)} classes")
        self.encode_image = encode_image
        self.classes = list(classes)
        self.device = torch.device(device)
        self.vectors = F.normalize(vectors.float(), dim=-1).to(self.device)
        self.logit_scale = float(logit_scale)
        self.view = view
        self.config = config
        self._cutter = ViewCutter(view, self.device)

    def score(
        self,
        images: Sequence[torch.Tensor],
        keys: Sequence[str],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[ImageScore]:
        """Score a batch of images.

        Args:
            images: uint8 tensors (3, H, W), RGB, upright; possibly decoded at reduced scale.
            keys: one stable key per image; with the seed it fixes the image's crops.
            sizes: (width, height) of each upright original; crops are laid out in it so that they do
                not depend on the decode scale. Default: each tensor's own size.

        Returns:
            One ImageScore per image, in order. Under the confidence cascade (`cascade_margin`) an image whose
            global view is confident enough keeps the `descriptors` result; the others are scored with lgca.
        """
        if not images:
            return []
        if self.config.method == "lgca" and self.config.cascade_margin is not None:
            return self._cascade(images, keys, sizes)
        return self.combine(self.embed(images, keys, sizes))

    def _cascade(self, images: Sequence[torch.Tensor], keys: Sequence[str], sizes: Sequence[tuple[int, int]] | None) -> list[ImageScore]:
        """docs/METHOD.md step 7: the global views of the batch are encoded once; only the images whose
        descriptors margin is below the threshold get crops and expansion, all of them in one batch."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        sizes = list(sizes) if sizes is not None else [(int(im.shape[-1]), int(im.shape[-2])) for im in images]
        with torch.inference_mode():
            pixels = self._cutter.upload(images)
            global_emb = encode_views(self.encode_image, self._cutter.global_views(pixels), self.config.micro_batch)
            first = self._results(
                list(keys), global_emb @ self.vectors.T, [[] for _ in keys], [(1.0, 0.0, 0.0)] * len(keys), "descriptors", global_emb
            )
            threshold = float(self.config.cascade_margin or 0.0)
            # a NaN margin (a non-finite first pass) escalates: lgca then reports the error itself
            escalate = [i for i, result in enumerate(first) if not result.margin >= threshold]
            if not escalate:
                return first
            views = self._embed_regions(
                [pixels[i] for i in escalate], [keys[i] for i in escalate], [sizes[i] for i in escalate], global_emb[escalate]
            )
        for i, result in zip(escalate, self.combine(views, method="lgca")):
            first[i] = result
        return first

    def embed(
        self,
        images: Sequence[torch.Tensor],
        keys: Sequence[str],
        sizes: Sequence[tuple[int, int]] | None = None,
        global_emb: torch.Tensor | None = None,
    ) -> ViewSet:
        """Encode every view the configured method needs.

        Global view for all methods; local crops for wca and lgca; for lgca, the regions grown over
        `steps` steps, selected by saliency under this scorer's class vectors.

        Args:
            images, keys, sizes: as in `score`.
            global_emb: (B, D), the `global_emb` of an earlier ViewSet of the same images (e.g. under another
                seed: the global view does not depend on it), used as is instead of encoding the global views again.

        Returns:
            The ViewSet of the batch.

        Raises:
            ValueError: `keys` or `global_emb` do not match `images`, or an image is not uint8 (3, H, W).
        """
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if global_emb is not None and global_emb.shape[0] != len(images):
            raise ValueError(f"{global_emb.shape[0]} global embeddings for {len(images)} images")
        sizes = list(sizes) if sizes is not None else [(int(im.shape[-1]), int(im.shape[-2])) for im in images]
        with torch.inference_mode():
            pixels = self._cutter.upload(images)
            if global_emb is None:
                global_emb = encode_views(self.encode_image, self._cutter.global_views(pixels), self.config.micro_batch)  # (B, D)
            return self._embed_regions(pixels, list(keys), sizes, global_emb.to(self.device))

    def combine(self, views: ViewSet, vectors: torch.Tensor | None = None, method: str | None = None) -> list[ImageScore]:
        """Scores from encoded views.

        Args:
            views: from `embed`.
            vectors: class vectors (C, D) of `method`; default this scorer's own.
            method: clip, ensemble or descriptors use the global view; wca the global view and local
                crops; lgca all views. Default: the configured method. A method needs the views it uses.

        Returns:
            One ImageScore per image; salient boxes for lgca only. wca and lgca weigh the global view
            with `config.global_weight_for(method)`.

        Raises:
            ValueError: lgca on views embedded without grown regions.
        """
        method = method or self.config.method
        vectors = self.vectors if vectors is None else F.normalize(vectors.float(), dim=-1).to(self.device)
        with torch.inference_mode():
            if method not in ("wca", "lgca"):
                sims = views.global_emb @ vectors.T  # (B, C)
                return self._results(
                    views.keys, sims, [[] for _ in views.keys], [(1.0, 0.0, 0.0)] * len(views.keys), method, views.global_emb
                )
            pool = views.region_emb.shape[1] if method == "lgca" else views.crops
            if method == "lgca" and self.config.grown_views and pool == views.crops:
                raise ValueError("these views hold no grown regions; embed them with an lgca scorer")
            if method == "lgca" and self.config.region_pool == "lineages":
                return self._combine_lineages(views, vectors)
            return self._combine_regions(views, vectors, pool, method)

    # ---- embedding

    def _embed_regions(
        self,
        pixels: Sequence[torch.Tensor],
        keys: list[str],
        sizes: list[tuple[int, int]],
        global_emb: torch.Tensor,
    ) -> ViewSet:
        """Encode the local crops, then expand them (`expand_regions`) into the batch's ViewSet."""
        cfg = self.config
        batch, dim = len(keys), global_emb.shape[1]
        crops = cfg.crops if cfg.uses_crops else 0
        contents = [content_box(p) if cfg.letterbox == "detect" else (0.0, 0.0, 1.0, 1.0) for p in pixels]
        boxes = np.stack(
            [
                sample_crops(k, w, h, crops, cfg.view_crop_scale, cfg.seed, cfg.crop_layout, content)
                for k, (w, h), content in zip(keys, sizes, contents)
            ]
        ).reshape(batch, crops, 4)
        encode = functools.partial(self._encode_boxes, pixels)
        embeddings = encode(np.repeat(np.arange(batch), crops), boxes.reshape(-1, 4))
        embeddings = embeddings.view(batch, crops, dim)  # (B, N, D)
        pool = expand_regions(boxes, embeddings, global_emb, sizes, self.vectors, self.logit_scale, cfg, encode)
        return ViewSet(keys, global_emb, pool.embeddings, pool.boxes, pool.levels, pool.parents, pool.saliency, pool.selected, crops)

    def _encode_boxes(self, pixels: Sequence[torch.Tensor], owners: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Cut and embed boxes a micro-batch at a time, so at most one micro-batch of views is in memory."""
        if len(owners) == 0:
            return torch.empty((0, self.vectors.shape[1]), device=self.device)
        step = self.config.micro_batch
        chunks = [
            encode_views(self.encode_image, self._cutter.crop_views(pixels, owners[i : i + step], boxes[i : i + step]), step)
            for i in range(0, len(owners), step)
        ]
        return torch.cat(chunks)

    # ---- combining

    def _combine_regions(self, views: ViewSet, vectors: torch.Tensor, pool: int, method: str) -> list[ImageScore]:
        """S(x, c) from the global view and the first `pool` regions with WCA's weights (`view_score`): wca, and
        lgca with `region_pool = all` (revision 2)."""
        cfg = self.config
        regions = views.region_emb[:, :pool]
        grown = torch.from_numpy(views.levels[:, :pool] > 0).to(self.device)
        weights = region_weights(views.global_emb, regions, cfg.image_scale, grown, cfg.expand_weight)  # (B, P)
        global_weight = self._global_weights(views.global_emb @ vectors.T, method) if pool else 1.0
        combined = view_score(views.global_emb, regions, weights, vectors, global_weight)  # (B, C)
        shares = view_shares(weights, grown, global_weight)
        boxes = self._salient_boxes(views, vectors) if method == "lgca" else [[] for _ in views.keys]
        return self._results(views.keys, combined, boxes, shares, method, views.global_emb)

    def _combine_lineages(self, views: ViewSet, vectors: torch.Tensor) -> list[ImageScore]:
        """S(x, c) of revision 3: lambda times the global view beside the lineages' per-level region term
        (`lineage_term`); crops that were not selected carry no weight unless `level0 = all`."""
        cfg = self.config
        batch, pool = views.region_emb.shape[:2]
        members = np.zeros((batch, pool), dtype=bool)
        for b, indices in enumerate(views.selected):
            members[b, indices] = True
        levels = torch.from_numpy(views.levels).to(self.device)
        if cfg.lineage_weights == "saliency":
            logits = cfg.saliency_scale * views.saliency.float()
        else:
            logits = torch.zeros((batch, pool), device=self.device)
        level0_logits = None
        if cfg.level0 == "all":  # WCA's weights over every local crop
            level0_logits = math.exp(cfg.image_scale) * torch.einsum("bpd,bd->bp", views.region_emb.float(), views.global_emb.float())
        depth = int(views.levels[members].max()) if members.any() else -1  # host arrays: no device read
        term, present = lineage_term(
            views.region_emb,
            levels,
            torch.from_numpy(members).to(self.device),
            logits,
            vectors,
            depth,
            cfg.level_aggregation,
            level0_logits,
        )
        global_sims = views.global_emb @ vectors.T
        global_weight = self._global_weights(global_sims, "lgca")
        per_image = torch.as_tensor(global_weight, dtype=torch.float32, device=self.device).expand(len(views.keys))
        per_image = torch.where(present > 0, per_image, torch.ones_like(per_image))  # no lineages: S = <k0, T_c>
        combined = per_image[:, None] * global_sims.float() + (1.0 - per_image[:, None]) * term
        shares = lineage_shares(global_weight, present)
        return self._results(views.keys, combined, self._salient_boxes(views, vectors), shares, "lgca", views.global_emb)

    def _global_weights(self, global_sims: torch.Tensor, method: str) -> float | torch.Tensor:
        """lambda: the method's own, or under lgca's `confidence` rule (B,) per image, raised by the global
        view's confidence."""
        global_weight = self.config.global_weight_for(method)
        if method == "lgca" and self.config.global_weight_rule == "confidence":
            return confidence_weight(global_sims, self.logit_scale, global_weight)
        return global_weight

    def _salient_boxes(self, views: ViewSet, vectors: torch.Tensor) -> list[list[SalientBox]]:
        """Every image's selected regions and grown boxes, with their best class for the region alone."""
        best, best_probability = region_best_classes(views.region_emb, views.selected, vectors, self.logit_scale)
        saliency = views.saliency.float().cpu().numpy()
        return [
            salient_boxes(
                views.selected[b],
                views.boxes[b],
                views.levels[b],
                views.parents[b],
                saliency[b],
                best[b],
                best_probability[b],
                self.classes,
            )
            for b in range(len(views.keys))
        ]

    def _results(
        self,
        keys: Sequence[str],
        similarity: torch.Tensor,
        boxes: list,
        shares: Sequence[tuple[float, float, float]],
        method: str,
        global_emb: torch.Tensor,
    ) -> list[ImageScore]:
        return image_scores(keys, similarity, self.classes, self.logit_scale, self.config.topk, boxes, shares, method, global_emb)
