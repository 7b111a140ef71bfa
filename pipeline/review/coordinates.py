"""Box coordinate conversions between the output's normalised corners and each export format's convention (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Decimals kept per coordinate system when written out.
PIXEL_DECIMALS = 3  # COCO pixel coordinates: a thousandth of a pixel is below any use
PERCENT_DECIMALS = 5  # Label Studio percent coordinates; 1e-5 % of a 100k-pixel side is 0.01 px
RELATIVE_DECIMALS = 7  # FiftyOne relative coordinates (and the CSV's boxes), near float32 precision

Box4 = tuple[float, float, float, float]


def corners(box: Mapping[str, Any]) -> Box4:
    """An output box struct's normalised corners (x0, y0, x1, y1), fractions of the upright image's sides."""
    return (box["x0"], box["y0"], box["x1"], box["y1"])


def xyxy_to_coco(box: Sequence[float], width: float, height: float) -> Box4:
    """Normalised (x0, y0, x1, y1) to COCO absolute (x, y, w, h) in pixels of the upright image.

    Args:
        box: corners as fractions of the image width and height, x0 <= x1, y0 <= y1.
        width: upright image width in pixels, > 0.
        height: upright image height in pixels, > 0.

    Returns:
        (left, top, box width, box height) in pixels.

    Raises:
        ValueError: a non-positive image size.
    """
    _check_size(width, height)
    x0, y0, x1, y1 = box
    return (x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height)


def coco_to_xyxy(bbox: Sequence[float], width: float, height: float) -> Box4:
    """COCO absolute (x, y, w, h) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_coco`.

    Raises:
        ValueError: a non-positive image size.
    """
    _check_size(width, height)
    x, y, w, h = bbox
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def xyxy_to_percent(box: Sequence[float]) -> Box4:
    """Normalised (x0, y0, x1, y1) to Label Studio's (x, y, width, height) in percent of the image.

    Label Studio stores rectangles as the top-left corner and size, each in percent of the image's
    width or height, so no pixel size is needed (it is sent alongside as original_width/original_height).
    """
    x0, y0, x1, y1 = box
    return (x0 * 100.0, y0 * 100.0, (x1 - x0) * 100.0, (y1 - y0) * 100.0)


def percent_to_xyxy(rect: Sequence[float]) -> Box4:
    """Label Studio percent (x, y, width, height) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_percent`."""
    x, y, w, h = rect
    return (x / 100.0, y / 100.0, (x + w) / 100.0, (y + h) / 100.0)


def xyxy_to_relative_xywh(box: Sequence[float]) -> Box4:
    """Normalised (x0, y0, x1, y1) to FiftyOne's bounding_box [top-left-x, top-left-y, width, height] in [0, 1]."""
    x0, y0, x1, y1 = box
    return (x0, y0, x1 - x0, y1 - y0)


def relative_xywh_to_xyxy(rect: Sequence[float]) -> Box4:
    """FiftyOne relative (x, y, w, h) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_relative_xywh`."""
    x, y, w, h = rect
    return (x, y, x + w, y + h)


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width} x {height}")
