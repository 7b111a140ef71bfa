"""Hostile and unlucky inputs: special files, oversized files, poison inputs, bodies cut short, failed rows retried.

docs/RELIABILITY.md ("Attacks") lists each attack, what it did before and the test here that pins the answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.cli.args import storage_options as cli_storage_options
from pipeline.config import ConfigError, DecodeConfig
from pipeline.run.job import run
from pipeline.run.resources import NodeShape, check_resources
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR
from pipeline.stages.journal import JOURNAL_DIR_ENV, DecodeJournal
from pipeline.stages.read_decode import ReadDecodeStage
from pipeline.stages.storage import (
    STORAGE_OPTIONS_ENV,
    RefusedInput,
    check_scheme,
    gather_storage_options,
    read_all,
    read_bytes,
    schemes_of,
)

from .analytic import COLOURS, encode_colour_text
from .fault_proxy import FaultProxy, Rule
from .support import run_args
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
    client.put_object(Bucket=bucket, Key="empty.jpg", Body=b"")  # S3 answers a range on an empty object with 416
    assert read_bytes(f"{s3_bucket}/empty.jpg", s3_server.storage_options, max_bytes=1000) == b""


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
        out = ReadDecodeStage(DecodeConfig(), options)(batch)
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


@pytest.mark.integration
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
    with pytest.raises(ConfigError, match="add --resume"):
        _job(["x"], "y", "z", retry_failed=True)


# ---------------------------------------------------------------- resources no node can offer


def _shapes(*nodes: tuple[float, float], autoscaled: tuple[float, float, int] | None = None) -> list[NodeShape]:
    shapes = [NodeShape(cpus, gpus, 16 * 2**30) for cpus, gpus in nodes]
    if autoscaled:
        shapes.append(NodeShape(autoscaled[0], autoscaled[1], 64 * 2**30, count=autoscaled[2], live=False))
    return shapes


def _check(shapes: list[NodeShape], **asked: object) -> None:
    settings = {"gpus_per_actor": None, "cpus_per_actor": 1.0, "actors": None, "device": "auto", "decode_device": "cpu"}
    check_resources(shapes, decode_memory=2**30, **{**settings, **asked})


def test_resources_no_node_can_offer_are_refused_naming_the_flag():
    cpu_only = _shapes((2, 0))
    with pytest.raises(ConfigError, match="asks for 1 GPU and 1 CPU .* use --num-gpus 0 to score on CPUs"):
        _check(cpu_only, gpus_per_actor=1.0)
    with pytest.raises(ConfigError, match="asks for 0 GPU and 4 CPU .* the nodes offer 2 CPU, 0 GPU, 16 GiB"):
        _check(cpu_only, cpus_per_actor=4.0)
    with pytest.raises(ConfigError, match="--device cuda needs a GPU"):
        _check(cpu_only, device="cuda")
    with pytest.raises(ConfigError, match="--decode gpu decodes on the scoring GPU"):
        _check(cpu_only, decode_device="gpu")
    with pytest.raises(ConfigError, match="--concurrency 3 .* at most 2"):
        _check(_shapes((8, 1), (8, 1)), gpus_per_actor=1.0, actors=3)
    with pytest.raises(ConfigError, match="can run a decode task"):
        _check([NodeShape(1, 1, 2**28), NodeShape(4, 0, 2**28)], gpus_per_actor=1.0)


def test_resources_that_fit_or_that_the_autoscaler_can_add_pass():
    _check(_shapes((2, 0)))  # the defaults on a laptop
    _check(_shapes((16, 4)), gpus_per_actor=0.5, actors=8)  # fractional GPUs: 8 actors on 4 GPUs
    head = _shapes((0, 0), autoscaled=(4, 1, 16))  # a CPU-free head; GPU workers come on demand
    _check(head, gpus_per_actor=1.0, actors=16, device="cuda", decode_device="gpu")
    _check(_shapes((0, 0), autoscaled=(4, 1, -1)), gpus_per_actor=1.0, actors=1000)  # no upper bound
    with pytest.raises(ConfigError, match="up to 16 more of 4 CPU, 1 GPU, 64 GiB from the autoscaler"):
        _check(head, gpus_per_actor=2.0)


@pytest.mark.integration
def test_unsatisfiable_resources_fail_in_seconds_on_a_real_cluster(tmp_path):
    asked = ("--num-gpus", "1")  # a GPU on a CPU-only cluster; the other requests are covered above
    ray_tmp = tempfile.mkdtemp(prefix="lg", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    result = subprocess.run(_run_args(tmp_path, *asked), env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no node of this cluster can hold a scoring actor" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 90, elapsed  # a local Ray's start-up on 2 loaded cores; it used to wait forever
    assert not any((tmp_path / "out").glob("part-*"))
    _report("unsatisfiable resources", asked=" ".join(asked), seconds=round(elapsed, 1))


# ---------------------------------------------------------------- URLs a manifest may name


class _CountingServer:
    """An HTTP server on loopback that counts the requests it gets and answers each with a small JPEG."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def test_http_rows_are_refused_without_a_request_and_url_passwords_never_reach_the_output(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images, 2)
    server = _CountingServer((images / names[0]).read_bytes())
    password = "hunter2-canary"
    try:
        manifest = tmp_path / "manifest.csv"
        manifest.write_text(
            "path\n"
            + "".join(f"images/{name}\n" for name in names)
            + f"{server.url}/fetch-me.jpg\n"
            + f"http://bob:{password}@127.0.0.1:1/secret.jpg\n"
            + f"http://:{password}@127.0.0.1:1/token-only.jpg\n"
            + f"http://{password}@127.0.0.1:1/token-as-user.jpg\n"
            + f"https://b.s3.amazonaws.com/signed.jpg?X-Amz-Credential=AKIA{password}&X-Amz-Signature={password}&v=1\n"
        )
        run(_job([manifest], tmp_path / "out", _labels(tmp_path)))
    finally:
        server.close()
    assert server.requests == 0
    table = _read(str(tmp_path / "out"))
    rows = {row["path"]: row for row in table.select(["path", "status", "error_message"]).to_pylist()}
    refused = rows[f"{server.url}/fetch-me.jpg"]
    assert refused["status"] == READ_ERROR and "add --allow-scheme http" in refused["error_message"]
    for masked_path in (
        "http://***@127.0.0.1:1/secret.jpg",
        "http://***@127.0.0.1:1/token-only.jpg",
        "http://***@127.0.0.1:1/token-as-user.jpg",
        "https://b.s3.amazonaws.com/signed.jpg?X-Amz-Credential=***&X-Amz-Signature=***&v=1",
    ):
        masked = rows[masked_path]
        assert masked["status"] == READ_ERROR and "the URL carries credentials" in masked["error_message"]
    assert sum(row["status"] == OK for row in rows.values()) == len(names)
    from pipeline.cli.main import main

    report = tmp_path / "out" / "report.html"  # the HTML report and its row files, written beside the results
    assert main(["report", str(tmp_path / "out"), "--out", str(report)]) == 0 and report.is_file()
    for path in (tmp_path / "out").rglob("*"):  # Parquet, plan, keys, manifest, report: the secret is nowhere
        assert not path.is_file() or password.encode() not in path.read_bytes(), path


