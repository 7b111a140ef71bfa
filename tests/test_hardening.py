"""Hostile and unlucky inputs: special files, oversized files, poison inputs, bodies cut short, failed rows retried.

docs/RELIABILITY.md ("Attacks") lists each attack, what it did before and the test here that pins the answer.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import DecodeConfig
from pipeline.run.job import run
from pipeline.run.labelling import _read_and_decode
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR
from pipeline.stages.journal import JOURNAL_DIR_ENV, DecodeJournal
from pipeline.stages.sources import RefusedInput, read_all, read_bytes

from .fault_proxy import FaultProxy, Rule
from .test_job import _job, _labels, _photos, _read
from .test_reliability import _report, _run_args

# Hostile rows must arrive within this bound: the job itself (tiny model, 2 cores) takes 20-40 s.
HOSTILE_BOUND_S = 120


def _statuses(output: Path | str) -> dict[str, tuple[str, str | None]]:
    table = _read(str(output))
    return {k: (s, m) for k, s, m in zip(*(table.column(c).to_pylist() for c in ("key", "status", "error_message")))}


def test_fifo_dev_zero_and_oversized_files_become_read_errors_within_a_bound(tmp_path, ray_local):
    images = tmp_path / "images"
    good = _photos(images, 3)
    os.mkfifo(images / "pipe.jpg")  # no writer: an open that waits would hang forever
    (images / "zero.jpg").symlink_to("/dev/zero")  # endless bytes
    with open(images / "huge.jpg", "wb") as handle:  # 3 GiB, sparse: costs no disk, would cost 3 GiB of memory
        handle.truncate(3 * 2**30)
    started = time.time()
    summary = run(_job([images], tmp_path / "out", _labels(tmp_path)))
    elapsed = time.time() - started
    _report("hostile files", seconds=round(elapsed, 1), rows=summary.rows_written)
    assert elapsed < HOSTILE_BOUND_S
    statuses = _statuses(tmp_path / "out")
    assert {statuses[name][0] for name in good} == {OK}
    assert statuses["pipe.jpg"][0] == READ_ERROR and "a FIFO, not a regular file" in statuses["pipe.jpg"][1]
    assert statuses["zero.jpg"][0] == READ_ERROR and "a character device" in statuses["zero.jpg"][1]
    assert statuses["huge.jpg"][0] == READ_ERROR and "3221225472 bytes, above max_bytes=" in statuses["huge.jpg"][1]
    assert "--max-bytes" in statuses["huge.jpg"][1]


def test_byte_limit_holds_for_local_files_and_s3_objects_without_reading_the_rest(tmp_path, s3_server, s3_bucket):
    data = bytes(range(256)) * 400  # 102,400 bytes
    (tmp_path / "a.jpg").write_bytes(data)
    client, bucket = s3_server.client(), s3_bucket.removeprefix("s3://")
    client.put_object(Bucket=bucket, Key="a.jpg", Body=data)
    for path, options in ((str(tmp_path / "a.jpg"), {}), (f"{s3_bucket}/a.jpg", s3_server.storage_options)):
        assert read_bytes(path, options, max_bytes=len(data)) == data
        with pytest.raises(RefusedInput, match="above max_bytes=1000"):
            read_bytes(path, options, max_bytes=1000)


def test_a_read_that_never_finishes_is_given_up_after_the_timeout():
    def read(path: str) -> bytes:
        if path == "stuck":
            time.sleep(60)  # a stale network mount: an uninterruptible wait, here a sleep
        return path.encode()

    started = time.time()
    results = read_all(["a", "stuck", "b", "c", "d"], read, threads=2, timeout_s=1.0)
    assert time.time() - started < 5
    assert results[0] == b"a" and results[2:] == [b"b", b"c", b"d"]  # the stuck thread's slot was replaced
    assert isinstance(results[1], TimeoutError) and "--read-timeout" in str(results[1])


def test_a_body_cut_short_by_the_store_is_retried(tmp_path, s3_server, s3_bucket):
    client, bucket = s3_server.client(), s3_bucket.removeprefix("s3://")
    objects = {f"cut/{i}.jpg": os.urandom(20_000 + i) for i in range(6)}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    rule = Rule(every=2, faults=("truncate",), methods=frozenset({"GET"}))
    with FaultProxy(s3_server.endpoint_url, [rule]) as proxy:
        options = {**s3_server.storage_options, "endpoint_url": proxy.url}
        batch = pa.table({"key": list(objects), "path": [f"{s3_bucket}/{key}" for key in objects]})
        out = _read_and_decode(batch, decode=DecodeConfig(), storage_options=options)
        # not images: every row reaches decoding (decode_error), none stops at reading with a cut body
        assert set(out.column("status").to_pylist()) == {DECODE_ERROR}, out.column("error_message").to_pylist()
        assert proxy.injected.get("truncate", 0) >= 3
        for key, body in objects.items():  # and the bytes that arrive are whole
            assert read_bytes(f"{s3_bucket}/{key}", options) == body
    _report("cut bodies", truncated=proxy.injected.get("truncate", 0))


def test_journal_names_the_input_in_flight_when_its_worker_died(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_DIR_ENV, str(tmp_path))
    keys = ["a", "b", "c"]

    def die_decoding(index: int) -> None:  # what a killed attempt leaves: its journal, not deleted
        journal = DecodeJournal.open("run", keys)
        journal.reading_all()
        journal.decoding(0)
        journal.decoding(index)
        journal._file.close()

    die_decoding(1)
    assert DecodeJournal.open("run", keys).kills(1) == 1  # opening is an attempt too: it starts a record
    journal = DecodeJournal.open("run", keys)
    assert journal.deaths == 2 and journal.kills(1) == 1 and not journal.poisoned(1)  # the second attempt died at "start"
    journal.decoding(1)
    journal._file.close()
    journal = DecodeJournal.open("run", keys)
    assert journal.poisoned(1) and not journal.poisoned(0) and not journal.poisoned(2)
    with journal:
        pass
    assert not list(tmp_path.iterdir())  # a finished batch leaves nothing behind
    assert DecodeJournal.open("another run", keys).deaths == 0


def test_a_death_during_parallel_reads_makes_the_next_attempt_read_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_DIR_ENV, str(tmp_path))
    journal = DecodeJournal.open("run", ["a", "b"])
    journal.reading_all()
    journal._file.close()
    assert DecodeJournal.open("run", ["a", "b"]).read_one_at_a_time


def test_an_input_that_kills_its_decode_worker_twice_becomes_a_failed_row(tmp_path):
    images = tmp_path / "images"
    good = _photos(images, 4)
    (images / "poison.jpg").write_bytes((images / good[0]).read_bytes())
    journal_dir = tempfile.mkdtemp(prefix="journal-", dir=tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="lg", dir="/tmp")  # short: Ray's socket paths must stay under ~107 bytes
    env = {
        **os.environ,
        "LGCA_FAULT_POINT": "decoding",
        "LGCA_FAULT_MATCH": "poison",  # every decode of this file SIGKILLs its worker, as a crashing decoder would
        JOURNAL_DIR_ENV: journal_dir,
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    result = subprocess.run(_run_args(tmp_path, inputs=[str(images)]), env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = _statuses(tmp_path / "out")
    assert {statuses[name][0] for name in good} == {OK}
    status, message = statuses["poison.jpg"]
    assert status == DECODE_ERROR and "killed its worker process 2 times" in message
    assert not list(Path(journal_dir).iterdir())
    _report("poison input", seconds=round(elapsed, 1))


def test_retry_failed_labels_failed_rows_again_and_keeps_the_others(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images, 6)
    late = images / names[2]
    content = late.read_bytes()
    late.write_bytes(b"not yet")  # a decode_error now, a good image by the retry
    config = _job([images], tmp_path / "out", _labels(tmp_path), rows_per_file=4)
    run(config)
    first = _read(str(tmp_path / "out"))
    assert first.column("status").to_pylist().count(DECODE_ERROR) == 1
    late.write_bytes(content)
    resumed = run(replace(config, resume=True))
    assert resumed.rows_written == 0  # --resume alone keeps failed rows
    summary = run(replace(config, resume=True, retry_failed=True))
    second = _read(str(tmp_path / "out"))
    assert second.column("key").to_pylist() == first.column("key").to_pylist()  # every input once
    assert set(second.column("status").to_pylist()) == {OK}
    assert summary.counts[OK] == len(names)
    unchanged = [i for i, key in enumerate(first.column("key").to_pylist()) if key != names[2]]
    for column in ("label", "score", "boxes"):
        assert [first.column(column)[i].as_py() for i in unchanged] == [second.column(column)[i].as_py() for i in unchanged]


def test_retry_failed_needs_resume():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="add --resume"):
        _job(["x"], "y", "z", retry_failed=True)
