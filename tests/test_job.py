"""The labelling job end to end on a real local Ray (and a moto S3 server): rows, statuses, resume, readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ExecutionConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.run.job import run
from pipeline.schema import OUTPUT_COLUMNS

from .corpus import build_corpus
from .ray_head import RayHead
from .support import LGCA, TINY_MODEL, labels_file, lgca_run

pytestmark = pytest.mark.integration  # every test runs a job: on Ray in this process, or `lgca run` in a subprocess

LABELS = ["astronaut", "cat", "coffee", "rocket", "galaxy"]
SMALL_LGCA = dict(method="lgca", crops=4, regions=1, steps=2)


def _labels(directory: Path) -> Path:
    return labels_file(directory, LABELS)


def _job(inputs, output, labels, **overrides) -> JobConfig:
    return JobConfig(
        inputs=tuple(str(i) for i in inputs),
        output=str(output),
        vocabulary=VocabularyConfig(labels=str(labels)),
        model=ModelConfig(name=TINY_MODEL, pretrained="random"),
        scoring=ScoringConfig(**SMALL_LGCA),
        execution=ExecutionConfig(batch_size=4, decode_batch_size=4, rows_per_file=overrides.pop("rows_per_file", 1000)),
        **overrides,
    )


def _read(output: str, storage_options=None) -> pa.Table:
    import fsspec

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    files = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables).sort_by("key")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return directory, build_corpus(directory)


@pytest.fixture(scope="module")
def corpus_output(corpus, tmp_path_factory, ray_local):
    directory, _ = corpus
    work = tmp_path_factory.mktemp("job")
    summary = run(_job([directory], work / "out", _labels(work)))
    return work / "out", summary


def test_every_input_gets_exactly_one_row_with_the_right_status(corpus, corpus_output):
    _, expected = corpus
    output, summary = corpus_output
    table = _read(str(output))
    rows = {row["key"]: row for row in table.to_pylist()}
    images = {key: e for key, e in expected.items() if e.status != "skipped"}
    assert sorted(rows) == sorted(images)
    assert table.num_rows == len(images) == summary.inputs
    for key, want in images.items():
        row = rows[key]
        assert row["status"] == want.status, (key, row["error_message"])
        if want.status == "ok":
            assert (row["width"], row["height"]) == (want.width, want.height), key
            assert row["label"] in LABELS and 0 < row["score"] <= 1 and row["error_message"] is None
            assert len(row["topk_labels"]) == 5 and row["topk_scores"][0] == pytest.approx(row["score"])
            assert sum(b["level"] > 0 for b in row["boxes"]) == 2  # K * T
            assert row["method"] == "lgca" and row["pretrained"] == "random(seed=0)"
        else:
            assert row["error_message"], key
            assert all(row[c] is None for c in ("label", "score", "topk_labels", "topk_scores", "margin", "boxes"))
    skipped = {key for key, e in expected.items() if e.status == "skipped"}
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["non_image_files_skipped"] == len(skipped)
    assert {Path(p).name for p in manifest["counts"]["non_image_examples"]} == {Path(k).name for k in skipped}


def test_exif_rotated_image_reports_upright_size(corpus_output):
    rows = {row["key"]: row for row in _read(str(corpus_output[0])).to_pylist()}
    assert (rows["rotated_exif.jpg"]["width"], rows["rotated_exif.jpg"]["height"]) == (300, 400)


def test_output_contract_files(corpus_output):
    output, summary = corpus_output
    assert (output / "_SUCCESS").exists()
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == summary.inputs
    assert manifest["counts"]["ok"] + manifest["counts"]["decode_error"] == summary.inputs
    assert manifest["model"]["source"] == "random" and manifest["vocabulary"]["classes"] == LABELS
    assert manifest["scoring"]["crops"] == 4 and manifest["method"] == "lgca"
    for key in ("run_id", "code_version", "started_at", "ended_at", "inputs", "decode", "execution"):
        assert manifest[key]
    schema = pq.read_schema(next(output.glob("part-*.parquet")))
    assert tuple(schema.names[: len(OUTPUT_COLUMNS)]) == OUTPUT_COLUMNS


def test_output_reads_in_pandas_duckdb_and_polars(corpus_output):
    import duckdb
    import pandas as pd
    import polars as pl

    output, summary = corpus_output
    frame = pd.read_parquet(output)
    assert len(frame) == summary.inputs and set(frame.status) == {"ok", "decode_error"}
    assert str(frame["width"].dtype) == str(frame["height"].dtype) == "Int32"  # nullable integers, not float64
    assert frame["width"].isna().sum() == (frame.status == "decode_error").sum()
    counts = duckdb.sql(f"select status, count(*) from read_parquet('{output}/*.parquet') group by status").fetchall()
    assert sum(n for _, n in counts) == summary.inputs
    boxes = duckdb.sql(f"select max(len(boxes)) from read_parquet('{output}/*.parquet')").fetchall()[0][0]
    assert boxes >= 2
    polars_frame = pl.read_parquet(f"{output}/*.parquet")
    assert polars_frame.height == summary.inputs
    assert polars_frame.filter(pl.col("status") == "ok")["boxes"].list.len().min() >= 2


def test_same_seed_gives_identical_content(tmp_path, ray_local):
    images = tmp_path / "images"
    _photos(images, 6)
    labels = _labels(tmp_path)
    run(_job([images], tmp_path / "a", labels))
    run(_job([images], tmp_path / "b", labels))
    assert _read(str(tmp_path / "a")).equals(_read(str(tmp_path / "b")))


def test_rerun_without_resume_refuses_and_resume_writes_nothing(tmp_path, ray_local):
    from pipeline.config import ConfigError

    images = tmp_path / "images"
    _photos(images, 3)
    labels = _labels(tmp_path)
    first = run(_job([images], tmp_path / "out", labels))
    assert first.rows_written == 3
    with pytest.raises(ConfigError, match="--resume"):
        run(_job([images], tmp_path / "out", labels))
    again = run(_job([images], tmp_path / "out", labels, resume=True))
    assert again.rows_written == 0 and again.already_done == 3
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1
    fresh = run(_job([images], tmp_path / "out", labels, overwrite=True))
    assert fresh.rows_written == 3 and len(list((tmp_path / "out").glob("part-*.parquet"))) == 1


def test_manifest_input_carries_columns_through(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images, 4)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table(
            {"path": [f"images/{n}" for n in names] + ["images/missing.jpg"], "shard": [1, 2, 3, 4, 5], "source": ["a", "b", "c", "d", "e"]}
        ),
        manifest,
    )
    run(_job([manifest], tmp_path / "out", _labels(tmp_path)))
    table = _read(str(tmp_path / "out"))
    assert table.schema.field("shard").type == pa.int64()
    rows = {row["source"]: row for row in table.to_pylist()}
    assert rows["e"]["status"] == "read_error" and "missing.jpg" in rows["e"]["error_message"]
    assert all(rows[s]["status"] == "ok" for s in "abcd")
    assert [rows[s]["shard"] for s in "abcde"] == [1, 2, 3, 4, 5]


def test_s3_input_and_output_match_local(corpus, corpus_output, s3_server, s3_bucket, ray_local):
    directory, _ = corpus
    s3_server.upload_tree(directory, f"{s3_bucket}/images")
    labels = f"{s3_bucket}/labels.txt"
    s3_server.client().put_object(Bucket=s3_bucket[5:], Key="labels.txt", Body="\n".join(LABELS).encode())
    output = f"{s3_bucket}/out"
    summary = run(_job([f"{s3_bucket}/images"], output, labels), s3_server.storage_options)
    local = _read(str(corpus_output[0]))
    remote = _read(output, s3_server.storage_options)
    assert summary.inputs == local.num_rows
    # equal rows; scores to float32 noise (shards of other ids batch the images differently)
    _assert_same_rows(remote.drop_columns(["path"]), local.drop_columns(["path"]))
    assert all(p.startswith(f"{s3_bucket}/images/") for p in remote.column("path").to_pylist())
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    assert fs.exists(f"{output}/_SUCCESS")
    assert "testing" not in fs.cat_file(f"{output}/_manifest.json").decode()


@pytest.mark.slow
def test_killed_driver_then_resume_gives_every_input_exactly_once(tmp_path):
    images = tmp_path / "images"
    names = _photos(images, 40)
    labels = _labels(tmp_path)
    output = tmp_path / "out"
    with RayHead() as head:
        options = ["--method", "clip", "--batch-size", "2", "--decode-batch-size", "2", "--rows-per-file", "4", "--address", head.address]
        # a real architecture, so that scoring takes long enough to be interrupted midway
        command = lgca_run(images, labels, output, *options, model="ViT-B-32")
        driver = subprocess.Popen(command, env=head.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and len(list(output.glob("part-*.parquet"))) < 2 and driver.poll() is None:
            time.sleep(0.1)
        assert driver.poll() is None, "the job finished before it could be killed; give it more work"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        committed = len(_read(str(output)))
        assert 0 < committed < len(names) and not (output / "_SUCCESS").exists()

        resumed = subprocess.run(command + ["--resume"], env=head.env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "constructor arguments in the object store" not in resumed.stderr  # Ray's ray#53727 notice stays in its logs
        table = _read(str(output))
        keys = table.column("key").to_pylist()
        assert sorted(keys) == sorted(names) and len(set(keys)) == len(keys)
        assert (output / "_SUCCESS").exists()
        files = sorted(p.name for p in output.glob("part-*.parquet"))

        again = subprocess.run(command + ["--resume"], env=head.env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert sorted(p.name for p in output.glob("part-*.parquet")) == files
        assert f"({len(names)} already done), 0 rows written" in again.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--labels", "missing.txt"], "labels file missing.txt does not exist"),
        (["--labels", "{labels}", "--model", "ViT-B-33"], "unknown open_clip architecture"),
        (["--labels", "{labels}", "--pretrained", "not-a-tag"], "valid tags"),
        (["--labels", "{labels}", "--crops", "-1"], "crops must be >= 0"),
        (["--labels", "{empty}"], "has no classes"),
        (["--labels", "{labels}", "--decode", "gpu", "--device", "cpu"], "--decode gpu decodes on the scoring GPU"),
    ],
)
def test_configuration_errors_exit_2_in_seconds(tmp_path, args, message):
    images = tmp_path / "images"
    _photos(images, 1)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    args = [a.format(labels=_labels(tmp_path), empty=tmp_path / "empty.txt") for a in args]
    started = time.time()
    result = subprocess.run(
        [LGCA, "run", str(images), "--output", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert time.time() - started < 30
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_missing_input_and_output_inside_input_fail_fast(tmp_path):
    labels = _labels(tmp_path)
    images = tmp_path / "images"
    _photos(images, 1)
    for inputs, output, message in [
        ([tmp_path / "nowhere"], tmp_path / "out", "does not exist"),
        ([images], images / "out", "inside input"),
    ]:
        result = subprocess.run(lgca_run(inputs, labels, output), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def _assert_same_rows(a: pa.Table, b: pa.Table, atol: float = 1e-5) -> None:
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name in ("score", "margin", "topk_scores", "boxes"):
            assert json.dumps(_rounded(left, atol)) == json.dumps(_rounded(right, atol)), name
        else:
            assert left == right, name


def _rounded(value, atol: float):
    if isinstance(value, float):
        return round(value / (10 * atol))
    if isinstance(value, list):
        return [_rounded(v, atol) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, atol) for k, v in value.items()}
    return value


def _photos(directory: Path, count: int) -> list[str]:
    """`count` small distinct JPEGs; returns their names."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    names = []
    for index in range(count):
        pixels = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((80, 60), Image.BILINEAR).save(directory / f"img{index:04d}.jpg", quality=90)
        names.append(f"img{index:04d}.jpg")
    return names
