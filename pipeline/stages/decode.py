"""Image bytes to upright RGB pixels at the smallest scale the views need, or a failure that says why."""

from __future__ import annotations

import io
import math
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.config import DecodeConfig, ScoringConfig

# Formats we open. Others PIL knows are left out on purpose: EPS runs Ghostscript on load, TGA has no
# signature (random bytes can pass as one), and the rest are scientific or legacy formats nobody labels.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM", "ICO", "QOI")
GREY = (128, 128, 128)  # neutral background behind transparent pixels
_JPEG_SCALES = (8, 4, 2)  # DCT scales libjpeg decodes at directly, largest first
_MAX_MESSAGE = 300  # characters of a PIL message kept in a failure
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that exchange width and height

# PIL's decompression-bomb limit is the module global Image.MAX_IMAGE_PIXELS, read inside Image.open and
# some plugins' load. We change it only for the duration of one call and under this lock, so concurrent
# decodes in one process cannot restore each other's values; nothing is changed at import.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)  # eq on arrays is elementwise; identity equality keeps it hashable
class DecodedImage:
    """Upright RGB pixels, possibly at a reduced scale, and the size of the upright original."""

    pixels: np.ndarray = field(repr=False)  # uint8 (H, W, 3) C-contiguous RGB, upright; H, W possibly reduced
    width: int  # width of the upright original at full resolution
    height: int  # height of the upright original at full resolution


@dataclass(frozen=True)
class DecodeFailure:
    """Why bytes did not become pixels, in words a user can act on."""

    message: str


class _Refused(Exception):
    """The decoder stopped on purpose; the message is the final failure text."""


def decode_for_views(image_size: int, scorings: Iterable[ScoringConfig], decode: DecodeConfig | None = None) -> DecodeConfig:
    """`decode` (default limits) at the smallest scale every view of `scorings` needs: the one rule for the scale.

    The job, `lgca eval` (over every method and setting it scores) and `Labeler` decode at this scale, so a file
    gives the same pixels, and the same scores, through each.
    """
    alphas = [scoring.view_crop_scale[0] for scoring in scorings if scoring.uses_crops]
    return replace(decode or DecodeConfig(), min_short_side=short_side_for(image_size, min(alphas) if alphas else None))


def short_side_for(image_size: int, crop_scale_min: float | None) -> int:
    """The decoded shorter side that keeps every view at least `image_size` pixels before resizing.

    A crop's side is at least `crop_scale_min` times the shorter side, so the shorter side must be
    ceil(image_size / crop_scale_min); without crops the whole image is the only view.

    Args:
        image_size: S, the side of the encoder's square input.
        crop_scale_min: alpha, the smallest crop side as a fraction of the shorter side; None without crops.

    Returns:
        The shorter side to decode at, for `DecodeConfig.min_short_side`.

    Raises:
        ValueError: `image_size` < 1 or `crop_scale_min` outside (0, 1].
    """
    if image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    if crop_scale_min is None:
        return image_size
    if not 0 < crop_scale_min <= 1:
        raise ValueError(f"smallest crop scale must lie in (0, 1], got {crop_scale_min}")
    # The epsilon absorbs float error: 224 / 0.7 is 320.00000000000006, which must not become 321.
    return math.ceil(image_size / crop_scale_min - 1e-9)


def decode_image(data: bytes, config: DecodeConfig) -> DecodedImage | DecodeFailure:
    """Decode one image file to upright RGB pixels whose shorter side is still >= `config.min_short_side`.

    JPEGs are decoded at a reduced DCT scale (draft); other formats are box-reduced by an integer factor;
    nothing is upscaled. Transparency is composited over grey, 16-bit values are scaled to 8 bits,
    animations give their first frame.

    Args:
        data: the file's bytes.
        config: pixel limit, smallest useful shorter side, time budget.

    Returns:
        A DecodedImage, or a DecodeFailure naming what was wrong; bad bytes never raise.
    """
    if len(data) == 0:
        return DecodeFailure("empty file (0 bytes)")
    started = time.monotonic()
    try:
        image = _open_header(data)
    except Exception as error:  # PIL raises many types for bad bytes; each becomes a failure row
        return DecodeFailure(_describe(error, None, data))
    try:
        with image:
            return _decode_opened(image, config, started)
    except _Refused as refused:
        return DecodeFailure(str(refused))
    except Exception as error:
        return DecodeFailure(_describe(error, image.format, data))


@dataclass(frozen=True)
class DeferredJpeg:
    """A JPEG checked on the CPU whose pixels are decoded later, on the scoring device."""

    orientation: int  # EXIF orientation 1-8 to apply after decoding (1: as stored)
    width: int  # width of the upright original
    height: int  # height of the upright original


