"""The stages as plain classes: read-and-decode and scoring run in process on Arrow batches, without Ray; the job,
`lgca eval` and `Labeler` share their decode path; the placement of scoring actors is decided in one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import ConfigError, DecodeConfig, ExecutionConfig, ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.models.spec import resolve_model
from pipeline.run.labeler import to_pixels
from pipeline.run.resources import NodeShape, place_scoring
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR, output_schema
from pipeline.stages.decode import decode_for_views
from pipeline.stages.journal import DecodeJournal
from pipeline.stages.read_decode import TRANSIENT_COLUMNS, ReadDecodeStage, decoded_pixels
from pipeline.stages.score_rows import ScoreStage
from pipeline.vocab import load_vocabulary

from .support import TINY_MODEL, labels_file, photo

GIB = 2**30


def _listing(directory: Path) -> pa.Table:
    Image.fromarray(photo("coffee")).resize((160, 120)).save(directory / "coffee.jpg", quality=90)
    Image.fromarray(photo("rocket")).resize((90, 140)).save(directory / "rocket.png")
    (directory / "broken.jpg").write_bytes((directory / "coffee.jpg").read_bytes()[:300])
    names = ["broken.jpg", "coffee.jpg", "missing.jpg", "rocket.png"]
    return pa.table({"key": names, "path": [str(directory / name) for name in names]})


def test_read_decode_stage_gives_every_row_a_status_and_pixels(tmp_path):
    rows = ReadDecodeStage(DecodeConfig(min_short_side=64), {})(_listing(tmp_path))
    assert rows.column("key").to_pylist() == ["broken.jpg", "coffee.jpg", "missing.jpg", "rocket.png"]
    assert rows.column("status").to_pylist() == [DECODE_ERROR, OK, READ_ERROR, OK]
    assert "FileNotFoundError" in rows.column("error_message")[2].as_py()
    assert rows.column("width").to_pylist()[1::2] == [160, 90] and rows.column("height").to_pylist()[1::2] == [120, 140]
    coffee = decoded_pixels(rows, 1)
    assert coffee.dtype == np.uint8 and coffee.shape[2] == 3 and min(coffee.shape[:2]) >= 64


class _CountingReader:
    """A reader of the stage's interface that serves bytes from memory and counts what it was asked."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.asked = files, []

    def read(self, paths, journal: DecodeJournal):
        self.asked.append(list(paths))
        return [self.files[p] if p in self.files else FileNotFoundError(p) for p in paths]


def test_a_reader_is_the_only_thing_a_new_input_format_brings(tmp_path):
    listing = _listing(tmp_path)
    files = {path: Path(path).read_bytes() for path in listing.column("path").to_pylist() if Path(path).exists()}
    reader = _CountingReader(files)
    from_memory = ReadDecodeStage(DecodeConfig(min_short_side=64), {}, reader=reader)(listing)
    from_disk = ReadDecodeStage(DecodeConfig(min_short_side=64), {})(listing)
    assert reader.asked == [listing.column("path").to_pylist()]
    assert from_memory.column("status").to_pylist() == from_disk.column("status").to_pylist()
    assert from_memory.column("pixels").equals(from_disk.column("pixels"))


def test_score_stage_turns_decoded_rows_into_output_rows_in_process(tmp_path):
    vocabulary = load_vocabulary(VocabularyConfig(labels=str(labels_file(tmp_path, ["coffee", "rocket", "cat"]))), {})
    model = resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu", cache_dir=str(tmp_path / "cache")))
    scoring = ScoringConfig(method="lgca", crops=4, regions=1, steps=1)
    decode = decode_for_views(model.image_size, [scoring])
    stage = ScoreStage(model, scoring, vocabulary, decode, {}, cpu_threads=1)
    decoded = ReadDecodeStage(decode, {})(_listing(tmp_path))
    rows = stage(decoded)
    assert rows.schema == output_schema(decoded.drop_columns(list(TRANSIENT_COLUMNS)).schema)
    table = rows.to_pylist()
    assert [row["status"] for row in table] == [DECODE_ERROR, OK, READ_ERROR, OK]
    for row in table:
        assert row["model"] == "lgca-tiny-vit" and row["pretrained"] == "random(seed=0)"
        if row["status"] == OK:
            assert row["label"] in vocabulary.classes and row["method"] == "lgca" and row["boxes"]
        else:
            assert row["label"] is None and row["error_message"]


def test_labeler_reads_a_file_through_the_jobs_stage(tmp_path):
    listing = _listing(tmp_path)
    decode = decode_for_views(32, [ScoringConfig(method="lgca")])
    rows = ReadDecodeStage(decode, {})(listing)
    pixels, size = to_pixels(tmp_path / "coffee.jpg", decode)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), decoded_pixels(rows, 1)) and size == (160, 120)
    with pytest.raises(ValueError, match="cannot decode .*broken.jpg"):
        to_pixels(tmp_path / "broken.jpg", decode)
    with pytest.raises(OSError, match="missing.jpg: cannot read"):
        to_pixels(tmp_path / "missing.jpg", decode)


def test_decode_scale_is_the_smallest_any_view_needs():
    assert decode_for_views(224, [ScoringConfig(method="clip")]).min_short_side == 224
    assert decode_for_views(224, [ScoringConfig(method="wca")]).min_short_side == 448  # 224 / 0.5
    both = decode_for_views(224, [ScoringConfig(method="wca"), ScoringConfig(method="lgca")])
    assert both.min_short_side == 747  # lgca's smaller crops (0.3) decide
    assert decode_for_views(224, [], DecodeConfig(max_bytes=10)).max_bytes == 10


@pytest.fixture(scope="module")
def tiny_spec():
    return resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random"))


def test_placement_gives_one_actor_per_gpu_and_the_device_they_score_on(tiny_spec):
    gpus = [NodeShape(cpus=16, gpus=4, memory=64 * GIB), NodeShape(cpus=16, gpus=4, memory=64 * GIB)]
    placed = place_scoring(gpus, ExecutionConfig(), tiny_spec, "auto", GIB)
    assert (placed.actors, placed.gpus_per_actor, placed.model.config.device, placed.decode_on_device) == (8, 1.0, "cuda", True)
    assert placed.cpu_threads is None
    halves = place_scoring(gpus, ExecutionConfig(num_gpus=0.5), tiny_spec, "cpu", GIB)
    assert (halves.actors, halves.decode_on_device) == (16, False)
    cpus = place_scoring([NodeShape(cpus=8, gpus=0, memory=32 * GIB)], ExecutionConfig(concurrency=2), tiny_spec, "auto", GIB)
    assert (cpus.actors, cpus.gpus_per_actor, cpus.model.config.device, cpus.decode_on_device) == (2, 0.0, "cpu", False)
    assert cpus.cpu_threads is not None and cpus.cpu_threads >= 1


def test_gpu_decoding_without_a_gpu_fails_before_any_work(tiny_spec):
    with pytest.raises(ConfigError, match="--decode gpu decodes on the scoring GPU"):
        place_scoring([NodeShape(cpus=8, gpus=0, memory=32 * GIB)], ExecutionConfig(), tiny_spec, "gpu", GIB)
    with pytest.raises(ConfigError, match="--decode gpu decodes on the scoring GPU"):
        place_scoring([NodeShape(cpus=8, gpus=2, memory=32 * GIB)], ExecutionConfig(num_gpus=0), tiny_spec, "gpu", GIB)
