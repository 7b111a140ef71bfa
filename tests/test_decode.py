"""Tests of pipeline.stages.decode over the shared corpus, synthetic edge cases, and fuzzed bytes."""

from __future__ import annotations

import functools
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, JpegImagePlugin

from pipeline.config import DecodeConfig
from pipeline.stages.decode import GREY, DecodedImage, DecodeFailure, decode_image, short_side_for

from .corpus import (
    BLUE,
    CORPUS_PATHS,
    DEEP16_BAND,
    DEEP16_LEVELS,
    GIF_FRAMES,
    GREEN,
    RED,
    ROTATED_STORED_SIZE,
    Expected,
    build_corpus,
)

DEFAULT = DecodeConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, build_corpus(directory)


def _decode_file(corpus: tuple[Path, dict[str, Expected]], relative: str, config: DecodeConfig = DEFAULT) -> DecodedImage | DecodeFailure:
    directory, _ = corpus
    return decode_image(Path(directory, *relative.split("/")).read_bytes(), config)


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _assert_pixels(result: DecodedImage) -> None:
    pixels = result.pixels
    assert pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.flags["C_CONTIGUOUS"]


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: float = 12.0) -> bool:
    """Mean colour of a region within `tolerance` per channel (JPEG blurs edges and shifts colours a little)."""
    return bool(np.all(np.abs(pixels.reshape(-1, 3).mean(axis=0) - np.array(colour)) <= tolerance))


# --- the corpus ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", CORPUS_PATHS)
def test_corpus_file(corpus: tuple[Path, dict[str, Expected]], relative: str) -> None:
    expected = corpus[1][relative]
    result = _decode_file(corpus, relative)
    if expected.status == "ok":
        assert isinstance(result, DecodedImage), result
        assert (result.width, result.height) == (expected.width, expected.height)
        _assert_pixels(result)
        height, width = result.pixels.shape[:2]
        assert width <= result.width and height <= result.height  # never upscaled
        assert min(height, width) >= min(DEFAULT.min_short_side, result.width, result.height)
        # The decoded scale keeps the upright aspect ratio, up to the rounding of an integer reduction.
        assert (width >= height) == (result.width >= result.height) or result.width == result.height
    else:
        # decode_error; "skipped" files never reach the decoder, but would fail cleanly if they did.
        assert isinstance(result, DecodeFailure), result
        assert result.message and "\n" not in result.message and "Traceback" not in result.message


@pytest.mark.parametrize(
    ("relative", "fragments"),
    [
        ("empty.jpg", ("empty file (0 bytes)",)),
        ("truncated.jpg", ("truncated JPEG", "image file is truncated")),
        ("notes.jpg", ("not a recognised image format",)),
        ("bomb.png", ("30000 x 30000 = 900000000 pixels", "max_pixels=178956970", "--max-pixels")),
    ],
)
def test_failure_messages(corpus: tuple[Path, dict[str, Expected]], relative: str, fragments: tuple[str, ...]) -> None:
    result = _decode_file(corpus, relative)
    assert isinstance(result, DecodeFailure)
    for fragment in fragments:
        assert fragment in result.message


def test_bomb_refused_before_decoding(corpus: tuple[Path, dict[str, Expected]], monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile):  # records any pixel decoding
        loads.append(self.format or "?")
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    limit_before = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    result = _decode_file(corpus, "bomb.png")
    assert time.perf_counter() - started < 0.5
    assert isinstance(result, DecodeFailure) and "max_pixels" in result.message
    assert loads == []  # refused from the header: the 900 MB image was never allocated
    assert limit_before == Image.MAX_IMAGE_PIXELS  # PIL's global is restored


def test_exif_rotation_gives_upright_size_and_pixels(corpus: tuple[Path, dict[str, Expected]]) -> None:
    result = _decode_file(corpus, "rotated_exif.jpg")
    assert isinstance(result, DecodedImage)
    stored_width, stored_height = ROTATED_STORED_SIZE
    assert (result.width, result.height) == (stored_height, stored_width)
    assert result.pixels.shape == (stored_width, stored_height, 3)
    # Stored left half red; orientation 6 turns it 90 degrees clockwise, so red ends on top.
    half = stored_width // 2
    assert _near(result.pixels[: half - 20], RED)
    assert _near(result.pixels[half + 20 :], BLUE)


