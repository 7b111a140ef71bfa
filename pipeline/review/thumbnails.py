"""Report thumbnails: upright JPEGs decoded as the run decoded them, under stable names, with their boxes as gallery entries."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.review.text import one_line
from pipeline.review.values import number
from pipeline.stages.decode import DecodeFailure, decode_image
from pipeline.stages.sources import check_scheme, read_bytes

THUMBNAIL_QUALITY = 82  # JPEG quality of thumbnails: small files, boxes stay readable
THUMBNAIL_NAME = re.compile(r"^[0-9a-f]{16}\.jpg$")  # names this module writes; only these are ever deleted


def thumbnail_name(key: str, path: str) -> str:
    """File name of a row's thumbnail: stable for the same key and path, safe in any file system."""
    return hashlib.sha1(f"{key}\0{path}".encode()).hexdigest()[:16] + ".jpg"


def make_thumbnail(data: bytes, size: int, max_pixels: int | None = None) -> tuple[bytes, int, int]:
    """JPEG bytes of an upright thumbnail whose longer side is at most `size`, and its width and height.

    Decoding goes through `pipeline.stages.decode` (EXIF orientation, decompression-bomb limit, transparency
    over grey), so a thumbnail is the same upright picture the boxes were computed on.

    Args:
        data: the image file's bytes.
        size: longest side of the thumbnail in pixels.
        max_pixels: the run's decompression-bomb limit (its --max-pixels); None for the default.

    Returns:
        (JPEG bytes, width, height).

    Raises:
        ValueError: the bytes are not a decodable image (the message says why).
    """
    # Shorter side >= size, so the longer one is too: the thumbnail is never smaller than asked.
    config = DecodeConfig(min_short_side=size)
    if max_pixels:
        config = replace(config, max_pixels=max_pixels)
    decoded = decode_image(data, config)
    if isinstance(decoded, DecodeFailure):
        raise ValueError(decoded.message)
    image = Image.fromarray(decoded.pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return buffer.getvalue(), image.width, image.height


def prepare_thumbnail_dir(directory: Path) -> None:
    """Create `directory`, or empty it of the thumbnails of an earlier report (files named like THUMBNAIL_NAME; nothing else is touched)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_file() and THUMBNAIL_NAME.match(entry.name):
            entry.unlink()


def read_limits(decode: Mapping[str, Any]) -> DecodeConfig:
    """The read and decode limits of a run, from its manifest's `decode` record (defaults where it has none)."""
    known = {name: decode[name] for name in ("max_bytes", "max_pixels", "allowed_schemes") if decode.get(name)}
    return DecodeConfig(**known)


def write_thumbnails(
    table: pa.Table, directory: Path, size: int, limits: DecodeConfig, storage_options: Mapping[str, Any], workers: int
) -> dict[str, dict[str, Any]]:
    """Thumbnails for each row of `table`, written into `directory`, and each row's gallery entry.

    Args:
        table: rows with key, path and boxes columns.
        directory: where the thumbnails go; entries link to them relative to its parent.
        size: longer side of a thumbnail in pixels.
        limits: the run's read limits (`read_limits`): byte and pixel limits, URL schemes.
        storage_options: fsspec options for reading remote images.
        workers: threads reading and shrinking images.

    Returns:
        key -> {path, boxes, src, w, h}, or {path, boxes, error} for an image that could not be read or
        decoded (it costs its thumbnail, never the report). Boxes are compact lists
        [x0, y0, x1, y1, level, parent, label, score, saliency].
    """

    def one(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        entry: dict[str, Any] = {"path": row["path"], "boxes": [_box_entry(b) for b in row.get("boxes") or ()]}
        try:
            check_scheme(row["path"], limits.allowed_schemes)
            content = read_bytes(row["path"], storage_options, max_bytes=limits.max_bytes)
            data, width, height = make_thumbnail(content, size, limits.max_pixels)
        except Exception as error:  # an unreadable image costs its thumbnail, never the report
            entry["error"] = one_line(f"{type(error).__name__}: {error}", 200)
            return row["key"], entry
        name = thumbnail_name(row["key"], row["path"])
        (directory / name).write_bytes(data)
        entry.update(src=f"{directory.name}/{name}", w=width, h=height)
        return row["key"], entry

    rows = table.to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # reads are I/O bound; PIL releases the GIL
        return dict(pool.map(one, rows))


def _box_entry(box: Mapping[str, Any]) -> list[Any]:
    # [x0, y0, x1, y1, level, parent, label, score, saliency], compact for the embedded JSON
    return [round(float(box[k]), 4) for k in ("x0", "y0", "x1", "y1")] + [
        box.get("level"),
        box.get("parent"),
        box.get("label"),
        number(box.get("score"), 3),
        number(box.get("saliency"), 3),
    ]
