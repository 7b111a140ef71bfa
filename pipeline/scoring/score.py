"""Scoring math on encoder callables: class text vectors and the methods clip, ensemble, descriptors, wca, lgca.

Pure torch and numpy: no Ray, no I/O, no open_clip. The encoders are injected, so tests can pass analytic ones.
The definitions are those of docs/METHOD.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.config import ScoringConfig
from pipeline.scoring.regions import grow_boxes, growth_to_target, sample_crops, select_salient

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) normalised pixels -> (B, D)
TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # n strings -> (n, D)

TEXT_CHUNK = 256  # sentences per text-encoder call


@dataclass(frozen=True)
class ViewFormat:
    """How a view is turned into encoder input: square side and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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


@dataclass
class ViewSet:
    """Embeddings of every view of a batch of images, with the geometry of the regions.

    Regions are the local crops (the first `crops` of the pool) followed by the grown boxes, in the
    order they were grown. One ViewSet can be combined with several methods' class vectors, so an
    evaluation encodes each view once for all methods.
    """

    keys: list[str]
    global_emb: torch.Tensor  # (B, D) f(x)
    region_emb: torch.Tensor  # (B, P, D) f(b) of local crops, then grown boxes
    boxes: np.ndarray  # (B, P, 4) normalised xyxy
    levels: np.ndarray  # (B, P) 0 for local crops, t for a box grown t times
    parents: np.ndarray  # (B, P) pool index of the parent, -1 for local crops
    saliency: torch.Tensor  # (B, P) sigma(b) under the scorer's own class vectors and rule
    selected: list[list[int]]  # per image, pool indices of salient boxes in output order
    crops: int  # N


# ---------------------------------------------------------------- text side


