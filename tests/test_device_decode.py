"""JPEG decoding on the scoring device (`--decode gpu|auto`): header checks on the CPU, decoding, orientation,
reduction and CPU fallback in the actor. The device is the CPU here (torchvision's libjpeg path runs the same
code as nvJPEG's up to the decoder call); the CUDA comparison runs where a GPU exists."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, DecodeConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig, decodes_on_device
from pipeline.models.spec import resolve_model
from pipeline.schema import DECODE_ERROR, OK
from pipeline.stages.decode import DecodedImage, DecodeFailure, DeferredJpeg, decode_image, defer_jpeg
from pipeline.stages.device_decode import CHUNK, box_reduce, decode_jpegs, upright
from pipeline.stages.read_decode import ReadDecodeStage
from pipeline.stages.score_rows import ScoreStage

from .corpus import build_corpus
from .tiny import TINY_MODEL

# PIL's transposition for each EXIF orientation, as ImageOps.exif_transpose applies it
PIL_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
NO_REDUCTION = DecodeConfig(min_short_side=10_000)  # neither path reduces: pixels comparable one to one


def _photo(size=(300, 200), seed=0) -> Image.Image:
    """A smooth image (JPEG-friendly) with distinct corners, so orientation errors cannot cancel out."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, orientation: int = 1, quality: int = 95) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_matches_pil_for_every_exif_orientation(orientation):
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    expected = image.transpose(PIL_TRANSPOSE[orientation]) if orientation in PIL_TRANSPOSE else image
    assert torch.equal(upright(_tensor(image), orientation), _tensor(expected))


@pytest.mark.parametrize(("size", "factor"), [((1001, 757), 7), ((640, 480), 2), ((97, 64), 3), ((300, 200), 1)])
def test_box_reduce_matches_pil_reduce(size, factor):
    image = _photo(size)
    reduced = box_reduce(_tensor(image), factor)
    expected = _tensor(image.reduce(factor))
    assert reduced.shape == expected.shape  # partial edge blocks kept, as PIL keeps them
    assert (reduced.int() - expected.int()).abs().max() <= 1  # rounding only


@pytest.mark.parametrize("size", [(1600, 1200), (1001, 757), (4000, 3000), (640, 480), (3000, 2999), (225, 900)])
def test_device_decode_has_the_geometry_of_cpu_draft_decoding(size):
    data = _jpeg(_photo(size), quality=80)
    decode = DecodeConfig(min_short_side=224)
    [pixels] = decode_jpegs([data], [1], decode.min_short_side, "cpu")
    on_cpu = decode_image(data, decode)  # DCT-domain draft, then a box filter
    assert pixels.shape[1:] == on_cpu.pixels.shape[:2]
    assert min(pixels.shape[1:]) >= 224
    difference = (pixels.int() - torch.from_numpy(on_cpu.pixels.copy()).permute(2, 0, 1).int()).abs().float()
    assert difference.mean() < 3.0  # area averages of the same image, in the DCT domain or in pixels


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_device_decode_equals_cpu_decode_upright(orientation):
    data = _jpeg(_photo(), orientation)
    deferred = defer_jpeg(data, NO_REDUCTION)
    assert deferred == DeferredJpeg(orientation, *((200, 300) if orientation in (6, 8) else (300, 200)))
    [pixels] = decode_jpegs([data], [deferred.orientation], NO_REDUCTION.min_short_side, "cpu")
    on_cpu = decode_image(data, NO_REDUCTION)
    assert isinstance(on_cpu, DecodedImage)
    expected = torch.from_numpy(on_cpu.pixels.copy()).permute(2, 0, 1)
    assert pixels.shape == expected.shape == (3, deferred.height, deferred.width)
    assert (pixels.int() - expected.int()).abs().float().mean() < 1.0  # two libjpeg builds: IDCT rounding only