def test_the_listing_tasks_list_odd_names_literally_and_each_real_folder_once(tmp_path, ray_local):
    """Through the job's own listing tasks: a name holding `::` is its own file (its own pixels), a name that
    is not UTF-8 is a counted skip with an example, not a failed job, and a DAG of folder links gives one row
    per file."""
    from PIL import Image

    images = tmp_path / "images"
    _photos(images, 2)
    Image.new("RGB", (40, 30), "red").save(images / "red.jpg")
    Image.new("RGB", (64, 48), "blue").save(images / "red.jpg::blue.jpg")
    (images / os.fsdecode(b"caf\xe9.jpg")).write_bytes((images / "red.jpg").read_bytes())
    dag = [images / f"level{i}" for i in range(10)]
    for folder in dag:
        folder.mkdir()
    Image.new("RGB", (32, 32), "green").save(dag[-1] / "deep.jpg")
    for here, there in zip([images, *dag[:-1]], dag):
        os.symlink(there, here / "a")
        os.symlink(there, here / "b")
    summary = run(_job([images], tmp_path / "out", _labels(tmp_path)))
    table = _read(str(tmp_path / "out"))
    rows = {row["key"]: row for row in table.select(["key", "status", "width", "height"]).to_pylist()}
    assert sorted(rows) == ["img0000.jpg", "img0001.jpg", "level9/deep.jpg", "red.jpg", "red.jpg::blue.jpg"]
    assert (rows["red.jpg::blue.jpg"]["width"], rows["red.jpg"]["width"]) == (64, 40)  # each its own pixels
    assert all(row["status"] == OK for row in rows.values())
    assert summary.skipped_files == 1
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert "caf\\xe9.jpg (name is not UTF-8" in manifest["counts"]["non_image_examples"][0]