def encode_texts(encode_text: TextEncoder, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised float32 embeddings of `texts`, encoded in chunks."""
    chunks = [encode_text(list(texts[i : i + TEXT_CHUNK])).float() for i in range(0, len(texts), TEXT_CHUNK)]
    return F.normalize(torch.cat(chunks), dim=-1)


def class_sentences(
    classes: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    prompt: str,
) -> list[list[str]]:
    """The sentences d_c1..d_cM of each class: its descriptions, else its templates, else its prompt."""
    sentences = []
    for name in classes:
        if descriptions.get(name):
            sentences.append(list(descriptions[name]))
        elif templates:
            sentences.append([template.format(name) for template in templates])
        else:
            sentences.append([prompt.format(name)])
    return sentences


def class_vectors(
    method: str,
    classes: Sequence[str],
    encode_text: TextEncoder,
    descriptions: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    prompt: str,
    text_scale: float,
) -> torch.Tensor:
    """Class vectors T_c (C, D), normalised, for one method.

    clip: g(p_c). ensemble: mean of template embeddings (CLIP's ensemble). descriptors, wca, lgca: the
    description embeddings weighted by softmax_j(exp(text_scale) * <t_cj, g(p_c)>).
    """
    prompts = [prompt.format(name) for name in classes]
    if method == "clip":
        return encode_texts(encode_text, prompts)
    if method == "ensemble":
        sentences = class_sentences(classes, {}, templates, prompt)
    else:
        sentences = class_sentences(classes, descriptions, templates, prompt)
    flat = [s for group in sentences for s in group]
    embedded = encode_texts(encode_text, flat)
    groups = torch.split(embedded, [len(group) for group in sentences])
    if method == "ensemble":
        return F.normalize(torch.stack([group.mean(dim=0) for group in groups]), dim=-1)
    prompt_vecs = encode_texts(encode_text, prompts)
    vectors = []
    for group, anchor in zip(groups, prompt_vecs):
        weights = torch.softmax(math.exp(text_scale) * (group @ anchor), dim=0)  # (M,)
        vectors.append((weights[:, None] * group).sum(dim=0))
    return F.normalize(torch.stack(vectors), dim=-1)


# ---------------------------------------------------------------- score of the views


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


# ---------------------------------------------------------------- image side


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
        self._mean = torch.tensor(view.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(view.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._staging: torch.Tensor | None = None  # pinned host buffer for CUDA uploads, grown on demand

    # ---- public

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
            One ImageScore per image, in order.
        """
        if not images:
            return []
        return self.combine(self.embed(images, keys, sizes))

    def embed(
        self,
        images: Sequence[torch.Tensor],
        keys: Sequence[str],
        sizes: Sequence[tuple[int, int]] | None = None,
        global_emb: torch.Tensor | None = None,
    ) -> ViewSet:
        """Encode every view the configured method needs (arguments as in `score`).

        Global view for all methods; local crops for wca and lgca; for lgca, the regions grown over
        `steps` steps, selected by saliency under this scorer's class vectors.

        `global_emb` (B, D), the `global_emb` of an earlier ViewSet of the same images (e.g. under another
        seed: the global view does not depend on it), is used as is instead of encoding the global views again.
        """
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if global_emb is not None and global_emb.shape[0] != len(images):
            raise ValueError(f"{global_emb.shape[0]} global embeddings for {len(images)} images")
        sizes = list(sizes) if sizes is not None else [(int(im.shape[-1]), int(im.shape[-2])) for im in images]
        with torch.inference_mode():
            pixels = self._to_device(images)
            if global_emb is None:
                global_emb = self._encode(self._global_views(pixels))  # (B, D)
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
        """
        method = method or self.config.method
        vectors = self.vectors if vectors is None else F.normalize(vectors.float(), dim=-1).to(self.device)
        with torch.inference_mode():
            if method not in ("wca", "lgca"):
                sims = views.global_emb @ vectors.T  # (B, C)
                return [self._result(key, row, [], (1.0, 0.0, 0.0)) for key, row in zip(views.keys, sims)]
            pool = views.region_emb.shape[1] if method == "lgca" else views.crops
            if method == "lgca" and self.config.grown_views and pool == views.crops:
                raise ValueError("these views hold no grown regions; embed them with an lgca scorer")
            global_weight = self.config.global_weight_for(method)
            return self._combine_regions(views, vectors, pool, global_weight, with_boxes=method == "lgca")

    # ---- views

    def _to_device(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float copies of a batch of uint8 (3, H, W) images on the scoring device.

        On CUDA the host images of a batch are packed into one reused pinned buffer and sent in a single
        asynchronous copy: pinning each image would cost a page-locked allocation per image. Images already
        on the device (decoded there) stay where they are.
        """
        for image in images:
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a uint8 RGB tensor (3, H, W), got {tuple(image.shape)} {image.dtype}")
        on_host = [image for image in images if image.device.type == "cpu"]
        if self.device.type != "cuda" or not on_host:
            return [image.to(self.device).float() for image in images]
        sizes = [image.numel() for image in on_host]
        if self._staging is None or self._staging.numel() < sum(sizes):
            self._staging = torch.empty(sum(sizes), dtype=torch.uint8).pin_memory()
        for image, chunk in zip(on_host, torch.split(self._staging[: sum(sizes)], sizes)):
            chunk.copy_(image.reshape(-1))
        flat = self._staging[: sum(sizes)].to(self.device, non_blocking=True)
        uploaded = iter(chunk.view(image.shape) for image, chunk in zip(on_host, torch.split(flat, sizes)))
        return [(next(uploaded) if image.device.type == "cpu" else image.to(self.device)).float() for image in images]

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        return (views.clamp_(0.0, 255.0) - self._mean) / self._std

    def _global_views(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's own preprocessing: shorter side to S (bicubic, antialiased), centre crop S x S."""
        size = self.view.size
        views = []
        for image in pixels:
            height, width = image.shape[-2:]
            scale = size / min(height, width)
            new_h, new_w = max(size, int(height * scale)), max(size, int(width * scale))
            resized = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
            views.append(resized[:, :, top : top + size, left : left + size])
        return self._normalise(torch.cat(views))

    def _crop_views(self, pixels: Sequence[torch.Tensor], owners: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Cut and resize normalised xyxy `boxes` of images `owners` to S x S, one roi_align per image.

        roi_align averages ceil(box / S) samples per output pixel, so large boxes are low-pass filtered
        before they are resampled, as an antialiased resize would.
        """
        size = self.view.size
        out = torch.empty((len(owners), 3, size, size), device=self.device)
        for owner in np.unique(owners):
            rows = np.nonzero(owners == owner)[0]
            image = pixels[owner]
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            pixel_boxes = (torch.from_numpy(boxes[rows]).float() * scale).to(self.device)
            out[torch.from_numpy(rows).to(self.device)] = roi_align(
                image[None], [pixel_boxes], output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
            )
        return self._normalise(out)

    def _encode(self, views: torch.Tensor) -> torch.Tensor:
        """Embed views in micro-batches; float32, normalised."""
        step = self.config.micro_batch
        chunks = [self.encode_image(views[i : i + step]).float() for i in range(0, views.shape[0], step)]
        return F.normalize(torch.cat(chunks), dim=-1)

    def _encode_boxes(self, pixels: Sequence[torch.Tensor], owners: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Cut and embed boxes a micro-batch at a time, so at most one micro-batch of views is in memory."""
        if len(owners) == 0:
            return torch.empty((0, self.vectors.shape[1]), device=self.device)
        step = self.config.micro_batch
        chunks = [self._encode(self._crop_views(pixels, owners[i : i + step], boxes[i : i + step])) for i in range(0, len(owners), step)]
        return torch.cat(chunks)

    # ---- regions

    def _saliency(self, embeddings: torch.Tensor, global_emb: torch.Tensor, leading: torch.Tensor | None) -> torch.Tensor:
        """sigma(b) for (B, P, D) embeddings under the configured rule.

        class: max_c s(b, c). global: <f(b), f(x)>. margin: top-1 minus top-2 of the region's own class
        probabilities softmax_c(logit_scale * s(b, c)). agreement: s(b, leading class of the image), with
        `leading` (B,) from `_leading_class`.
        """
        rule = self.config.saliency
        if rule == "global":
            return torch.einsum("bpd,bd->bp", embeddings, global_emb)
        sims = embeddings @ self.vectors.T  # (B, P, C)
        if rule == "class":
            return sims.max(dim=-1).values
        if rule == "margin":
            if sims.shape[-1] < 2:
                return torch.ones(sims.shape[:-1], device=sims.device)  # one class: certain
            top = torch.softmax(self.logit_scale * sims, dim=-1).topk(2, dim=-1).values
            return top[..., 0] - top[..., 1]
        index = leading.view(-1, 1, 1).expand(sims.shape[0], sims.shape[1], 1)
        return sims.gather(-1, index).squeeze(-1)

    def _leading_class(self, crop_emb: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor | None:
        """The leading class (B,) of the crops-and-global score with this config's lambda, for `agreement`."""
        if self.config.saliency != "agreement":
            return None
        weights = region_weights(global_emb, crop_emb, self.config.image_scale)
        return view_score(global_emb, crop_emb, weights, self.vectors, self.config.view_global_weight).argmax(dim=-1)

    def _embed_regions(
        self,
        pixels: Sequence[torch.Tensor],
        keys: list[str],
        sizes: list[tuple[int, int]],
        global_emb: torch.Tensor,
    ) -> ViewSet:
        cfg = self.config
        batch, dim = len(keys), global_emb.shape[1]
        crops = cfg.crops if cfg.uses_crops else 0
        boxes = np.stack(
            [sample_crops(k, w, h, crops, cfg.crop_scale, cfg.seed, cfg.crop_layout) for k, (w, h) in zip(keys, sizes)]
        ).reshape(batch, crops, 4)
        embeddings = self._encode_boxes(pixels, np.repeat(np.arange(batch), crops), boxes.reshape(-1, 4))
        embeddings = embeddings.view(batch, crops, dim)  # (B, N, D)
        leading = self._leading_class(embeddings, global_emb)  # fixed before expansion
        saliency = self._saliency(embeddings, global_emb, leading)  # (B, N)
        levels = np.zeros((batch, crops), dtype=np.int64)
        parents = np.full((batch, crops), -1, dtype=np.int64)
        expanded = np.zeros((batch, crops), dtype=bool)
        selected: list[list[int]] = [[] for _ in range(batch)]  # output order: selected crops and grown boxes
        picked: list[list[int]] = [[] for _ in range(batch)]  # every region selected for expansion so far
        owner_w = np.repeat(np.array([w for w, _ in sizes], dtype=np.float64), cfg.regions)
        owner_h = np.repeat(np.array([h for _, h in sizes], dtype=np.float64), cfg.regions)

        steps = cfg.steps if cfg.method == "lgca" and cfg.regions else 0
        for step in range(steps):
            saliency_np = saliency.float().cpu().numpy()
            picks = np.empty((batch, cfg.regions), dtype=np.int64)
            growable = self._growable(boxes, sizes)
            for b in range(batch):
                eligible = ~expanded[b] & growable[b]
                if eligible.sum() < cfg.regions:  # too few can still grow: repeat capped ones rather than fail
                    eligible = ~expanded[b]
                picks[b] = select_salient(saliency_np[b], boxes[b], eligible, cfg.regions, cfg.overlap_iou, picked[b], parents[b])
                selected[b].extend(int(i) for i in picks[b] if levels[b, i] == 0)
                picked[b].extend(int(i) for i in picks[b])
            pool_size = boxes.shape[1]
            chosen = np.take_along_axis(boxes, picks[..., None], axis=1).reshape(-1, 4)
            if cfg.growth_target is None:
                growth: float | np.ndarray = cfg.growth
            else:
                growth = growth_to_target(chosen, owner_w, owner_h, cfg.growth_target, steps - step)
            grown = grow_boxes(chosen, growth, owner_w, owner_h)
            new_emb = self._encode_boxes(pixels, np.repeat(np.arange(batch), cfg.regions), grown)
            new_emb = new_emb.view(batch, cfg.regions, dim)
            np.put_along_axis(expanded, picks, True, axis=1)
            boxes = np.concatenate([boxes, grown.reshape(batch, cfg.regions, 4)], axis=1)
            levels = np.concatenate([levels, np.take_along_axis(levels, picks, axis=1) + 1], axis=1)
            parents = np.concatenate([parents, picks], axis=1)
            expanded = np.concatenate([expanded, np.zeros((batch, cfg.regions), dtype=bool)], axis=1)
            embeddings = torch.cat([embeddings, new_emb], dim=1)
            saliency = torch.cat([saliency, self._saliency(new_emb, global_emb, leading)], dim=1)
            for b in range(batch):
                selected[b].extend(range(pool_size, pool_size + cfg.regions))
        return ViewSet(keys, global_emb, embeddings, boxes, levels, parents, saliency, selected, crops)

    def _growable(self, boxes: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
        """(B, P) whether growing each region would change it: its side is below the cap (the shorter side, or
        the growth target). A capped lineage would otherwise spend its passes re-encoding the same box, and on
        a square image that box is the whole image, which hands the region term back to the global view."""
        width = np.array([w for w, _ in sizes], dtype=np.float64)[:, None]
        height = np.array([h for _, h in sizes], dtype=np.float64)[:, None]
        side = np.maximum((boxes[..., 2] - boxes[..., 0]) * width, (boxes[..., 3] - boxes[..., 1]) * height)
        cap = np.minimum(width, height) * (self.config.growth_target or 1.0)
        return (side < cap * (1 - 1e-6)) & (self.config.growth > 1.0 or self.config.growth_target is not None)

    def _combine_regions(
        self, views: ViewSet, vectors: torch.Tensor, pool: int, global_weight: float, with_boxes: bool
    ) -> list[ImageScore]:
        """S(x, c) from the global view and the first `pool` regions (`view_score`)."""
        cfg = self.config
        batch = len(views.keys)
        regions = views.region_emb[:, :pool]
        levels = views.levels[:, :pool]
        grown = torch.from_numpy(levels > 0).to(self.device)
        weights = region_weights(views.global_emb, regions, cfg.image_scale, grown, cfg.expand_weight)  # (B, P)
        combined = view_score(views.global_emb, regions, weights, vectors, global_weight)  # (B, C)
        shares = self._view_shares(weights, grown, global_weight if pool else 1.0)
        if not with_boxes:
            return [self._result(key, row, [], share) for key, row, share in zip(views.keys, combined, shares)]
        region_probs = torch.softmax(self.logit_scale * (regions @ vectors.T), dim=-1).float().cpu().numpy()  # (B, P, C)
        saliency = views.saliency.float().cpu().numpy()
        return [
            self._result(
                views.keys[b],
                combined[b],
                self._salient_boxes(views.selected[b], views.boxes[b], levels[b], views.parents[b], saliency[b], region_probs[b]),
                shares[b],
            )
            for b in range(batch)
        ]

    @staticmethod
    def _view_shares(weights: torch.Tensor, grown: torch.Tensor, global_weight: float) -> list[tuple[float, float, float]]:
        """(lambda, (1 - lambda) * crop weight, (1 - lambda) * grown weight) per image, from the region weights."""
        grown_weight = (weights * grown).sum(dim=1)
        crop_weight = weights.sum(dim=1) - grown_weight
        region_share = 1.0 - global_weight
        groups = torch.stack([crop_weight * region_share, grown_weight * region_share], dim=1).float().cpu().numpy()
        return [(float(global_weight), float(c), float(g)) for c, g in groups]

    def _salient_boxes(
        self,
        order: list[int],
        boxes: np.ndarray,
        levels: np.ndarray,
        parents: np.ndarray,
        saliency: np.ndarray,
        region_probs: np.ndarray,
    ) -> list[SalientBox]:
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
                    label=self.classes[best],
                    score=float(region_probs[pool_index, best]),
                )
            )
        return out

    def _result(self, key: str, similarity: torch.Tensor, boxes: list[SalientBox], view_shares: tuple[float, float, float]) -> ImageScore:
        probabilities = torch.softmax(self.logit_scale * similarity.float(), dim=-1).cpu().numpy()
        ranked = np.argsort(-probabilities, kind="stable")
        order = ranked[: self.config.topk]
        second = float(probabilities[ranked[1]]) if len(ranked) > 1 else 0.0
        return ImageScore(
            key=key,
            probabilities=probabilities,
            label=self.classes[order[0]],
            score=float(probabilities[order[0]]),
            topk_labels=[self.classes[i] for i in order],
            topk_scores=[float(probabilities[i]) for i in order],
            margin=float(probabilities[order[0]]) - second,
            boxes=boxes,
            view_shares=view_shares,
        )