def test_one_corrupt_file_fails_alone_in_a_batch():
    good = _jpeg(_photo())
    corrupt = good[:200] + bytes(800) + good[1000:]  # valid header, garbage entropy-coded data
    contents = [good] * (CHUNK + 3) + [b"\xff\xd8not a jpeg", good]  # the bad file sits in the second decoder call
    results = decode_jpegs(contents, [1] * len(contents), 100, "cpu")
    assert len(results) == len(contents)
    assert isinstance(results[CHUNK + 3], Exception)
    assert all(isinstance(r, torch.Tensor) and torch.equal(r, results[0]) for i, r in enumerate(results) if i != CHUNK + 3)
    assert all(isinstance(r, (torch.Tensor, Exception)) for r in decode_jpegs([corrupt], [1], 100, "cpu"))


def test_defer_jpeg_leaves_other_files_to_the_cpu_and_refuses_bombs():
    photo = _photo()
    assert defer_jpeg(_png(photo), DecodeConfig()) is None
    assert defer_jpeg(_jpeg(photo.convert("CMYK")), DecodeConfig()) is None  # nvJPEG has no CMYK
    assert defer_jpeg(b"plain text", DecodeConfig()) is None  # decode_image names the problem
    assert defer_jpeg(_jpeg(photo.convert("L")), DecodeConfig()) == DeferredJpeg(1, 300, 200)
    refused = defer_jpeg(_jpeg(photo), DecodeConfig(max_pixels=300 * 200 - 1))
    assert isinstance(refused, DecodeFailure) and "max_pixels" in refused.message


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_deferred_read_and_decode_gives_jpeg_bytes_for_jpegs_and_pixels_for_the_rest(tmp_path):
    expected = build_corpus(tmp_path)
    images = {p: s for p, s in expected.items() if s.status != "skipped"}
    batch = pa.table({"key": list(images), "path": [str(tmp_path / p) for p in images]})
    plain = ReadDecodeStage(DecodeConfig(), {})(batch).to_pylist()
    deferred = ReadDecodeStage(DecodeConfig(), {}, defer_jpegs=True)(batch).to_pylist()
    jpegs = 0
    for before, after in zip(plain, deferred):
        # the same status and upright size either way; a truncated JPEG passes the header check and fails later
        assert (before["width"], before["height"]) == (after["width"], after["height"]) or before["status"] != OK
        assert after["status"] == before["status"] or (after["status"] == OK and after["jpeg"] is not None)
        if after["jpeg"] is not None:
            jpegs += 1
            assert after["pixels"] is None and 1 <= after["orientation"] <= 8
            assert Image.open(io.BytesIO(after["jpeg"])).format == "JPEG"
        elif after["status"] == OK:
            assert after["pixels"] is not None and after["orientation"] is None
    assert jpegs >= 3  # photos, the EXIF-rotated file, and the truncated one


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "labels.txt").write_text("cat\nrocket\ncoffee\n")
    vocabulary_config = VocabularyConfig(labels=str(cache / "labels.txt"))
    from pipeline.vocab import load_vocabulary

    return ScoreStage(
        model=resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu", cache_dir=str(cache))),
        scoring=ScoringConfig(method="lgca", crops=4, regions=1, steps=2),
        vocabulary=load_vocabulary(vocabulary_config, {}),
        decode=DecodeConfig(min_short_side=64),
        storage_options={},
        cpu_threads=1,
    )


