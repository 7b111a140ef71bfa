"""Parquet files that hold the images: Hugging Face datasets' `image` struct and img2dataset's `jpg` column are
labelled row by row, the plan lists row ranges (never rows), and null bytes are read_error rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, ExecutionConfig
from pipeline.run.job import run
from pipeline.schema import OK, READ_ERROR
from pipeline.stages.image_bytes import cut_sources, find_image_column, read_batches
from pipeline.stages.plan import PLAN_DIR, read_plan
from pipeline.stages.sources import parse_input
from pipeline.stages.storage import SourceError

from .archives import CLASSES, PHOTOS, img2dataset, served, tiny_clip_job, write_photos
from .support import labels_file


def _hugging_face_parquet(path: Path, count: int) -> list[str]:
    import datasets

    photos = write_photos(path.parent / "photos")
    images = [Image.open(photos[i % len(photos)]).copy() for i in range(count)]  # in memory: the dataset embeds their bytes
    captions = [f"caption {i}" for i in range(count)]
    dataset = datasets.Dataset.from_dict({"image": images, "caption": captions, "index": list(range(count))})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.to_parquet(str(path), batch_size=4)  # several row groups
    return captions


def test_the_image_column_is_found_in_both_common_layouts():
    hugging_face = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("caption", pa.string())])
    img2dataset_layout = pa.schema([("caption", pa.string()), ("key", pa.string()), ("jpg", pa.binary())])
    assert find_image_column(hugging_face).name == "image" and find_image_column(hugging_face).struct
    assert find_image_column(img2dataset_layout).name == "jpg" and not find_image_column(img2dataset_layout).struct
    assert find_image_column(pa.schema([("path", pa.string())])) is None
    with pytest.raises(SourceError, match="--image-column caption is string, not image bytes"):
        find_image_column(hugging_face, "caption")


def test_a_source_is_read_in_order_across_row_groups_and_cut_into_shards(tmp_path):
    captions = _hugging_face_parquet(tmp_path / "images.parquet", 11)
    metadata = pq.ParquetFile(tmp_path / "images.parquet").metadata
    assert metadata.num_row_groups >= 3  # the ranges below cross row groups
    source = json.dumps({"uri": str(tmp_path / "images.parquet"), "start": 0, "stop": 11, "image": "image", "struct": True})
    pieces = cut_sources([(source, 11)], 5)
    assert [rows for _, rows in pieces] == [5, 5, 1]
    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("index", pa.int64())])
    seen = []
    for text, _ in pieces:
        for rows, contents in read_batches(text, schema, {}, 3, None):
            assert rows.schema == schema and len(contents) == rows.num_rows
            assert all(isinstance(c, bytes) and Image.open(io.BytesIO(c)).size for c in contents)  # image bytes, not the struct
            seen.extend(rows.to_pylist())
    assert [row["index"] for row in seen] == list(range(11))
    assert [row["caption"] for row in seen] == captions
    assert seen[3]["key"] == "images.parquet/000000003" and seen[3]["path"].endswith("images.parquet#row=3")
    limited = next(read_batches(pieces[0][0], schema, {}, 5, 10))[1]
    assert all(isinstance(c, OSError) and "over the --max-bytes limit of 10" in str(c) for c in limited)


@pytest.mark.integration
def test_a_hugging_face_image_dataset_is_labelled_without_listing_its_rows(tmp_path, ray_local):
    captions = _hugging_face_parquet(tmp_path / "images.parquet", 9)
    output = tmp_path / "out"
    summary = run(
        tiny_clip_job(
            [str(tmp_path / "images.parquet")],
            output,
            labels_file(tmp_path, CLASSES),
            execution=ExecutionConfig(rows_per_file=4, decode_batch_size=2, batch_size=4),
        )
    )
    assert summary.counts[OK] == 9 and summary.inputs == 9
    table = pq.read_table(output).sort_by("key")
    assert "image" not in table.column_names  # the bytes never reach the output
    assert table.column("caption").to_pylist() == captions and table.column("index").to_pylist() == list(range(9))
    assert table.column("key").to_pylist()[0] == "images.parquet/000000000"
    plan = read_plan(*_fs(output), "plan")
    assert plan is not None and len(plan.shards) == 3 and all(shard.source for shard in plan.shards)
    assert not (output / PLAN_DIR / "shards").exists()  # row ranges, no listing rows


@pytest.mark.integration
def test_img2dataset_parquet_output_is_labelled_and_its_failed_downloads_are_read_errors(tmp_path, ray_local):
    photos = write_photos(tmp_path / "www")
    with served(tmp_path / "www") as base:
        urls = [f"{base}/{p.name}" for p in photos] + [f"{base}/missing.jpg"]
        folder = img2dataset(urls, [f"caption {i}" for i in range(len(urls))], tmp_path / "i2d", "parquet")
    archive = folder / "00000.parquet"
    output = tmp_path / "out"
    summary = run(tiny_clip_job([str(archive)], output, labels_file(tmp_path, CLASSES)))
    assert summary.counts[OK] == len(PHOTOS) and summary.counts[READ_ERROR] == 1
    failed = duckdb.sql(f"select key, error_message from read_parquet('{output}/*.parquet') where status = 'read_error'").fetchall()
    assert len(failed) == 1 and "column jpg is null" in failed[0][1]
    joined = duckdb.sql(
        f"""select count(*), count(distinct o.key) from read_parquet('{output}/*.parquet') o
            join read_parquet('{archive}') i on o.key = i.key where i.status = 'success' and o.status = 'ok'"""
    ).fetchall()[0]
    assert joined == (len(PHOTOS), len(PHOTOS))  # every downloaded sample once, joined back on img2dataset's key
    assert "jpg" not in pq.read_schema(next(output.glob("part-*.parquet"))).names


@pytest.mark.integration
def test_an_asked_image_column_that_holds_no_images_fails_before_any_work(tmp_path):
    _hugging_face_parquet(tmp_path / "images.parquet", 3)
    config = tiny_clip_job([str(tmp_path / "images.parquet")], tmp_path / "out", labels_file(tmp_path, CLASSES), image_column="caption")
    with pytest.raises(ConfigError, match="--image-column caption is large_string, not image bytes|--image-column caption is string"):
        run(config)
    assert not (tmp_path / "out").exists()
    assert parse_input(str(tmp_path / "images.parquet")).kind == "manifest"  # decided by its columns, at prepare


def _fs(output: Path):
    import fsspec

    return fsspec.filesystem("file"), str(output)
