"""WebDataset tar shards in: samples keyed as WebDataset keys them, captions and metadata riding along, every bad
archive a row or a count (never a silence), tars written by the `webdataset` package and by img2dataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.run.job import run
from pipeline.schema import OK, READ_ERROR
from pipeline.stages.sink import MEMBERS_KEY
from pipeline.stages.webdataset import COLUMNS, TarTally, WebDatasetFormat, read_tar_batches, samples, tar_source

from .archives import CLASSES, PHOTOS, img2dataset, served, tiny_clip_job, write_photos
from .support import labels_file, photo

SCHEMA_NAMES = ("key", "path", *COLUMNS.names)


def _image(name: str, fmt: str, side: int = 48) -> bytes:
    image = Image.fromarray(photo(name))
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shard(path: Path, samples_: list[dict]) -> Path:
    """A tar written by the webdataset package's TarWriter (bytes and strings as given, no re-encoding)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples_:
            sink.write(sample)
    return path


def _shard_of_formats(path: Path) -> Path:
    return _write_shard(
        path,
        [
            {"__key__": "a-png", "png": _image("cat", "PNG"), "txt": b"a cat", "json": b'{"width": 48}'},
            {"__key__": "b-webp", "webp": _image("rocket", "WEBP"), "txt": b"a rocket"},
            {"__key__": "c-jpeg", "jpeg": _image("coffee", "JPEG")},
        ],
    )


def _read(path: Path, max_bytes: int | None = None) -> tuple[list, TarTally]:
    tally = TarTally()
    size = None if path.name.endswith(".gz") else path.stat().st_size
    with open(path, "rb") as handle:
        return list(samples(handle, path.name, max_bytes, tally, size)), tally


def test_samples_of_a_tarwriter_shard_keep_their_keys_captions_and_metadata(tmp_path):
    found, tally = _read(_shard_of_formats(tmp_path / "00000.tar"))
    assert [s.key for s in found] == ["a-png", "b-webp", "c-jpeg"]
    assert [s.image for s in found] == ["a-png.png", "b-webp.webp", "c-jpeg.jpeg"]
    assert [s.caption for s in found] == ["a cat", "a rocket", None] and found[0].metadata == '{"width": 48}'
    assert all(Image.open(io.BytesIO(s.data)).size for s in found)
    assert dict(tally.members) == {"png": 1, "txt": 2, "json": 1, "webp": 1, "jpeg": 1} and not tally.left_out


def test_odd_samples_are_counted_or_given_a_row_never_dropped_silently(tmp_path):
    shard = _write_shard(
        tmp_path / "odd.tar",
        [
            {"__key__": "two", "jpg": _image("cat", "JPEG"), "png": _image("rocket", "PNG")},  # the first image is labelled
            {"__key__": "no-image", "txt": b"a caption without its image"},
            {"__key__": "zipped", "jpg.gz": b"\x1f\x8b gzip'd"},  # not an image the decoder takes
            {"__key__": "large", "jpg": _image("astronaut", "JPEG", side=300)},
        ],
    )
    found, tally = _read(shard, max_bytes=4000)
    assert [s.key for s in found] == ["two", "large"]
    assert found[0].image == "two.jpg"
    assert isinstance(found[1].data, OSError) and "over the --max-bytes limit of 4000" in str(found[1].data)
    assert tally.left_out == {"extra image in a sample": 1, "sample without an image": 2}
    assert tally.members["jpg.gz"] == 1


def test_members_of_a_sample_apart_give_a_row_that_says_so(tmp_path):
    path = tmp_path / "apart.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in [("x.jpg", _image("cat", "JPEG")), ("y.jpg", _image("rocket", "JPEG")), ("x.txt", b"late caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("x.png")
        data = _image("coffee", "PNG")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    found, _ = _read(path)
    assert [s.key for s in found] == ["x", "y", "x#2"]
    assert isinstance(found[2].data, ValueError) and "not adjacent" in str(found[2].data)