def test_scoring_actor_scores_deferred_jpegs_like_cpu_decoded_ones(tmp_path, actor):
    paths = []
    for index, orientation in enumerate([1, 6, 3]):
        paths.append(tmp_path / f"{index}.jpg")
        paths[-1].write_bytes(_jpeg(_photo(seed=index), orientation))
    truncated = _jpeg(_photo(seed=9))
    (tmp_path / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    paths.append(tmp_path / "truncated.jpg")
    batch = pa.table({"key": [p.name for p in paths], "path": [str(p) for p in paths]})
    decode = DecodeConfig(min_short_side=64)  # 200 px short side: neither path reduces
    rows_cpu = actor(ReadDecodeStage(decode, {})(batch)).to_pylist()
    rows_device = actor(ReadDecodeStage(decode, {}, defer_jpegs=True)(batch)).to_pylist()
    assert [r["key"] for r in rows_device] == [r["key"] for r in rows_cpu]
    for on_cpu, on_device in zip(rows_cpu, rows_device):
        assert on_device["status"] == on_cpu["status"], (on_cpu, on_device)
        assert on_device["error_message"] == on_cpu["error_message"]
        if on_cpu["status"] == OK:
            assert on_device["label"] == on_cpu["label"]
            assert np.allclose(on_device["topk_scores"], on_cpu["topk_scores"], atol=2e-3)
            assert len(on_device["boxes"]) == len(on_cpu["boxes"]) > 0
            for box_device, box_cpu in zip(on_device["boxes"], on_cpu["boxes"]):
                assert np.allclose([box_device[k] for k in ["x0", "y0", "x1", "y1"]], [box_cpu[k] for k in ["x0", "y0", "x1", "y1"]])
    # the truncated JPEG passed the header check, failed the device decoder, and PIL named the problem
    assert rows_device[-1]["status"] == DECODE_ERROR and "truncated" in rows_device[-1]["error_message"].lower()


def test_decode_device_is_validated_before_any_work():
    with pytest.raises(ConfigError, match="decode device 'nvjpeg' is unknown"):
        DecodeConfig(device="nvjpeg")
    with pytest.raises(ConfigError, match=r"--decode gpu .* no GPU for the scoring actors \(--device cpu"):
        JobConfig(
            inputs=("x",),
            output="y",
            vocabulary=VocabularyConfig(labels="l"),
            model=ModelConfig(device="cpu"),
            decode=DecodeConfig(device="gpu"),
        )
    with pytest.raises(ConfigError, match="no GPU for the scoring actors"):
        decodes_on_device("gpu", "cpu")
    assert [decodes_on_device(d, "cpu") for d in ("cpu", "auto")] == [False, False]
    assert [decodes_on_device(d, "cuda") for d in ("cpu", "auto", "gpu")] == [False, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares nvJPEG decoding with libjpeg on the CPU")
def test_nvjpeg_matches_cpu_decoding():
    contents = [_jpeg(_photo((640, 480), seed=s), o) for s, o in [(0, 1), (1, 6), (2, 3)]]
    on_gpu = decode_jpegs(contents, [1, 6, 3], 224, "cuda")
    on_cpu = decode_jpegs(contents, [1, 6, 3], 224, "cpu")
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.0


def _photo_directory(directory, count=6):
    directory.mkdir()
    for index in range(count):
        (directory / f"{index}.jpg").write_bytes(_jpeg(_photo((320, 240), seed=index), orientation=1 + index % 8))
    (directory / "other.png").write_bytes(_png(_photo(seed=99)))
    return directory


def _decode_job(tmp_path, images, name, device):
    (tmp_path / "labels.txt").write_text("cat\nrocket\ncoffee\n")
    return JobConfig(
        inputs=(str(images),),
        output=str(tmp_path / name),
        vocabulary=VocabularyConfig(labels=str(tmp_path / "labels.txt")),
        model=ModelConfig(name=TINY_MODEL, pretrained="random"),
        scoring=ScoringConfig(method="lgca", crops=4, regions=1, steps=2),
        decode=DecodeConfig(device=device),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU exists")
def test_decode_gpu_without_a_gpu_in_the_cluster_is_refused_before_labelling(tmp_path, ray_local):
    from pipeline.run.job import run

    images = _photo_directory(tmp_path / "images")
    with pytest.raises(ConfigError, match="no GPU for the scoring actors"):
        run(_decode_job(tmp_path, images, "out", "gpu"))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: labels with --decode gpu and compares with --decode cpu")
def test_decode_gpu_job_matches_decode_cpu_job(tmp_path, ray_local):
    import pyarrow.parquet as pq

    from pipeline.run.job import run

    images = _photo_directory(tmp_path / "images")
    tables = {}
    for device in ("cpu", "gpu"):
        summary = run(_decode_job(tmp_path, images, device, device))
        assert summary.counts[OK] == 7
        tables[device] = pq.read_table(tmp_path / device).sort_by("key").to_pylist()
    for on_cpu, on_gpu in zip(tables["cpu"], tables["gpu"]):
        assert (on_cpu["key"], on_cpu["width"], on_cpu["height"]) == (on_gpu["key"], on_gpu["width"], on_gpu["height"])
        assert np.allclose(on_cpu["topk_scores"], on_gpu["topk_scores"], atol=2e-2)  # bf16 scoring, two JPEG decoders