@pytest.mark.slow
def test_a_large_csv_whose_quoted_line_breaks_cross_a_range_edge_plans_every_record_once(tmp_path, ray_local, capsys, caplog):
    """Over 64 MiB, a CSV manifest is listed in byte ranges by parallel tasks. Every note here is a quoted field
    holding a line break, whose second line names a real image: an edge falls inside one, and the plan once had
    1,001 images for 1,000 records. The listing tasks now find the split record and list the file whole."""
    from pipeline.cli.main import main
    from pipeline.stages.manifests import CSV_UNIT_BYTES

    images = tmp_path / "images"
    names = _photos(images, 2)
    records = 1000
    filler = "x" * (CSV_UNIT_BYTES // records + 512)
    with open(tmp_path / "manifest.csv", "w") as out:
        out.write("path,key,note\n")
        for index in range(records):
            out.write(f'images/{names[index % 2]},k{index:04d},"{filler}\nimages/{names[0]},phantom{index},{filler[:99]}"\n')
    assert (tmp_path / "manifest.csv").stat().st_size > CSV_UNIT_BYTES
    code = main(run_args(tmp_path / "manifest.csv", _labels(tmp_path), tmp_path / "out", command="plan"))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert f"{records} images" in captured.out
    assert "listing it whole" in caplog.text
    plan = json.loads((tmp_path / "out" / "_plan" / "plan.json").read_text())
    assert sum(rows for _, rows in plan["shards"]) == records
    assert len(list((tmp_path / "out" / "_plan" / "shards").iterdir())) == len(plan["shards"])  # the ranges' shards are gone


def test_scheme_check_allows_what_the_user_enables():
    assert schemes_of("/data/a.jpg") == schemes_of("file:///data/a.jpg") == ["file"]
    assert schemes_of("s3a://b/k") == ["s3"] and schemes_of("simplecache::s3://b/k") == ["simplecache", "s3"]
    check_scheme("https://example.com/a.jpg", ("file", "s3", "https"))
    with pytest.raises(RefusedInput, match="add --allow-scheme simplecache"):
        check_scheme("simplecache::s3://b/k", ("file", "s3"))
    with pytest.raises(RefusedInput, match=r"uses the URL scheme gs://, .* add --allow-scheme gs"):
        check_scheme("gs://bucket/a.jpg", ("file", "s3"))


def test_storage_options_come_from_a_file_the_environment_and_flags_in_that_order(tmp_path):
    from pipeline.cli.main import build_parser

    options_file = tmp_path / "storage.yaml"
    options_file.write_text("key: from-file\nsecret: file-secret\nclient_kwargs: {region_name: eu-west-1}\n")
    environ = {STORAGE_OPTIONS_ENV: '{"secret": "env-secret", "client_kwargs": {"verify": false}}'}
    options = gather_storage_options(["endpoint_url=http://127.0.0.1:9000"], str(options_file), environ)
    assert options == {
        "key": "from-file",
        "secret": "env-secret",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False},
        "endpoint_url": "http://127.0.0.1:9000",
    }
    parsed = build_parser().parse_args(["summary", "out/", "--storage-options-file", str(options_file)])
    assert cli_storage_options(parsed)["secret"] in ("file-secret", os.environ.get(STORAGE_OPTIONS_ENV, ""))
    (tmp_path / "list.yaml").write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        gather_storage_options([], str(tmp_path / "list.yaml"), {})
    with pytest.raises(ConfigError, match="is not a JSON object"):
        gather_storage_options([], None, {STORAGE_OPTIONS_ENV: "key=x"})