def test_a_truncated_tar_gives_its_samples_before_the_fault_and_one_error_naming_the_offset(tmp_path):
    whole = _shard_of_formats(tmp_path / "whole.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    found, _ = _read(cut)
    assert [s.key for s in found[:-1]] == ["a-png", "b-webp"][: len(found) - 1]
    error = found[-1]
    assert error.key.startswith("#error@") and "cut.tar is truncated" in str(error.data) and "at byte" in str(error.data)
    at_an_edge = tmp_path / "edge.tar"
    at_an_edge.write_bytes(whole[: found[1].offset])  # cut where the second sample's first header begins
    edge, _ = _read(at_an_edge)
    assert [s.key for s in edge[:-1]] == ["a-png"] and "ends without the end-of-archive blocks" in str(edge[-1].data)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    (only,), _ = _read(empty)
    assert "empty" in str(only.data)


def test_a_tar_without_images_gives_one_row_saying_what_it_held(tmp_path):
    shard = _write_shard(tmp_path / "text.tar", [{"__key__": "a", "txt": b"x"}, {"__key__": "b", "json": b"{}"}])
    schema = WebDatasetFormat().schema(None, {})
    ((rows, contents),) = list(read_tar_batches(tar_source(str(shard))[0], schema, {}, 8, None, TarTally()))
    assert rows.num_rows == 1 and "holds no image sample (1 json, 1 txt)" in str(contents[0])


def test_a_gzipped_tar_is_read_as_a_stream(tmp_path):
    plain = _shard_of_formats(tmp_path / "plain.tar").read_bytes()
    import gzip

    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress(plain))
    found, _ = _read(tmp_path / "shard.tar.gz")
    assert [s.key for s in found] == ["a-png", "b-webp", "c-jpeg"]


