"""The Python API without Ray: loading vocabularies, every accepted image type, content keys, the text cache."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ScoringConfig
from pipeline.models.errors import ModelError
from pipeline.run.labeler import Labeler, content_key, to_pixels
from pipeline.vocab import VocabularyError

from .support import photo
from .tiny import CLASSES, DESCRIPTIONS, TINY_MODEL, random_images

SMALL = ScoringConfig(method="lgca", crops=4, regions=1, steps=1)
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")  # two templates keep the tiny text side instant


def _labeler(labels=CLASSES, cache_dir=None, **kwargs) -> Labeler:
    kwargs.setdefault("scoring", SMALL)
    kwargs.setdefault("templates", TEMPLATES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: announced, tested in test_models
        return Labeler.load(
            list(labels) if isinstance(labels, tuple) else labels,
            model=TINY_MODEL,
            pretrained="random",
            device="cpu",
            cache_dir=None if cache_dir is None else str(cache_dir),
            **kwargs,
        )


@pytest.fixture(scope="module")
def labeler(tmp_path_factory):
    return _labeler(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def image():
    return random_images(1)[0]  # (3, 64, 96) uint8


def _probs(results) -> np.ndarray:
    return np.stack([r.probabilities for r in results])


# ---------------------------------------------------------------- loading


def test_load_with_a_list(labeler, image):
    assert labeler.vocabulary.classes == CLASSES
    assert labeler.vocabulary.descriptions == {}
    assert labeler.vocabulary.templates == TEMPLATES
    (result,) = labeler.label([image])
    assert result.probabilities.shape == (len(CLASSES),)
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.label in CLASSES and result.label == result.topk_labels[0]
    assert len(result.boxes) == 2  # one region selected, grown once


def test_load_with_descriptions(tmp_path, labeler, image):
    """A mapping is a descriptors vocabulary: its class vectors differ from the templates-only ones."""
    described = _labeler(DESCRIPTIONS, cache_dir=tmp_path)
    assert described.vocabulary.classes == CLASSES
    assert described.vocabulary.descriptions["cat"] == DESCRIPTIONS["cat"]
    assert not torch.allclose(described.scorer.vectors, labeler.scorer.vectors)
    assert not np.allclose(_probs(described.label([image], ["k"])), _probs(labeler.label([image], ["k"])))


@pytest.mark.parametrize(
    "name, content",
    [("labels.txt", "# classes\n" + "\n".join(CLASSES) + "\n"), ("labels.json", json.dumps(list(CLASSES)))],
    ids=["txt", "json"],
)
def test_load_with_a_labels_file_matches_the_list(tmp_path, labeler, image, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    from_file = _labeler(str(path), cache_dir=tmp_path / "cache")
    assert from_file.vocabulary.classes == CLASSES
    torch.testing.assert_close(from_file.scorer.vectors, labeler.scorer.vectors, rtol=0, atol=0)
    np.testing.assert_array_equal(_probs(from_file.label([image], ["k"])), _probs(labeler.label([image], ["k"])))


def test_load_with_a_descriptors_file(tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({name: list(sentences) for name, sentences in DESCRIPTIONS.items()}), encoding="utf-8")
    assert _labeler(str(path)).vocabulary.descriptions == DESCRIPTIONS


def test_load_errors_are_config_errors():
    with pytest.raises(VocabularyError, match="duplicate class 'cat'"):
        _labeler(["cat", "dog", "cat"])
    with pytest.raises(VocabularyError, match="class names must be strings"):
        _labeler(["cat", 3])
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        Labeler.load(["cat"], model="ViT-B-33", pretrained="random")


# ---------------------------------------------------------------- image types


def _variants(image: torch.Tensor, tmp_path) -> dict:
    hwc = image.permute(1, 2, 0).numpy()
    png = tmp_path / "image.png"
    Image.fromarray(hwc).save(png)
    return {
        "pil": Image.fromarray(hwc),
        "pil-rgba": Image.fromarray(hwc).convert("RGBA"),
        "hwc-uint8": hwc.copy(),
        "hwc-float64": hwc.astype(np.float64) / 255.0,
        "chw-uint8": image.clone(),
        "chw-uint8-strided": torch.from_numpy(hwc.copy()).permute(2, 0, 1),  # not contiguous
        "chw-float32": image.float() / 255.0,
        "path": png,
        "path-str": str(png),
    }


def test_every_input_type_gives_the_same_pixels_and_scores(tmp_path, labeler, image):
    variants = _variants(image, tmp_path)
    for name, variant in variants.items():
        pixels, size = to_pixels(variant)
        assert size == (image.shape[2], image.shape[1]), name
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(), name
        assert torch.equal(pixels, image), name
    names = list(variants)
    results = labeler.label([variants[n] for n in names], keys=["same"] * len(names))
    for name, result in zip(names, results):
        np.testing.assert_array_equal(result.probabilities, results[0].probabilities, err_msg=name)


def test_read_only_arrays_are_copied_before_torch_sees_them(image, monkeypatch):
    """np.asarray(pil_image) is read-only; torch.from_numpy on it warns about undefined behaviour on writes."""
    handed = []
    real = torch.from_numpy

    def recording(array):
        handed.append(array.flags.writeable)
        return real(array)

    monkeypatch.setattr(torch, "from_numpy", recording)
    frozen = image.permute(1, 2, 0).numpy().copy()
    frozen.flags.writeable = False
    assert torch.equal(to_pixels(frozen)[0], image)
    assert handed and all(handed)


def test_float_input_is_clamped_to_unit_range(image):
    over = image.float() / 255.0 * 1.5 - 0.25  # values below 0 and above 1
    pixels, _ = to_pixels(over)
    assert pixels.min() == 0 and pixels.max() == 255


def test_a_batch_tensor_is_a_sequence_of_images(labeler):
    """A (B, 3, H, W) tensor iterates as B images; only a single (3, H, W) image is refused."""
    images = random_images(11)[::5]  # sizes cycle with period 5: three different (3, 64, 96) images
    batch = torch.stack(images)
    np.testing.assert_array_equal(_probs(labeler.label(batch)), _probs(labeler.label(images)))


def _exif_jpeg(path, pixels: torch.Tensor, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path, labeler, image, monkeypatch):
    """A phone JPEG stored 96x64 with orientation 6 (rotate 90 degrees clockwise) is scored upright, 64x96,
    whether given as a path or as an opened PIL image, exactly as the image rotated by hand."""
    path = tmp_path / "phone.jpg"
    _exif_jpeg(path, image, orientation=6)
    with Image.open(path) as opened:
        stored = np.asarray(opened.convert("RGB"))  # the pixels as stored, without the EXIF that rides in .info
    assert stored.shape == (64, 96, 3)
    upright = Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270)  # orientation 6 means this turn

    seen = []
    original = labeler.scorer.score

    def recording(images, keys, sizes=None):
        seen.extend(tuple(i.shape) for i in images)
        return original(images, keys, sizes)

    monkeypatch.setattr(labeler.scorer, "score", recording)
    with Image.open(path) as opened:
        from_pil, from_path, by_hand, sideways = labeler.label([opened, path, upright, stored], keys=["k"] * 4)
    assert seen == [(3, 96, 64), (3, 96, 64), (3, 96, 64), (3, 64, 96)]
    np.testing.assert_array_equal(from_pil.probabilities, by_hand.probabilities)
    np.testing.assert_array_equal(from_path.probabilities, by_hand.probabilities)
    assert not np.allclose(sideways.probabilities, by_hand.probabilities)  # orientation matters to the scores
    # the boxes are laid out on the upright image: the selected crop is square in pixels of a 64-wide, 96-tall
    # picture (its grown box may be clipped by the narrow side, so it is checked only to contain its parent)
    selected, grown = from_pil.boxes
    assert (selected.level, grown.level) == (0, 1)
    assert (selected.x1 - selected.x0) * 64 == pytest.approx((selected.y1 - selected.y0) * 96)
    assert grown.x0 <= selected.x0 and grown.y0 <= selected.y0 and grown.x1 >= selected.x1 and grown.y1 >= selected.y1


# ---------------------------------------------------------------- keys


def test_default_keys_are_content_hashes(labeler):
    a, b = random_images(2)[0], random_images(2, seed=1)[0]
    results = labeler.label([a, a.clone(), Image.fromarray(a.permute(1, 2, 0).numpy()), b])
    keys = [r.key for r in results]
    assert keys[0] == keys[1] == keys[2] == content_key(a)
    assert keys[3] != keys[0]
    np.testing.assert_array_equal(results[0].probabilities, results[1].probabilities)
    assert results[0].boxes == results[1].boxes == results[2].boxes
    assert not np.allclose(results[0].probabilities, results[3].probabilities)


def test_content_key_depends_on_every_pixel_and_the_shape():
    pixels = torch.zeros(3, 4, 6, dtype=torch.uint8)
    changed = pixels.clone()
    changed[2, 3, 5] = 1
    assert content_key(pixels) != content_key(changed)
    assert content_key(pixels) != content_key(pixels.reshape(3, 6, 4))  # same bytes, other image
    assert content_key(pixels) == content_key(torch.zeros(3, 4, 6, dtype=torch.uint8))
    assert len(content_key(pixels)) == 24


def test_path_key_is_the_path(tmp_path, labeler, image):
    path = tmp_path / "a.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    (result,) = labeler.label([path])
    assert result.key == str(path)


def test_key_fixes_the_crops(labeler, image):
    """The same pixels under another key get other crops, hence other salient boxes."""
    first, second, again = labeler.label([image, image, image], keys=["one", "two", "one"])
    assert first.boxes == again.boxes
    assert first.boxes != second.boxes


def test_batching_does_not_change_results(labeler):
    images = random_images(5)
    whole = labeler.label(images)
    split = labeler.label(images, batch_size=2)
    assert [r.key for r in whole] == [r.key for r in split]
    np.testing.assert_allclose(_probs(whole), _probs(split), rtol=0, atol=1e-6)


def test_empty_input(labeler):
    assert labeler.label([]) == []


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (42, TypeError, "cannot label a int; pass a PIL image, an array, a tensor or a path"),
        (b"\xff\xd8", TypeError, "cannot label a bytes"),
        (np.zeros((8, 8), np.uint8), ValueError, r"expected an \(H, W, 3\) RGB array, got shape \(8, 8\)"),
        (np.zeros((8, 8, 4), np.uint8), ValueError, r"expected an \(H, W, 3\) RGB array, got shape \(8, 8, 4\)"),
        (np.zeros((3, 8, 8), np.uint8), ValueError, r"\(H, W, 3\) RGB array, got shape \(3, 8, 8\)"),  # CHW array
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, r"expected a \(3, H, W\) tensor, got shape \(8, 8, 3\)"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), ValueError, "expected a uint8 or float tensor, got torch.int32"),
        (np.zeros((8, 8, 3), np.int64), ValueError, r"expected a uint8 array or floats in \[0, 1\], got int64"),
        (torch.zeros(3, 0, 8, dtype=torch.uint8), ValueError, "the image has no pixels"),
        (Image.new("RGB", (0, 0)), ValueError, "the image has no pixels"),
    ],
)
def test_bad_images_raise_clear_errors(labeler, bad, error, message):
    with pytest.raises(error, match=message):
        labeler.label([bad])


@pytest.mark.parametrize(
    "single",
    [Image.new("RGB", (8, 8)), "photo.jpg", torch.zeros(3, 8, 8, dtype=torch.uint8), np.zeros((8, 8, 3), np.uint8)],
    ids=["pil", "path", "tensor", "array"],
)
def test_a_single_image_must_be_wrapped_in_a_list(labeler, single):
    """Iterating one image would go over its rows or characters and fail far from the cause."""
    with pytest.raises(TypeError, match="label\\(\\) takes a sequence of images, got a single .*; wrap it in a list"):
        labeler.label(single)


@pytest.mark.parametrize("count", [1, 3])
def test_keys_must_match_images(labeler, count):
    """3 keys for 2 images in batches of 2 used to score the first batch and drop the extra key silently."""
    with pytest.raises(ValueError, match=f"2 images but {count} keys"):
        labeler.label(random_images(2), keys=[f"k{i}" for i in range(count)], batch_size=2)


def test_missing_path(tmp_path, labeler):
    with pytest.raises(OSError, match="nope.jpg: cannot read: FileNotFoundError"):
        labeler.label([tmp_path / "nope.jpg"])


def test_not_an_image_file(tmp_path, labeler):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.jpg: not a recognised image format"):  # the message of a decode_error row
        labeler.label([path])


# ---------------------------------------------------------------- text-embedding cache


def _counting_loads(monkeypatch) -> list[int]:
    """Wrap every model Labeler.load creates so that each encode_text call records its batch size."""
    import pipeline.run.labeler as labeler_module

    calls: list[int] = []
    real_load = labeler_module.load_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        encode = model.encode_text

        def counting(texts):
            calls.append(len(texts))
            return encode(texts)

        model.encode_text = counting
        return model

    monkeypatch.setattr(labeler_module, "load_model", load)
    return calls


def test_text_cache_is_read_on_the_second_load(tmp_path, monkeypatch, caplog):
    calls = _counting_loads(monkeypatch)
    first = _labeler(DESCRIPTIONS, cache_dir=tmp_path)
    assert sum(calls) > 0
    files = list((tmp_path / "text").glob("*.safetensors"))
    assert len(files) == 1

    calls.clear()
    second = _labeler(DESCRIPTIONS, cache_dir=tmp_path)
    assert calls == []  # no text encoded: the vectors came from the cache
    torch.testing.assert_close(second.scorer.vectors, first.scorer.vectors, rtol=0, atol=0)

    # a corrupt entry is ignored with a warning, recomputed and rewritten
    files[0].write_bytes(b"\x00garbage")
    caplog.set_level(logging.WARNING, logger="pipeline.run.labeler")
    third = _labeler(DESCRIPTIONS, cache_dir=tmp_path)
    assert sum(calls) > 0
    assert any("ignoring unreadable text-embedding cache" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(third.scorer.vectors, first.scorer.vectors, rtol=0, atol=0)
    from safetensors.torch import load_file

    assert load_file(str(files[0]))["vectors"].shape == (len(CLASSES), 32)

    # the cache is keyed by method (and vocabulary, templates, model): clip gets its own entry
    calls.clear()
    _labeler(DESCRIPTIONS, cache_dir=tmp_path, scoring=ScoringConfig(method="clip"))
    assert sum(calls) > 0
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "text").glob(".partial-*"))


def test_text_cache_distinguishes_vocabularies(tmp_path, monkeypatch):
    calls = _counting_loads(monkeypatch)
    _labeler(["cat", "dog"], cache_dir=tmp_path)
    calls.clear()
    _labeler(["cat", "bird"], cache_dir=tmp_path)
    assert sum(calls) > 0
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2


# ---------------------------------------------------------------- a real architecture


@pytest.mark.slow
def test_real_architecture_on_photos(tmp_path):
    """ViT-B-32 (random weights) on three scikit-image photos: shapes, probabilities, and 1 + N + K*T passes."""
    photos = [photo(name) for name in ("astronaut", "chelsea", "coffee")]  # HWC uint8 arrays of three sizes
    labels = {
        "astronaut": ["a person in a white space suit", "an astronaut with a flag"],
        "cat": ["a small furry pet with whiskers", "a tabby cat"],
        "coffee": ["a cup of coffee on a saucer", "a mug of hot coffee"],
    }
    scoring = ScoringConfig(method="lgca", crops=6, regions=2, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        labeler = Labeler.load(labels, model="ViT-B-32", pretrained="random", scoring=scoring, cache_dir=str(tmp_path))
    views = []
    encode = labeler.scorer.encode_image

    def counting(batch):
        views.append(batch.shape[0])
        assert tuple(batch.shape[1:]) == (3, 224, 224)
        return encode(batch)

    labeler.scorer.encode_image = counting
    results = labeler.label(photos)
    assert sum(views) == len(photos) * scoring.encoder_passes == 3 * (1 + 6 + 2)
    assert len(results) == 3
    assert len({r.key for r in results}) == 3
    for result in results:
        assert result.probabilities.shape == (3,) and result.probabilities.dtype == np.float32
        assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.topk_labels == sorted(labels, key=lambda c: -result.probabilities[list(labels).index(c)])
        assert [b.level for b in result.boxes] == [0, 0, 1, 1]
        assert [b.parent for b in result.boxes] == [-1, -1, 0, 1]
        for box in result.boxes:
            assert 0 <= box.x0 < box.x1 <= 1 and 0 <= box.y0 < box.y1 <= 1