# ---------------------------------------------------------------- large vocabularies


@pytest.mark.parametrize("method, weights", [("clip", "softmax"), ("ensemble", "softmax"), ("descriptors", "mean"), ("lgca", "softmax")])
def test_class_vectors_in_groups_match_one_group_and_report_every_sentence(method, weights, monkeypatch):
    from pipeline.scoring import text

    descriptions = {"red": ("a red thing", "crimson"), "blue": ("the sky",)}
    templates = ("a {} object", "a photo of {}", "{}")

    def vectors() -> tuple[torch.Tensor, int]:
        counted: list[int] = []
        result = text.class_vectors(
            method, COLOURS, encode_colour_text, descriptions, templates, "a {}", 1.0, weights, progress=counted.append
        )
        return result, sum(counted)

    whole, whole_count = vectors()
    monkeypatch.setattr(text, "GROUP_SENTENCES", 2)  # every class in a group of its own
    grouped, grouped_count = vectors()
    torch.testing.assert_close(grouped, whole)
    expected = text.sentence_count(method, COLOURS, descriptions, templates, weights)
    assert whole_count == grouped_count == expected > len(COLOURS) - 1


def test_a_large_vocabulary_is_embedded_once_with_progress_and_stored_beside_the_plan(tmp_path, ray_local, caplog, monkeypatch):
    import logging

    from pipeline.run import embedding

    images = tmp_path / "images"
    _photos(images, 3)
    cache = tmp_path / "node-cache"
    small = _job([images], tmp_path / "per-actor", _labels(tmp_path))
    small = replace(small, model=replace(small.model, cache_dir=str(cache / "a")))
    run(small)  # below the threshold: each actor embeds (and caches on its node)
    assert list((cache / "a" / "text").glob("*.safetensors"))
    monkeypatch.setattr(embedding, "LARGE_VOCABULARY_SENTENCES", 10)
    monkeypatch.setattr(embedding, "PROGRESS_EVERY_S", 0.05)
    large = replace(small, output=str(tmp_path / "once"), model=replace(small.model, cache_dir=str(cache / "b")))
    with caplog.at_level(logging.INFO, logger="pipeline.run.embedding"):
        run(large)
    messages = [record.getMessage() for record in caplog.records if record.name == "pipeline.run.embedding"]
    assert any(m.startswith("embedding ") and " sentences for 5 classes once" in m for m in messages), messages
    assert any(m.startswith("vocabulary embedded in") for m in messages), messages
    stored = list((tmp_path / "once" / "_plan" / "text-vectors").glob("*.safetensors"))
    assert len(stored) == 1
    assert not (cache / "b" / "text").exists()  # the actors loaded the stored vectors instead of embedding
    per_actor, once = _read(small.output), _read(large.output)
    assert per_actor.column("label").to_pylist() == once.column("label").to_pylist()
    assert per_actor.column("score").to_pylist() == pytest.approx(once.column("score").to_pylist(), abs=1e-5)


# ---------------------------------------------------------------- exit statuses


def test_a_run_that_started_labelling_and_cannot_finish_exits_1_not_2(tmp_path, ray_local, capsys):
    import threading

    from pipeline.cli.main import main

    images = tmp_path / "images"
    _photos(images, 6)
    output = tmp_path / "out"
    deleted: list[Path] = []
    stop = threading.Event()

    def delete_the_first_part_file() -> None:  # an operator's cleanup script, racing the job
        while not stop.is_set() and not deleted:
            for part in output.glob("part-*.parquet"):
                part.unlink()
                deleted.append(part)
                break
            time.sleep(0.01)

    watcher = threading.Thread(target=delete_the_first_part_file, daemon=True)
    watcher.start()
    try:
        status = main(run_args(images, _labels(tmp_path), output, "--rows-per-file", "1", "--crops", "4", "--regions", "1", "--steps", "2"))
    finally:
        stop.set()
        watcher.join()
    assert deleted
    assert status == 1
    message = capsys.readouterr().err
    assert "1 of 6 shards have no committed file" in message and "--resume" in message
    assert not (output / "_SUCCESS").exists()
    assert run(_job([images], output, _labels(tmp_path), rows_per_file=1, resume=True)).rows_written == 1
