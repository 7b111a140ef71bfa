"""JPEG bytes to upright RGB pixels on the scoring device (nvJPEG on CUDA), reduced to the scale the views need.

The CPU stage has already read each file's header (`decode.defer_jpeg`): format, size limit, EXIF orientation.
Here the pixels are decoded in batched calls, turned upright and box-reduced, as `decode.decode_image` does
on the CPU. A file the device decoder rejects comes back as its exception, for the caller to decode on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.stages.decode import jpeg_reduction

CHUNK = 32  # files per decoder call: full-resolution frames wait for reduction, so a call holds at most this many


def decode_jpegs(
    contents: Sequence[bytes],
    orientations: Sequence[int],
    min_short_side: int,
    device: torch.device | str,
) -> list[torch.Tensor | Exception]:
    """Decode JPEG files on `device`, CHUNK files per decoder call.

    Args:
        contents: the files' bytes.
        orientations: EXIF orientation (1-8) of each file, applied after decoding.
        min_short_side: reduce as `decode.decode_image` does (draft scale, then box factor) for this shorter side.
        device: where to decode: a CUDA device uses nvJPEG; the CPU uses libjpeg.

    Returns:
        Per file, a uint8 (3, H, W) RGB tensor on `device`, upright, or the exception decoding raised.
    """
    out: list[torch.Tensor | Exception] = []
    for start in range(0, len(contents), CHUNK):
        decoded = _decode_isolating_failures(list(contents[start : start + CHUNK]), device)
        for result, orientation in zip(decoded, orientations[start : start + CHUNK]):
            if not isinstance(result, Exception):
                result = box_reduce(upright(result, orientation), jpeg_reduction(min(result.shape[-2:]), min_short_side))
            out.append(result)
    return out


def _decode_isolating_failures(contents: list[bytes], device: torch.device | str) -> list[torch.Tensor | Exception]:
    encoded = [torch.frombuffer(bytearray(content), dtype=torch.uint8) for content in contents]
    try:
        return list(_decode(encoded, device))
    except RuntimeError:
        pass  # one bad file fails the whole batched call (it returns no partial results): isolate it
    decoded: list[torch.Tensor | Exception] = []
    for data in encoded:
        try:
            decoded.append(_decode([data], device)[0])
        except RuntimeError as error:
            decoded.append(error)
    return decoded


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF `orientation` to (C, H, W) pixels, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(pixels, k=-1, dims=(-2, -1))  # 90 degrees clockwise
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(pixels, k=1, dims=(-2, -1))  # 90 degrees counter-clockwise
    return pixels


def box_reduce(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Average uint8 (C, H, W) pixels over `factor` x `factor` blocks.

    Partial blocks at the right and bottom edges are averaged over their own pixels, as PIL's `reduce` does,
    so the reduced image still covers the whole original.
    """
    if factor <= 1:
        return pixels.contiguous()
    reduced = F.avg_pool2d(pixels[None].float(), kernel_size=factor, ceil_mode=True)[0]
    return reduced.round_().to(torch.uint8)


def _decode(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec; the nvJPEG path is what exists today
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


__all__ = ["box_reduce", "decode_jpegs", "upright"]
