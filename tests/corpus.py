"""Test image files and what the pipeline should report for each: real photos, edge cases and bad bytes."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .support import photo

MAX_PHOTO_SIDE = 512  # photos are shrunk to this long side so tests stay fast
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

# deep16.png: 16-bit grey, DEEP16_BAND columns per level, left to right; 8-bit values are round(v * 255 / 65535).
DEEP16_LEVELS = (0, 32768, 65535)
DEEP16_BAND = 32
# palette_alpha.png: left half palette index 0 = red at alpha 0, right half index 1 = opaque blue.
# animated.gif: frames RED, GREEN, BLUE; the decoder keeps the first.
GIF_FRAMES = (RED, GREEN, BLUE)
# rotated_exif.jpg: stored 400 x 300, left half red, right half blue, EXIF orientation 6 (rotate 90 degrees
# clockwise to view): upright it is 300 x 400 with the red half on top.
ROTATED_STORED_SIZE = (400, 300)


@dataclass(frozen=True)
class Expected:
    """What the pipeline reports for one corpus file."""

    status: str  # ok | decode_error | skipped (not an image: the source listing skips it, never decoded)
    width: int | None = None  # upright original width, for ok
    height: int | None = None  # upright original height, for ok


_Builder = Callable[[], tuple[bytes, Expected]]  # a file's bytes and its expected outcome


def build_corpus(directory: Path) -> dict[str, Expected]:
    """Write the corpus under `directory`.

    Args:
        directory: where to write; created if missing. Files in a subdirectory are included.

    Returns:
        Per relative POSIX path (as in CORPUS_PATHS), the expected status and upright size.
    """
    expected: dict[str, Expected] = {}
    for relative, build in _FILES.items():
        data, outcome = build()
        path = Path(directory, *relative.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[relative] = outcome
    return expected


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _photo(name: str, max_side: int = MAX_PHOTO_SIDE) -> Image.Image:
    """A scikit-image photo (`support.photo`), shrunk to `max_side` on its long side."""
    image = Image.fromarray(photo(name)).convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps the aspect ratio, never enlarges
    return image


def _saved_photo(name: str, image_format: str, max_side: int = MAX_PHOTO_SIDE, **options: object) -> _Builder:
    def build() -> tuple[bytes, Expected]:
        image = _photo(name, max_side)
        return _encode(image, image_format, **options), Expected("ok", *image.size)

    return build


def _halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def _empty() -> tuple[bytes, Expected]:
    return b"", Expected("decode_error")


def _truncated() -> tuple[bytes, Expected]:
    data = _encode(_photo("chelsea"), "JPEG", quality=90)
    return data[: len(data) * 2 // 5], Expected("decode_error")


def _text_as_jpeg() -> tuple[bytes, Expected]:
    return b"Meeting notes\n- label the holiday photos\n- check the bucket\n", Expected("decode_error")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb() -> tuple[bytes, Expected]:
    """A PNG declaring 30000 x 30000 8-bit grey pixels (900 MB) in a few hundred bytes; only 4 rows are present."""
    # width, height, bit depth, colour type grey, deflate, adaptive filtering, no interlace
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(4 * (1 + 30000)))  # each row: filter byte + 30000 samples
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")
    return data, Expected("decode_error")


def _cmyk() -> tuple[bytes, Expected]:
    image = _photo("coffee", 240).convert("CMYK")
    return _encode(image, "JPEG", quality=90), Expected("ok", *image.size)


def _deep16() -> tuple[bytes, Expected]:
    height = 24
    values = np.repeat(np.array(DEEP16_LEVELS, dtype=np.uint16), DEEP16_BAND)[None, :].repeat(height, axis=0)
    image = Image.fromarray(values)  # mode I;16
    return _encode(image, "PNG"), Expected("ok", values.shape[1], height)


def _palette_alpha() -> tuple[bytes, Expected]:
    width, height = 64, 48
    indices = np.zeros((height, width), dtype=np.uint8)
    indices[:, width // 2 :] = 1
    image = Image.frombytes("P", (width, height), indices.tobytes())
    image.putpalette([*RED, *BLUE])
    return _encode(image, "PNG", transparency=0), Expected("ok", width, height)


def _animated_gif() -> tuple[bytes, Expected]:
    size = (48, 32)
    frames = [Image.new("RGB", size, colour) for colour in GIF_FRAMES]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return data, Expected("ok", *size)


def _rotated_exif() -> tuple[bytes, Expected]:
    image = _halves(ROTATED_STORED_SIZE, RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    data = _encode(image, "JPEG", quality=95, exif=exif.tobytes())
    width, height = ROTATED_STORED_SIZE
    return data, Expected("ok", height, width)


def _tiny() -> tuple[bytes, Expected]:
    return _encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"), Expected("ok", 1, 1)


def _readme() -> tuple[bytes, Expected]:
    return b"Photos for the labelling test corpus.\n", Expected("skipped")


_FILES: dict[str, _Builder] = {
    # real photographs, one per format and extension
    "astronaut.png": _saved_photo("astronaut", "PNG", max_side=384),
    "chelsea.jpg": _saved_photo("chelsea", "JPEG", quality=90),
    "rocket.jpeg": _saved_photo("rocket", "JPEG", quality=90),
    "coffee.webp": _saved_photo("coffee", "WEBP", quality=80),
    # lossless files of photos are large: those are kept smaller
    "hubble.bmp": _saved_photo("hubble", "BMP", max_side=320),
    "motorcycle.tif": _saved_photo("motorcycle", "TIFF", max_side=320, compression="tiff_lzw"),
    "ihc.tiff": _saved_photo("ihc", "TIFF", compression="jpeg", quality=90),  # JPEG-in-TIFF via libtiff
    # bad bytes
    "empty.jpg": _empty,
    "truncated.jpg": _truncated,
    "notes.jpg": _text_as_jpeg,
    "bomb.png": _bomb,
    # edge cases that decode
    "cmyk.jpg": _cmyk,
    "deep16.png": _deep16,
    "palette_alpha.png": _palette_alpha,
    "animated.gif": _animated_gif,
    "rotated_exif.jpg": _rotated_exif,
    "tiny_1x1.png": _tiny,
    "sub dir/café ünïcode 写真.jpg": _saved_photo("astronaut", "JPEG", max_side=256, quality=90),
    # not an image
    "readme.txt": _readme,
}
CORPUS_PATHS = tuple(_FILES)  # relative POSIX paths, known without writing anything (for parametrize)

__all__ = [
    "BLUE",
    "CORPUS_PATHS",
    "DEEP16_BAND",
    "DEEP16_LEVELS",
    "Expected",
    "GIF_FRAMES",
    "GREEN",
    "MAX_PHOTO_SIDE",
    "RED",
    "ROTATED_STORED_SIZE",
    "build_corpus",
]
