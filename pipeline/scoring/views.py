"""The views of an image as encoder input: the view format, cutting global and box views on the device, the ViewSet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) normalised pixels -> (B, D)


@dataclass(frozen=True)
class ViewFormat:
    """How a view is turned into encoder input: the model's preprocessing (open_clip's PreprocessCfg)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest
    resize_mode: str = "shortest"  # shortest: centre square to S | longest: longer side to S, padded | squash
    fill_color: int = 0  # pixel value of the padding of `longest`


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


class ViewCutter:
    """Cuts the views of a batch on one device: the global view and box crops, resized and normalised.

    Its state is the normalisation on the device and, on CUDA, one pinned upload buffer reused across batches.
    """

    def __init__(self, view: ViewFormat, device: torch.device) -> None:
        """
        Args:
            view: the encoder's input size and normalisation.
            device: where images are uploaded and views are cut.
        """
        self.view = view
        self.device = device
        self._mean = torch.tensor(view.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(view.std, device=device).view(1, 3, 1, 1) * 255.0
        self._staging: torch.Tensor | None = None  # pinned host buffer for CUDA uploads, grown on demand

    def upload(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float copies of a batch of images on the device.

        On CUDA the host images of a batch are packed into one reused pinned buffer and sent in a single
        asynchronous copy: pinning each image would cost a page-locked allocation per image. Images already
        on the device (decoded there) stay where they are.

        Args:
            images: uint8 tensors (3, H, W), RGB.

        Returns:
            float32 tensors (3, H, W) on the device, values in [0, 255], in order.

        Raises:
            ValueError: an image is not a uint8 (3, H, W) tensor.
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

    def global_views(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's own preprocessing of the whole image, as open_clip's `image_transform` for its resize mode.

        shortest: the centred square of side min(H, W) (what resizing the shorter side to S and centre-cropping
        keeps) resized to S x S; squash: the whole image to S x S; longest: the longer side to S, centred on a
        canvas of `fill_color`. Only the kept region is resized, so no intermediate larger than S x S exists
        whatever the aspect ratio.

        Args:
            pixels: float (3, H, W) images on the device, from `upload`.

        Returns:
            (B, 3, S, S) normalised views.
        """
        size = self.view.size
        out = torch.empty((len(pixels), 3, size, size), device=self.device)
        for index, image in enumerate(pixels):
            height, width = image.shape[-2:]
            if self.view.resize_mode == "squash":
                out[index] = self._resize(image, size, size)[0]
            elif self.view.resize_mode == "longest":
                scale = size / max(height, width)
                new_h, new_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
                top, left = (size - new_h) // 2, (size - new_w) // 2
                out[index].fill_(float(self.view.fill_color))
                out[index, :, top : top + new_h, left : left + new_w] = self._resize(image, new_h, new_w)[0]
            else:
                side = min(height, width)
                top, left = int(round((height - side) / 2)), int(round((width - side) / 2))
                out[index] = self._resize(image[:, top : top + side, left : left + side], size, size)[0]
        return self._normalise(out)

    def crop_views(self, pixels: Sequence[torch.Tensor], owners: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Cut boxes out of the images and resize each to S x S with the model's interpolation (antialiased).

        Boxes are square in the original image, so every resize mode gives the same view of them; the pixel
        region is rounded to whole pixels (at least one), and only that region is ever resized.

        Args:
            pixels: float (3, H, W) images on the device, from `upload`.
            owners: (M,) index into `pixels` of each box's image.
            boxes: (M, 4) normalised xyxy.

        Returns:
            (M, 3, S, S) normalised views, in the order of `boxes`.
        """
        size = self.view.size
        out = torch.empty((len(owners), 3, size, size), device=self.device)
        shapes = np.array([image.shape[-2:] for image in pixels], dtype=np.float64).reshape(-1, 2)[owners]  # (M, 2) H, W
        # pixel regions computed on the host from host boxes: no device round trip, no per-box synchronisation
        x0 = np.clip(np.floor(boxes[:, 0] * shapes[:, 1] + 0.5), 0, shapes[:, 1] - 1).astype(np.int64)
        y0 = np.clip(np.floor(boxes[:, 1] * shapes[:, 0] + 0.5), 0, shapes[:, 0] - 1).astype(np.int64)
        x1 = np.maximum(np.clip(np.floor(boxes[:, 2] * shapes[:, 1] + 0.5), 0, shapes[:, 1]).astype(np.int64), x0 + 1)
        y1 = np.maximum(np.clip(np.floor(boxes[:, 3] * shapes[:, 0] + 0.5), 0, shapes[:, 0]).astype(np.int64), y0 + 1)
        for row, owner in enumerate(owners):
            region = pixels[int(owner)][:, y0[row] : y1[row], x0[row] : x1[row]]
            out[row] = self._resize(region, size, size)[0]
        return self._normalise(out)

    def _resize(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(3, h, w) to (1, 3, height, width) with the model's interpolation; antialiased where it downsamples."""
        mode = self.view.interpolation
        if mode == "nearest":
            return F.interpolate(image[None], size=(height, width), mode="nearest")
        return F.interpolate(image[None], size=(height, width), mode=mode, antialias=True, align_corners=False)

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        return (views.clamp_(0.0, 255.0) - self._mean) / self._std


def encode_views(encode_image: ImageEncoder, views: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """Embed views in micro-batches.

    Args:
        encode_image: maps (B, 3, S, S) normalised views to (B, D) embeddings.
        views: (M, 3, S, S) normalised views.
        micro_batch: views per encoder call.

    Returns:
        (M, D) float32 embeddings, L2-normalised.
    """
    chunks = [encode_image(views[i : i + micro_batch]).float() for i in range(0, views.shape[0], micro_batch)]
    return F.normalize(torch.cat(chunks), dim=-1)