@pytest.mark.integration
def test_tarwriter_shards_by_brace_range_and_a_truncated_one_are_labelled_exactly_once(tmp_path, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(3):
        _shard_of_formats(shards / f"{index:05d}.tar")
    whole = (shards / "00002.tar").read_bytes()
    (shards / "00002.tar").write_bytes(whole[: len(whole) * 2 // 3])
    output = tmp_path / "out"
    summary = run(tiny_clip_job([f"{shards}/{{00000..00002}}.tar"], output, labels_file(tmp_path, CLASSES)))
    table = pq.read_table(output).sort_by("key")
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == summary.inputs == sum(summary.counts.values())
    assert [k for k in keys if k.startswith("00000.tar/")] == ["00000.tar/a-png", "00000.tar/b-webp", "00000.tar/c-jpeg"]
    errors = table.filter(pc.equal(table.column("status"), READ_ERROR)).to_pylist()
    assert len(errors) == 1 and errors[0]["key"].startswith("00002.tar/#error@") and "is truncated" in errors[0]["error_message"]
    ok = table.filter(pc.equal(table.column("status"), OK))
    assert set(ok.column("sample_key").to_pylist()) >= {"a-png", "b-webp", "c-jpeg"}
    assert ok.column("caption").to_pylist()[:2] == ["a cat", "a rocket"]
    assert sorted(p.name for p in output.glob("part-*.parquet")) == sorted(f"part-{s}.parquet" for s in _plan_shards(output))
    assert sorted(p.name.split("-")[1] for p in output.glob("part-*.parquet")) == ["00000", "00001", "00002"]  # one per tar, named so
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["archive_members"]["png"] >= 2 and manifest["counts"]["inputs"] == len(keys)
    footer = pq.read_schema(next(output.glob("part-*.parquet"))).metadata
    assert MEMBERS_KEY in footer


@pytest.mark.integration
def test_an_img2dataset_folder_is_labelled_as_it_is_and_joins_back_to_its_sidecars(tmp_path, ray_local):
    photos = write_photos(tmp_path / "www")
    with served(tmp_path / "www") as base:
        urls = [f"{base}/{p.name}" for p in photos] + [f"{base}/missing.jpg"]
        folder = img2dataset(urls, [f"caption {i}" for i in range(len(urls))], tmp_path / "i2d", "webdataset", per_shard=3)
    output = tmp_path / "out"
    summary = run(tiny_clip_job([str(folder)], output, labels_file(tmp_path, CLASSES)))
    assert summary.counts[OK] == len(PHOTOS)  # the failed download never reached a tar: img2dataset's sidecar has it
    joined = duckdb.sql(
        f"""select count(*), count(distinct o.key) from read_parquet('{output}/*.parquet') o
            join read_parquet('{folder}/*.parquet') s on o.sample_key = s.key where s.status = 'success'"""
    ).fetchall()[0]
    assert joined == (len(PHOTOS), len(PHOTOS))
    captions = dict(duckdb.sql(f"select sample_key, caption from read_parquet('{output}/*.parquet')").fetchall())
    sidecar = dict(duckdb.sql(f"select key, caption from read_parquet('{folder}/*.parquet') where status = 'success'").fetchall())
    assert captions == sidecar
    plan = json.loads((output / "_plan" / "plan.json").read_text())
    assert plan["estimated_images"] == 3 * 2  # the first tar's successes (3, from its _stats.json) times the tars
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["non_image_files_skipped"] == 4  # two sidecar tables, two statistics files, named as such
    assert any("img2dataset's sidecar table of 00000.tar" in name for name in manifest["counts"]["non_image_examples"])


def _plan_shards(output: Path) -> list[str]:
    return [entry[0] for entry in json.loads((output / "_plan" / "plan.json").read_text())["shards"]]


@pytest.mark.integration
def test_a_run_killed_mid_archive_resumes_to_every_sample_exactly_once_on_s3(tmp_path, s3_server, s3_bucket):
    import os
    import subprocess
    import tempfile

    import fsspec

    from pipeline.faults import FAULT_ENV

    from .support import lgca_run

    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(4):
        _write_shard(
            shards / f"{index:05d}.tar",
            [{"__key__": f"s{index}-{n}", "jpg": _image(name, "JPEG"), "txt": f"{name} {n}".encode()} for n, name in enumerate(PHOTOS[:3])],
        )
    s3_server.upload_tree(shards, f"{s3_bucket}/shards")
    output = f"{s3_bucket}/labels"
    ray_tmp = tempfile.mkdtemp(prefix="lg", dir="/tmp")  # short: Ray's socket paths must stay under ~107 bytes
    env = {**os.environ, "LGCA_STORAGE_OPTIONS": json.dumps(s3_server.storage_options), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = lgca_run(
        f"{s3_bucket}/shards/{{00000..00003}}.tar", labels_file(tmp_path, CLASSES), output, "--method", "clip", "--decode-batch-size", "2"
    )
    try:
        killed = subprocess.run(command, env={**env, FAULT_ENV: "scoring"}, capture_output=True, text=True, timeout=300)
        assert killed.returncode < 0 or killed.returncode == 137, killed.stderr[-2000:]  # SIGKILLed after its first commit
        fs = fsspec.filesystem("s3", **s3_server.storage_options)
        assert not fs.exists(f"{output}/_SUCCESS")
        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        parts = sorted(p for p in fs.ls(output, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
        keys = []
        for part in parts:
            with fs.open(part, "rb") as handle:
                keys.extend(pq.read_table(handle, columns=["key"]).column("key").to_pylist())
        assert len(parts) == 4 and sorted(keys) == sorted(f"{i:05d}.tar/s{i}-{n}" for i in range(4) for n in range(3))
        assert fs.exists(f"{output}/_SUCCESS")
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


@pytest.mark.integration
def test_retry_failed_reads_a_repaired_tar_again_whole(tmp_path, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    whole = _shard_of_formats(shards / "00000.tar").read_bytes()
    (shards / "00000.tar").write_bytes(whole[: len(whole) // 2])  # cut: its first sample, then an error row
    output = tmp_path / "out"
    labels = labels_file(tmp_path, CLASSES)
    first = run(tiny_clip_job([str(shards / "00000.tar")], output, labels))
    assert first.counts[READ_ERROR] == 1
    (shards / "00000.tar").write_bytes(whole)  # the store healed: the whole tar is there again
    again = run(tiny_clip_job([str(shards / "00000.tar")], output, labels, resume=True, retry_failed=True))
    table = pq.read_table(output)
    assert sorted(table.column("key").to_pylist()) == ["00000.tar/a-png", "00000.tar/b-webp", "00000.tar/c-jpeg"]
    assert again.counts == {**again.counts, OK: 3, READ_ERROR: 0}
