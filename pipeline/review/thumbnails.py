"""Report thumbnails: upright JPEGs decoded as the run decoded them, under stable names, kept between reports."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.progress import ProgressLine
from pipeline.review.text import one_line
from pipeline.stages.decode import DecodeFailure, decode_image
from pipeline.stages.storage import check_scheme, read_bytes

THUMBNAIL_QUALITY = 82  # JPEG quality of thumbnails: small files, boxes stay readable
THUMBNAIL_NAME = re.compile(r"^[0-9a-f]{16}\.jpg$")  # names this module writes; only these are ever deleted


def thumbnail_name(path: str, size: int) -> str:
    """File name of an image's thumbnail: stable for the same image path and size, safe in any file system."""
    return hashlib.sha1(f"{size}\0{path}".encode()).hexdigest()[:16] + ".jpg"


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


def remove_stale(directory: Path, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Delete the files in `directory` named like `pattern` but not in `keep` (what an earlier report wrote); nothing else."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_file() and pattern.match(entry.name) and entry.name not in keep:
                entry.unlink()


def read_limits(decode: Mapping[str, Any]) -> DecodeConfig:
    """The read and decode limits of a run, from its manifest's `decode` record (defaults where it has none)."""
    known = {name: decode[name] for name in ("max_bytes", "max_pixels", "allowed_schemes") if decode.get(name)}
    return DecodeConfig(**known)


def write_thumbnails(
    paths: Sequence[str],
    directory: Path,
    size: int,
    limits: DecodeConfig,
    storage_options: Mapping[str, Any],
    workers: int,
    progress: ProgressLine | None = None,
) -> dict[str, dict[str, Any]]:
    """A thumbnail in `directory` for each image path, made now or kept from an earlier report.

    Args:
        paths: distinct image paths or URIs.
        directory: where the thumbnails go (created).
        size: longer side of a thumbnail in pixels.
        limits: the run's read limits (`read_limits`): byte and pixel limits, URL schemes.
        storage_options: fsspec options for reading remote images.
        workers: threads reading and shrinking images.
        progress: advanced once per image.

    Returns:
        path -> {name, w, h}, or {error} for an image that could not be read or decoded (it costs its
        thumbnail, never the report).
    """
    directory.mkdir(parents=True, exist_ok=True)

    def one(path: str) -> tuple[str, dict[str, Any]]:
        name = thumbnail_name(path, size)
        target = directory / name
        try:
            if target.is_file():  # made by an earlier report of the same images at the same size
                with Image.open(target) as existing:
                    return path, {"name": name, "w": existing.width, "h": existing.height}
            check_scheme(path, limits.allowed_schemes)
            content = read_bytes(path, storage_options, max_bytes=limits.max_bytes)
            data, width, height = make_thumbnail(content, size, limits.max_pixels)
        except Exception as error:  # an unreadable image costs its thumbnail, never the report
            return path, {"error": one_line(f"{type(error).__name__}: {error}", 200)}
        finally:
            if progress is not None:
                progress.advance()
        staged = directory / f".{name}.partial"
        staged.write_bytes(data)
        staged.replace(target)
        return path, {"name": name, "w": width, "h": height}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # reads are I/O bound; PIL releases the GIL
        return dict(pool.map(one, paths))