def defer_jpeg(data: bytes, config: DecodeConfig) -> DeferredJpeg | DecodeFailure | None:
    """Check a file for decoding on the scoring device, reading its header only.

    Returns:
        DeferredJpeg for an RGB or greyscale JPEG within `config.max_pixels`; a DecodeFailure for one that
        declares more pixels; None for anything else (other formats, CMYK, unreadable headers), which
        `decode_image` then handles on the CPU, with its own messages for bad files.
    """
    try:
        image = _open_header(data)
    except Exception:  # decode_image names the problem
        return None
    with image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
        if width * height > config.max_pixels:
            return DecodeFailure(_too_many_pixels(width, height, config.max_pixels))
        orientation = _exif_orientation(image)
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return DeferredJpeg(orientation=orientation, width=width, height=height)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (as stored) when absent, invalid or unreadable, as `_exif_transpose` treats it."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_header(data: bytes) -> Image.Image:
    """Identify the format and read the header; pixels are not decoded yet (Image.open is lazy)."""
    Image.init()  # registers every plugin once, so the filter below sees them all
    formats = [name for name in ACCEPTED_FORMATS if name in Image.OPEN]
    # PIL would refuse (or warn about) a large declared size here, before we can read it; we lift its
    # limit for the header only and apply DecodeConfig.max_pixels ourselves, with the size in the message.
    with _pil_pixel_limit(None):
        return Image.open(io.BytesIO(data), formats=formats)


def _decode_opened(image: Image.Image, config: DecodeConfig, started: float) -> DecodedImage:
    """Check the declared size, decode at a reduced scale, make it upright RGB."""
    stored_width, stored_height = image.size  # as stored, before EXIF orientation
    declared = stored_width * stored_height
    if declared > config.max_pixels:
        raise _Refused(_too_many_pixels(stored_width, stored_height, config.max_pixels))
    if image.format in ("JPEG", "MPO"):  # MPO: multi-picture camera JPEG, first picture
        _request_jpeg_draft(image, config.min_short_side)
    _load(image, declared, config.max_pixels)
    # The budget is checked between stages, not enforced inside them: PIL's C decoders cannot be
    # interrupted without a thread or process per image. max_pixels bounds the work of any one stage
    # (decoding is roughly linear in pixels); the checks keep an image that already ran over from costing
    # further stages and report it as a failure, as DecodeConfig.timeout_s promises.
    _check_budget(started, config, "decoding")

    decoded = upright_pixels(image, config.min_short_side, (stored_width, stored_height))
    _check_budget(started, config, "conversion to RGB")
    return decoded


def upright_pixels(image: Image.Image, min_short_side: int, stored_size: tuple[int, int] | None = None) -> DecodedImage:
    """A loaded PIL image as the pipeline sees it: EXIF orientation applied, 16-bit scaled to 8 bits,
    transparency composited over grey, box-reduced while the shorter side stays >= `min_short_side`.

    `decode_image` ends here, and the Python API passes PIL images through it, so a file gives the same
    pixels through every door. `image` may be modified (oriented in place).

    Args:
        image: a loaded image, possibly drafted at a reduced JPEG scale.
        min_short_side: the smallest shorter side the views need.
        stored_size: the full-resolution size as stored, before a draft; default the image's size.
    """
    stored_width, stored_height = stored_size or image.size
    loaded_size = image.size
    _exif_transpose(image)
    swapped = image.size != loaded_size  # orientations 5-8 swap the axes
    width, height = (stored_height, stored_width) if swapped else (stored_width, stored_height)

    converted = _to_rgb_or_rgba(image)
    factor = max(1, min(converted.size) // min_short_side)
    if factor > 1:
        # Box filter over factor x factor blocks; the size rounds up, so the shorter side stays >= min_short_side.
        converted = converted.reduce(factor)
    if converted.mode == "RGBA":
        converted = _over_grey(converted)
    pixels = np.ascontiguousarray(np.asarray(converted, dtype=np.uint8))  # (H, W, 3)
    return DecodedImage(pixels=pixels, width=width, height=height)


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image declares {width} x {height} = {width * height} pixels, above "
        f"max_pixels={max_pixels}; raise --max-pixels if you trust this source"
    )