def test_sixteen_bit_values_are_scaled_not_clipped(corpus: tuple[Path, dict[str, Expected]]) -> None:
    result = _decode_file(corpus, "deep16.png")
    assert isinstance(result, DecodedImage)
    expected = {0: 0, 32768: 128, 65535: 255}
    for band, level in enumerate(DEEP16_LEVELS):
        region = result.pixels[:, band * DEEP16_BAND : (band + 1) * DEEP16_BAND]
        assert np.all(region == expected[level]), (level, np.unique(region))


def test_palette_alpha_is_composited_over_grey(corpus: tuple[Path, dict[str, Expected]]) -> None:
    result = _decode_file(corpus, "palette_alpha.png")
    assert isinstance(result, DecodedImage)
    half = result.pixels.shape[1] // 2
    assert np.all(result.pixels[:, :half] == GREY)
    assert np.all(result.pixels[:, half:] == BLUE)


def test_gif_gives_first_frame(corpus: tuple[Path, dict[str, Expected]]) -> None:
    result = _decode_file(corpus, "animated.gif")
    assert isinstance(result, DecodedImage)
    assert np.all(result.pixels == GIF_FRAMES[0])


def test_animated_webp_gives_first_frame() -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in (GREEN, RED)]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)
    result = decode_image(data, DEFAULT)
    assert isinstance(result, DecodedImage)
    assert np.all(result.pixels == GREEN)


# --- modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "image_format", "fill", "rgb"),
    [
        ("1", "PNG", 1, (255, 255, 255)),
        ("L", "PNG", 200, (200, 200, 200)),
        ("LA", "PNG", (200, 0), GREY),  # fully transparent: the background shows
        ("LA", "PNG", (200, 255), (200, 200, 200)),
        ("RGBA", "PNG", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", "WEBP", (250, 250, 250, 0), GREY),
        ("RGBA", "PNG", (255, 0, 0, 128), (192, 64, 64)),  # half alpha: midway between red and grey
        ("I;16", "PNG", 65535, (255, 255, 255)),
        ("I;16B", "PNG", 32768, (128, 128, 128)),
        ("I", "TIFF", 65535, (255, 255, 255)),
        ("CMYK", "TIFF", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_modes_become_rgb(mode: str, image_format: str, fill: object, rgb: tuple[int, int, int]) -> None:
    options = {"lossless": True} if image_format == "WEBP" else {}
    data = _encode(Image.new(mode, (20, 12), fill), image_format, **options)
    result = decode_image(data, DEFAULT)
    assert isinstance(result, DecodedImage), result
    _assert_pixels(result)
    assert result.pixels.shape == (12, 20, 3)
    assert np.all(np.abs(result.pixels.astype(int) - rgb) <= 1), np.unique(result.pixels.reshape(-1, 3), axis=0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = _encode(Image.new("RGB", (64, 48), (200, 50, 30)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode_image(data, DEFAULT)
    assert isinstance(result, DecodedImage)
    assert _near(result.pixels, (200, 50, 30), tolerance=4)


# --- scale --------------------------------------------------------------------------------------------


def _gradient(size: tuple[int, int]) -> Image.Image:
    return Image.linear_gradient("L").resize(size).convert("RGB")


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_decodes_at_reduced_dct_scale(orientation: int, monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_gradient((4000, 3000)), "JPEG", quality=80, exif=exif.tobytes())
    requests: list[tuple[str | None, tuple[int, int] | None]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy_draft(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None):
        requests.append((mode, size))
        return original_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy_draft)
    result = decode_image(data, DecodeConfig(min_short_side=300))
    assert isinstance(result, DecodedImage)
    # 3000 // 8 = 375 >= 300: libjpeg decodes at 1/8, asked in stored orientation.
    assert requests == [("RGB", (500, 375))]
    upright = (4000, 3000) if orientation == 1 else (3000, 4000)
    assert (result.width, result.height) == upright
    assert result.pixels.shape == (upright[1] // 8, upright[0] // 8, 3)
    assert 300 <= min(result.pixels.shape[:2]) < 600


def test_png_is_reduced_but_stays_above_min_short_side() -> None:
    data = _encode(_gradient((2000, 1000)), "PNG", compress_level=1)
    result = decode_image(data, DecodeConfig(min_short_side=224))
    assert isinstance(result, DecodedImage)
    assert (result.width, result.height) == (2000, 1000)
    assert result.pixels.shape == (250, 500, 3)  # 1000 // 224 = 4
    assert min(result.pixels.shape[:2]) >= 224


def test_small_images_are_not_upscaled() -> None:
    result = decode_image(_encode(_gradient((100, 80)), "PNG"), DecodeConfig(min_short_side=224))
    assert isinstance(result, DecodedImage)
    assert result.pixels.shape == (80, 100, 3)


@pytest.mark.parametrize(
    ("image_size", "alpha", "expected"),
    [(224, None, 224), (224, 0.5, 448), (224, 0.7, 320), (336, 0.9, 374), (224, 1.0, 224)],
)
def test_short_side_for(image_size: int, alpha: float | None, expected: int) -> None:
    assert short_side_for(image_size, alpha) == expected


@pytest.mark.parametrize(("image_size", "alpha"), [(0, None), (224, 0.0), (224, 1.5)])
def test_short_side_for_rejects_bad_values(image_size: int, alpha: float | None) -> None:
    with pytest.raises(ValueError):
        short_side_for(image_size, alpha)


# --- limits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_max_pixels_above_pil_limit_is_honoured(image_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 10 000 pixels is over twice PIL's (lowered) limit, so PIL alone would refuse it at open (and TIFF at load).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(_gradient((100, 100)), image_format)
    result = decode_image(data, DecodeConfig(max_pixels=20_000, min_short_side=50))
    assert isinstance(result, DecodedImage), result
    assert Image.MAX_IMAGE_PIXELS == 1000
    refused = decode_image(data, DecodeConfig(max_pixels=9_999))
    assert isinstance(refused, DecodeFailure) and "100 x 100 = 10000 pixels" in refused.message


def test_concurrent_decodes_restore_pil_limit(corpus: tuple[Path, dict[str, Expected]], monkeypatch: pytest.MonkeyPatch) -> None:
    # A low PIL limit sends every photo through the path that raises it for the load, from 4 threads at once.
    # A smoke test: a lost restore is a rare interleaving, so passing does not prove the lock.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    relatives = [relative for relative, expected in corpus[1].items() if expected.status != "skipped"] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda relative: _decode_file(corpus, relative), relatives))
    for relative, result in zip(relatives, results):
        assert isinstance(result, DecodedImage) == (corpus[1][relative].status == "ok"), (relative, result)
    assert Image.MAX_IMAGE_PIXELS == 10_000


def test_time_budget_turns_slow_decodes_into_failures(corpus: tuple[Path, dict[str, Expected]]) -> None:
    result = _decode_file(corpus, "chelsea.jpg", DecodeConfig(timeout_s=1e-9))
    assert isinstance(result, DecodeFailure)
    assert "timeout" in result.message


# --- fuzz ---------------------------------------------------------------------------------------------


@functools.cache
def _seed_file(image_format: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    return _encode(Image.fromarray(pixels), image_format, **({"quality": 85} if image_format == "JPEG" else {}))


# Position: often in the header, where changes reach the parsers rather than the entropy-coded data.
_POSITION = st.integers(0, 63) | st.integers(0, 1 << 20)
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), _POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), _POSITION, st.integers(0, 255)),
    st.tuples(st.just("insert"), _POSITION, st.integers(0, 255)),
    st.tuples(st.just("delete"), _POSITION, st.integers(1, 16)),
)
# A small max_pixels bounds the work of a header mutated to declare a large size.
_FUZZ_CONFIG = DecodeConfig(max_pixels=2_000_000, min_short_side=8)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]], keep: float | None) -> bytes:
    out = bytearray(data)
    for operation, position, value in mutations:
        if not out:
            break
        index = position % len(out)
        if operation == "flip":
            out[index] ^= 1 << value
        elif operation == "set":
            out[index] = value
        elif operation == "insert":
            out.insert(index, value)
        else:
            del out[index : index + value]
    if keep is not None:
        out = out[: int(len(out) * keep)]
    return bytes(out)


@settings(
    max_examples=150,
    deadline=None,  # timed below with a bound generous enough for a slow 2-core CI runner
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    image_format=st.sampled_from(["JPEG", "PNG"]),
    mutations=st.lists(_MUTATION, min_size=1, max_size=8),
    keep=st.none() | st.floats(0.0, 1.0),
)
def test_mutated_bytes_never_raise(image_format: str, mutations: list[tuple[str, int, int]], keep: float | None) -> None:
    data = _mutate(_seed_file(image_format), mutations, keep)
    started = time.perf_counter()
    result = decode_image(data, _FUZZ_CONFIG)
    elapsed = time.perf_counter() - started
    assert isinstance(result, (DecodedImage, DecodeFailure))
    assert elapsed < 2.0, f"decode took {elapsed:.2f} s"
    if isinstance(result, DecodedImage):
        _assert_pixels(result)
    else:
        assert result.message and "\n" not in result.message