def _request_jpeg_draft(image: Image.Image, min_short_side: int) -> None:
    """Ask libjpeg for the smallest DCT scale whose shorter side is still >= `min_short_side`.

    Draft scales the stored axes, before EXIF orientation; the shorter side is the same either way,
    and the request is made in stored orientation.
    """
    width, height = image.size
    scale = _draft_scale(min(width, height), min_short_side)
    if scale > 1:
        # PIL picks the largest s in 8, 4, 2, 1 with W // w >= s and H // h >= s. With (w, h) =
        # (W // scale, H // scale), W // w lies in [scale, 2 * scale), so it picks exactly `scale`.
        image.draft("RGB", (width // scale, height // scale))


def _draft_scale(short_side: int, min_short_side: int) -> int:
    """The largest DCT scale (8, 4, 2) that keeps the shorter side >= `min_short_side`, else 1."""
    return next((scale for scale in _JPEG_SCALES if short_side // scale >= min_short_side), 1)


def jpeg_reduction(short_side: int, min_short_side: int) -> int:
    """The overall reduction `decode_image` applies to a JPEG: its draft scale times the box factor after it.

    libjpeg's 1/s scale gives ceil(side / s) pixels; a box reduction by f of that keeps ceil(side / (s * f)),
    as one box reduction by s * f does, so a decoder without draft decoding can match the geometry.
    """
    scale = _draft_scale(short_side, min_short_side)
    return scale * max(1, -(-short_side // scale) // min_short_side)


def _load(image: Image.Image, declared: int, max_pixels: int) -> None:
    """Decode the pixels of an image that passed the max_pixels check.

    Some plugins check the size again while loading (TIFF tiles, GIF frames) against PIL's own limit,
    warning above it and refusing above twice it. For the rare image above that limit (but within
    max_pixels) PIL's limit is raised to max_pixels for this load; the lock is then held for the load,
    so such loads run one at a time per process (Ray decode tasks run in separate processes).
    """
    with _PIL_LIMIT_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and declared > pil_limit:
        with _pil_pixel_limit(max_pixels):
            image.load()
    else:
        image.load()


@contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """Set PIL's process-wide Image.MAX_IMAGE_PIXELS for the block, restoring it after."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _check_budget(started: float, config: DecodeConfig, stage: str) -> None:
    elapsed = time.monotonic() - started
    if elapsed > config.timeout_s:
        raise _Refused(
            f"decoding took {elapsed:.3g} s by the end of {stage}, above the decode timeout of "
            f"{config.timeout_s:g} s; raise the timeout if such images are expected"
        )


def _exif_transpose(image: Image.Image) -> None:
    """Apply the EXIF orientation in place; unreadable EXIF leaves the stored orientation."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # broken metadata should not cost the pixels; viewers show such files as stored
        pass


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image carries transparency (alpha band, palette alpha, transparent colour)."""
    if image.mode in ("RGB", "RGBA"):
        return image
    if image.mode.startswith("I"):  # I;16, I;16L, I;16B, I;16N, and I (some plugins give 16-bit data as I)
        return _sixteen_bit_to_rgb(image)
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits: 65535 -> 255, 32768 -> 128, 0 -> 0 (convert('L') would clip at 255)."""
    values = np.asarray(image)  # (H, W): uint16 in the mode's byte order, or int32 for mode I
    values = np.clip(values, 0, 65535).astype(np.uint32)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round to nearest
    return Image.fromarray(grey).convert("RGB")


def _over_grey(image: Image.Image) -> Image.Image:
    """Composite an RGBA image over the neutral grey background, giving RGB."""
    background = Image.new("RGB", image.size, GREY)
    background.paste(image, mask=image.getchannel("A"))
    return background


def _describe(error: Exception, image_format: str | None, data: bytes) -> str:
    """A one-line failure message for an exception raised by PIL; no format means the header was unreadable."""
    what = image_format or "image header"
    text = " ".join((str(error) or type(error).__name__).split())[:_MAX_MESSAGE]
    if isinstance(error, UnidentifiedImageError):
        return (
            f"not a recognised image format, or a corrupt header (file starts with {data[:8]!r}); "
            f"accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        )
    if isinstance(error, Image.DecompressionBombError):
        return f"{what} is too large to decode safely: {text}; raise --max-pixels if you trust this source"
    if isinstance(error, MemoryError):
        return f"out of memory decoding {what}; lower --max-pixels or give decode workers more memory"
    if isinstance(error, (OSError, EOFError)) and "truncated" in text.lower():
        return f"truncated {what}: {text}"
    if isinstance(error, (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)):
        return f"corrupt {what} ({type(error).__name__}): {text}"
    return f"could not decode {what} ({type(error).__name__}): {text}"


__all__ = [
    "ACCEPTED_FORMATS",
    "GREY",
    "DecodeFailure",
    "DecodedImage",
    "DeferredJpeg",
    "decode_image",
    "defer_jpeg",
    "jpeg_reduction",
    "short_side_for",
]
