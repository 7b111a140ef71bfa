"""Faults injected for real: killed actors and drivers, a flaky object store, mutated bytes, bad configuration, hostile inputs.

docs/RELIABILITY.md lists the guarantee each test backs. Every test that injects faults prints one
`reliability:` line with its figures (run with -s to see them).
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import DecodeConfig, ExecutionConfig, ScoringConfig
from pipeline.faults import FAULT_ENV, FAULT_POINTS
from pipeline.run.job import run
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR, STATUSES
from pipeline.stages.read_decode import ReadDecodeStage

from .fault_proxy import FaultProxy, Rule
from .ray_head import RayHead
from .support import TINY_MODEL, lgca_run
from .test_job import _job, _labels, _photos, _read

LABEL_IMAGES = str(Path(__file__).resolve().parents[1] / "jobs" / "label_images.py")
TAG = "LGCA_RELIABILITY_TAG"  # set in the environment of every process a test starts, to find leftovers
# configuration errors must be reported within this many seconds, before any cluster work: the guard is against
# hangs; a cold `lgca` process (torch and Ray imports, the address probe) took 20.6 to 24.4 s on a loaded 2-core CI machine
FAST_FAIL_S = 40
S3_READ_REQUESTS = 4 * 3  # read_bytes attempts x botocore attempts (pipeline.stages.storage.S3_READ_CONFIG)


def _report(test: str, **figures: object) -> None:
    print(f"reliability: {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG) == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _wait_until(condition, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def _scoring_actors(roots: list[psutil.Process]) -> list[psutil.Process]:
    """Scoring actor processes below `roots` only: other Ray instances on this machine are not ours to kill."""
    found = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                if "ScoreStage" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                    found[process.pid] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _assert_exactly_once(output: str, keys: list[str], storage_options=None) -> pa.Table:
    table = _read(output, storage_options)
    got = table.column("key").to_pylist()
    assert sorted(got) == sorted(keys), f"{len(got)} rows for {len(keys)} inputs"
    assert len(set(got)) == len(got)
    return table


# ---------------------------------------------------------------- 1. actor death


@pytest.mark.slow
@pytest.mark.integration
def test_scoring_actor_killed_mid_job_every_input_exactly_once(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images, 24)
    output = tmp_path / "out"
    config = replace(
        _job([images], output, _labels(tmp_path)),
        # enough work per image that the job is still scoring when the actor dies
        scoring=ScoringConfig(method="lgca", crops=24, regions=2, steps=2),
        execution=ExecutionConfig(batch_size=2, decode_batch_size=2, rows_per_file=2),
    )
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            outcome["summary"] = run(config)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    me = [psutil.Process()]  # ray_local's raylet, and so every worker and actor, descend from this process
    assert _wait_until(lambda: list(output.glob("part-*.parquet")) and _scoring_actors(me), 120), outcome
    victims = {p.pid for p in _scoring_actors(me)}  # one actor in the pool
    committed = len(_read(str(output)))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert committed < len(names) and not (output / "_SUCCESS").exists(), "the job ended before the kill"
    restarted = _wait_until(lambda: any(p.pid not in victims for p in _scoring_actors(me)) or not thread.is_alive(), 120)
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert restarted
    table = _assert_exactly_once(str(output), names)
    assert set(table.column("status").to_pylist()) == {OK}
    assert outcome["summary"].rows_written == len(names) and (output / "_SUCCESS").exists()
    _report("actor death", faults=len(victims), inputs=len(names), committed_before_kill=committed, rows=table.num_rows, lost=0)


# ---------------------------------------------------------------- 2. driver death and resume


@pytest.mark.slow
@pytest.mark.integration
def test_a_stalled_driver_taken_over_writes_nothing_and_the_new_owner_finishes(tmp_path):
    """Job A stalls (SIGSTOP) with every shard committed, just before writing its final state, for longer than
    the lease's expiry; job B takes the output over with --overwrite and another vocabulary and finishes. A is
    then continued: it must exit 1 and write nothing (no `_SUCCESS`, no manifest, no staging removed), and B's
    output stays complete and correct."""
    images = tmp_path / "images"
    names = _photos(images, 12)
    labels_a = _labels(tmp_path)
    labels_b = tmp_path / "labels-b.txt"
    labels_b.write_text("zebra\nkoala\nwalrus\n")
    output = tmp_path / "out"

    def command(labels: Path) -> list[str]:
        return lgca_run(images, labels, output, "--method", "clip", "--batch-size", "4", "--rows-per-file", "4")

    ttl = 8.0
    with RayHead() as head:
        env = {**head.env(), "LGCA_LEASE_TTL_S": str(ttl)}
        stalled = subprocess.Popen(
            [*command(labels_a), "--address", head.address],
            env={**env, FAULT_ENV: "finishing", "LGCA_FAULT_SIGNAL": "SIGSTOP"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            process = psutil.Process(stalled.pid)
            assert _wait_until(lambda: process.status() == psutil.STATUS_STOPPED, 180), "job A never reached its final step"
            assert len(list(output.glob("part-*.parquet"))) == 3 and not (output / "_SUCCESS").exists()
            time.sleep(ttl + 1)  # past the expiry of A's lease, measured on the store's clock
            taken = subprocess.run(
                [*command(labels_b), "--address", head.address, "--overwrite"], env=env, capture_output=True, text=True, timeout=300
            )
            assert taken.returncode == 0, taken.stderr[-3000:]
            finished = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file() and path.name != "_lease.lock"}
            assert "_SUCCESS" in finished
            os.kill(stalled.pid, signal.SIGCONT)
            _, stderr = stalled.communicate(timeout=180)
        finally:
            if stalled.poll() is None:
                os.kill(stalled.pid, signal.SIGCONT)
                stalled.kill()
    assert stalled.returncode == 1, stderr[-3000:]
    assert "lease" in stderr
    after = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file() and path.name != "_lease.lock"}
    assert after == finished  # A wrote nothing: B's files, byte for byte
    table = _assert_exactly_once(str(output), names)
    assert set(table.column("label").to_pylist()) <= {"zebra", "koala", "walrus"}
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["vocabulary"]["classes"] == ["zebra", "koala", "walrus"] and manifest["counts"]["rows"] == 12
    assert [a["status"] for a in manifest["attempts"]] == ["succeeded"]
    _report("stalled driver", ttl_s=ttl, a_exit=stalled.returncode)


@pytest.mark.slow
@pytest.mark.integration
def test_driver_killed_at_every_fault_point_then_resume_gives_every_input_once(tmp_path):
    """One output, the driver SIGKILLed at each point in turn, resumed after each: nothing lost, nothing twice."""
    images = tmp_path / "images"
    names = _photos(images, 16)
    labels = _labels(tmp_path)
    output = tmp_path / "out"
    command = lgca_run(images, labels, output, "--method", "clip", "--batch-size", "2", "--decode-batch-size", "2", "--rows-per-file", "4")
    # the driver's points; the workers' (committing, decoding) have tests of their own
    assert FAULT_POINTS == ("listed", "staged", "scoring", "finishing", "before_success", "committing", "decoding", "clearing")
    # staged before scoring: the pieces the second run staged must be dropped by the third
    order = ("listed", "staged", "scoring", "before_success")
    with RayHead() as head:
        for index, point in enumerate(order):
            tag = uuid.uuid4().hex
            env = {**head.env(), FAULT_ENV: point, TAG: tag}
            started = time.time()
            killed = subprocess.run(
                command + ["--address", head.address] + (["--resume"] if index else []),
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
            # the driver left nothing running: no process of its own, and Ray ended its job's actors
            assert _wait_until(lambda tag=tag: not _tagged_processes(tag), 10), point
            assert _wait_until(lambda: not _scoring_actors(head.processes()), 30), point
            parts = sorted(output.glob("part-*.parquet"))
            staged = list((output / "_staging").rglob("*.piece")) if (output / "_staging").exists() else []
            assert not (output / "_SUCCESS").exists(), point
            assert (output / "_plan" / "plan.json").exists(), point  # written once, reused by every resume
            assert not list(output.glob("**/*.parquet")) or set(output.glob("**/*.parquet")) == set(parts), point
            if point == "listed":
                assert not parts and not staged
            elif point == "staged":
                assert not parts and staged  # staged, never committed: not a result
            elif point == "scoring":
                # the first commit, and whatever commit tasks finished before the driver died: whole shards only
                assert parts and len(_read(str(output))) == 4 * len(parts)
            else:
                assert (output / "_manifest.json").exists()
                _assert_exactly_once(str(output), names)
            _report(
                "driver death", point=point, seconds=round(time.time() - started, 1), committed_files=len(parts), staged_files=len(staged)
            )

        resumed = subprocess.run(
            command + ["--address", head.address, "--resume"], env=head.env(), capture_output=True, text=True, timeout=180
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = _assert_exactly_once(str(output), names)
    assert set(table.column("status").to_pylist()) == {OK}
    assert (output / "_SUCCESS").exists() and not (output / "_staging").exists()
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(names) == manifest["counts"]["inputs"]
    # every attempt is on record, the dead ones too (the one killed before _SUCCESS had finished its manifest)
    assert [a["status"] for a in manifest["attempts"]] == ["died", "died", "died", "succeeded", "succeeded"]
    _report("driver death", faults=len(order), inputs=len(names), rows=table.num_rows, lost=0, attempts=len(manifest["attempts"]))


# ---------------------------------------------------------------- node death


@pytest.mark.slow
@pytest.mark.integration
def test_a_worker_node_lost_mid_job_then_replaced_every_input_exactly_once(tmp_path):
    """A two-node cluster loses the node doing the work (every process on it SIGKILLed); a new node joins, as
    an autoscaler would bring one: the job finishes with every input once, the dead node's pieces ignored."""
    images = tmp_path / "images"
    names = _photos(images, 64)  # 16 shards: enough that the node dies with some still to label, however fast it runs
    output = tmp_path / "out"
    command = lgca_run(images, _labels(tmp_path), output, "--method", "lgca", "--crops", "8", "--regions", "2", "--steps", "2")
    command += ["--batch-size", "2", "--decode-batch-size", "2", "--rows-per-file", "4"]
    with RayHead(num_cpus=1) as head:
        head.add_node("victim", num_cpus=2)  # the head's one CPU holds the scoring actor or a decode task: work lands here
        started = time.time()
        job = subprocess.Popen(
            [*command, "--address", head.address], env=head.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            busy = _wait_until(lambda: list(output.glob("part-*.parquet")) and head.node_workers("victim"), 180)
            assert busy, "no shard committed while the victim node worked"
            committed_before = len(list(output.glob("part-*.parquet")))
            killed = head.kill_node("victim")
            head.add_node("replacement", num_cpus=2)
            out, _ = job.communicate(timeout=420)
        finally:
            if job.poll() is None:
                job.kill()
    assert job.returncode == 0, out[-4000:]
    table = _assert_exactly_once(str(output), names)
    assert set(table.column("status").to_pylist()) == {OK}
    assert committed_before < len(names) // 4  # the node died with shards still to label
    _report(
        "node death", inputs=len(names), killed_processes=killed, committed_before=committed_before, seconds=round(time.time() - started, 1)
    )


# ---------------------------------------------------------------- 3. object store faults


def _s3_images(s3_server, bucket: str, tmp_path: Path, count: int, prefix: str = "images") -> list[str]:
    names = _photos(tmp_path / "upload" / prefix, count)
    s3_server.upload_tree(tmp_path / "upload", bucket)
    return [f"{prefix}/{name}" for name in names]


@pytest.mark.integration
def test_flaky_object_store_reads_and_writes_retry_and_every_row_is_ok(tmp_path, s3_server, s3_bucket, ray_local):
    keys = _s3_images(s3_server, s3_bucket, tmp_path, 12)
    # every 3rd object read and every 3rd write (PUT, copy, delete) fails, in turn with 503 SlowDown, 500
    # InternalError, the connection dropped before the request reaches the store, the answer lost after it
    # did. Listings and HEADs pass: the input probe fails fast by design (docs/RELIABILITY.md).
    faults = ("503", "500", "drop", "lost")
    reads = Rule(every=3, faults=faults, methods=frozenset({"GET"}), exclude=re.compile(r"[?&]list-type="))
    writes = Rule(every=3, faults=faults, methods=frozenset({"PUT", "POST", "DELETE"}))
    with FaultProxy(s3_server.endpoint_url, [reads, writes]) as proxy:
        options = {**s3_server.storage_options, "endpoint_url": proxy.url}
        output = f"{s3_bucket}/out"
        config = replace(
            _job([f"{s3_bucket}/images"], output, _labels(tmp_path)),
            execution=ExecutionConfig(batch_size=4, decode_batch_size=4, rows_per_file=4),
        )
        started = time.time()
        summary = run(config, options)
        seconds = time.time() - started
    table = _assert_exactly_once(output, [k.split("/", 1)[1] for k in keys], s3_server.storage_options)
    assert set(table.column("status").to_pylist()) == {OK} and summary.counts[OK] == len(keys)
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    assert fs.exists(f"{output}/_SUCCESS") and not fs.exists(f"{output}/_staging")
    assert set(reads.injected) == set(faults) and writes.injected, (reads.injected, writes.injected)
    _report(
        "flaky store",
        requests=proxy.requests,
        faults=sum(proxy.injected.values()),
        by_fault=proxy.injected,
        read_faults=sum(reads.injected.values()),
        write_faults=sum(writes.injected.values()),
        inputs=len(keys),
        rows=table.num_rows,
        lost=0,
        seconds=round(seconds, 1),
    )


@pytest.mark.integration
def test_persistently_failing_reads_become_read_error_rows_after_bounded_retries(tmp_path, s3_server, s3_bucket, ray_local):
    good = _s3_images(s3_server, s3_bucket, tmp_path, 4, "images/good")
    broken = _s3_images(s3_server, s3_bucket, tmp_path, 3, "images/broken")
    rule = Rule(every=1, faults=("503",), methods=frozenset({"GET"}), pattern=re.compile(r"^/[^?]*/broken/"))
    with FaultProxy(s3_server.endpoint_url, [rule]) as proxy:
        options = {**s3_server.storage_options, "endpoint_url": proxy.url}
        output = f"{s3_bucket}/out"
        started = time.time()
        run(_job([f"{s3_bucket}/images"], output, _labels(tmp_path)), options)
        seconds = time.time() - started
    rows = {row["key"]: row for row in _read(output, s3_server.storage_options).to_pylist()}
    assert sorted(rows) == sorted(k.split("/", 1)[1] for k in good + broken)
    for key in broken:
        row = rows[key.split("/", 1)[1]]
        assert row["status"] == READ_ERROR and "reduce your request rate" in row["error_message"], row
    assert all(rows[k.split("/", 1)[1]]["status"] == OK for k in good)
    # bounded: each broken object was asked for exactly read_bytes attempts x botocore attempts times
    assert rule.seen == len(broken) * S3_READ_REQUESTS, rule.seen
    assert seconds < 60, seconds  # backoff per object is at most 4 x (1 + 2) s + 1.4 s
    _report(
        "persistent read failure",
        requests_per_object=rule.seen // len(broken),
        inputs=len(rows),
        read_errors=len(broken),
        lost=0,
        seconds=round(seconds, 1),
    )


# ---------------------------------------------------------------- 4. bad input at scale


def _seed_images() -> list[bytes]:
    image = Image.new("RGB", (24, 16))
    image.putdata([((x * 10) % 256, (y * 15) % 256, (x * y) % 256) for y in range(16) for x in range(24)])
    seeds = []
    for image_format, options in [
        ("JPEG", {"quality": 80}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("JPEG", {"progressive": True}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, image_format, **options)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seed_images()
FUZZ_DECODE = DecodeConfig(max_pixels=4_000_000, min_short_side=16, timeout_s=2.0)


@st.composite
def _mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "header", "random", "empty"]))
    if kind == "flip":
        for index, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=24)):
            data[index] = value
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=256))
    elif kind == "header":  # size fields live in the first bytes: claim huge or zero dimensions
        at = draw(st.integers(0, min(len(data), 64) - 4))
        data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\x7f\xff", b"\x00\x01\x86\xa0"]))
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=512)))
    else:
        data = bytearray()
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt files it is fed
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases=st.lists(_mutated(), min_size=1, max_size=4), missing=st.booleans())
def test_mutated_bytes_through_read_and_decode_give_a_row_each(cases, missing):
    import fsspec

    memory = fsspec.filesystem("memory")
    folder = f"/fuzz-{uuid.uuid4().hex}"
    paths = []
    for index, data in enumerate(cases):
        memory.pipe(f"{folder}/{index}.jpg", data)
        paths.append(f"memory://{folder}/{index}.jpg")
    if missing:
        paths.append(f"memory://{folder}/missing.jpg")
    batch = pa.table({"key": [f"k{i}" for i in range(len(paths))], "path": paths})
    rss_before = psutil.Process().memory_info().rss
    started = time.time()
    out = ReadDecodeStage(FUZZ_DECODE, {})(batch)
    elapsed = time.time() - started
    memory.rm(folder, recursive=True)
    assert elapsed < 10, elapsed  # no hang: decoding stops at the decode timeout (2 s), a stage at max_pixels
    assert out.column("key").to_pylist() == batch.column("key").to_pylist()  # one row per input, in order
    for row in out.drop_columns(["pixels"]).to_pylist():
        assert row["status"] in STATUSES
        assert (row["error_message"] is None) == (row["status"] == OK), row
        if row["status"] == OK:
            assert 0 < row["width"] * row["height"] <= FUZZ_DECODE.max_pixels
            assert row["pixel_height"] > 0 and row["pixel_width"] > 0
    for pixels, h, w in zip(*(out.column(c).to_pylist() for c in ("pixels", "pixel_height", "pixel_width"))):
        assert pixels is None or len(pixels) == h * w * 3
    if missing:
        assert out.column("status")[-1].as_py() == READ_ERROR
    # bounded memory: no example keeps more than a few decoded images' worth of memory
    assert psutil.Process().memory_info().rss - rss_before < 256 * 2**20


def test_decompression_bomb_through_read_and_decode_is_a_decode_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    data = bytearray(SEEDS[1])  # PNG: IHDR width and height at bytes 16-23
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # 10^10 pixels declared, a valid header otherwise
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    bomb.write_bytes(bytes(data))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ReadDecodeStage(FUZZ_DECODE, {})(pa.table({"key": ["bomb"], "path": [str(bomb)]}))
    row = out.drop_columns(["pixels"]).to_pylist()[0]
    assert row["status"] == DECODE_ERROR and "max_pixels" in row["error_message"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 256 * 1024  # KiB: never allocated


# ---------------------------------------------------------------- 5. bad configuration


def _spec(tmp_path: Path, text: str | None = None, **sections: object) -> Path:
    images = tmp_path / "images"
    if not images.exists():
        _photos(images, 2)
    spec = {
        "inputs": [str(images)],
        "output": str(tmp_path / "out"),
        "vocabulary": {"labels": str(_labels(tmp_path))},
        "model": {"name": TINY_MODEL, "pretrained": "random"},
        "scoring": {"method": "clip"},
    }
    spec.update(sections)
    path = tmp_path / "spec.yaml"
    path.write_text(text if text is not None else json.dumps(spec))  # JSON is YAML
    return path


def _run_args(tmp_path: Path, *extra: str, inputs: list[str] | None = None, output: str | None = None) -> list[str]:
    images = tmp_path / "images"
    if not images.exists():
        _photos(images, 2)
    return lgca_run(inputs or images, _labels(tmp_path), output or tmp_path / "out", *extra)


def _case_malformed_yaml(tmp_path, request):
    return [
        sys.executable,
        LABEL_IMAGES,
        "--spec",
        str(_spec(tmp_path, "inputs: [a, b\nmodel: {name: x")),
    ], "is not valid YAML"


def _case_wrong_type(tmp_path, request):
    return [sys.executable, LABEL_IMAGES, "--spec", str(_spec(tmp_path, execution={"batch_size": "ten"}))], "`batch_size` must be int"


def _case_unknown_key(tmp_path, request):
    return [sys.executable, LABEL_IMAGES, "--spec", str(_spec(tmp_path, scoring={"method": "clip", "crop": 4}))], "unknown key(s)"


def _case_empty_vocabulary(tmp_path, request):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no classes yet\n\n")
    spec = _spec(tmp_path, vocabulary={"labels": str(empty)})
    return [sys.executable, LABEL_IMAGES, "--spec", str(spec)], "has no classes; list at least one class name"


def _case_unreachable_address(tmp_path, request):
    return _run_args(tmp_path, "--address", "127.0.0.1:1"), "check --address"


def _case_address_not_host_port(tmp_path, request):
    return _run_args(tmp_path, "--address", "not-an-address"), "is not HOST:PORT"


def _case_wrong_s3_credentials(tmp_path, request):
    s3_server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    _s3_images(s3_server, bucket, tmp_path, 2)
    request.getfixturevalue("_enforced_auth")
    args = _run_args(tmp_path, "--storage-option", f"endpoint_url={s3_server.endpoint_url}", inputs=[f"{bucket}/images"])
    return args, "check the credentials"


def _case_unwritable_output(tmp_path, request):
    (tmp_path / "file.txt").write_text("a file, not a folder: nothing, not even root, can create a folder below it\n")
    return _run_args(tmp_path, output=str(tmp_path / "file.txt" / "out")), "choose a writable --output"


def _case_output_inside_input(tmp_path, request):
    return _run_args(tmp_path, output=str(tmp_path / "images" / "out")), "Choose an --output outside the inputs"


def _case_output_inside_glob_input(tmp_path, request):
    _photos(tmp_path / "images", 2)
    glob = str(tmp_path / "images" / "**" / "*.jpg")
    return _run_args(tmp_path, inputs=[glob], output=str(tmp_path / "images" / "out")), "Choose an --output outside the inputs"


def _case_password_in_input_url(tmp_path, request):
    return _run_args(tmp_path, inputs=["s3://bob:hunter2@bucket/images/"]), "the URL carries credentials"


def _case_token_as_user_in_input_url(tmp_path, request):
    return _run_args(tmp_path, inputs=["http://:tok3n-canary@127.0.0.1:1/images/"]), "input http://***@127.0.0.1:1/images/"


def _case_signed_url_as_labels(tmp_path, request):
    signed = "https://b.s3.amazonaws.com/labels.txt?X-Amz-Credential=AKIA&X-Amz-Signature=canary"
    command = _run_args(tmp_path)
    command[command.index("--labels") + 1] = signed
    return command, "--labels https://b.s3.amazonaws.com/labels.txt?X-Amz-Credential=***&X-Amz-Signature=***"


def _case_token_in_weights_url(tmp_path, request):
    command = _run_args(tmp_path)
    command[command.index("--pretrained") + 1] = "https://tok3n@models.example/ViT.safetensors"
    return command, "--pretrained https://***@models.example/ViT.safetensors: the URL carries credentials"


def _case_token_in_templates_url(tmp_path, request):
    return _run_args(
        tmp_path, "--templates", "https://h.example/t.txt?access_token=canary"
    ), "--templates https://h.example/t.txt?access_token=***"


def _case_scheme_not_allowed(tmp_path, request):
    return _run_args(tmp_path, inputs=["http://127.0.0.1:1/images/"]), "add --allow-scheme http"


def _case_malformed_model_json(tmp_path, request):
    (tmp_path / "malformed.json").write_text('{"embed_dim": 32, "vision_cfg": ')
    return _run_args(tmp_path, "--model", str(tmp_path / "malformed.json")), "is not readable JSON"


def _case_incomplete_model_json(tmp_path, request):
    (tmp_path / "incomplete.json").write_text('{"embed_dim": 32}')
    return _run_args(tmp_path, "--model", str(tmp_path / "incomplete.json")), "lacks vision_cfg, text_cfg"


def _case_unbuildable_model_json(tmp_path, request):
    config = json.loads(Path(TINY_MODEL).read_text())
    config["vision_cfg"]["layers"] = "two"
    (tmp_path / "unbuildable.json").write_text(json.dumps(config))
    return _run_args(tmp_path, "--model", str(tmp_path / "unbuildable.json")), "does not build an open_clip model"


def _case_fake_safetensors(tmp_path, request):
    (tmp_path / "fake.safetensors").write_text("these are not weights\n")
    return _run_args(tmp_path, "--pretrained", str(tmp_path / "fake.safetensors")), "not a valid safetensors file"


def _case_cuda_without_cuda(tmp_path, request):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal where no CUDA device exists")
    return _run_args(tmp_path, "--device", "cuda"), "CUDA is not available here; use --device cpu or auto"


def _case_manifest_repeats_a_column(tmp_path, request):
    names = _photos(tmp_path / "images", 1)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,key,path\nimages/{names[0]},a,images/{names[0]}\n")
    return _run_args(tmp_path, inputs=[str(manifest)]), "repeats column name(s) path"


CONFIG_CASES = {
    "malformed-yaml-spec": _case_malformed_yaml,
    "wrong-type-in-spec": _case_wrong_type,
    "unknown-key-in-spec": _case_unknown_key,
    "empty-vocabulary": _case_empty_vocabulary,
    "unreachable-ray-address": _case_unreachable_address,
    "address-not-host-port": _case_address_not_host_port,
    "wrong-s3-credentials": _case_wrong_s3_credentials,
    "unwritable-output": _case_unwritable_output,
    "output-inside-input": _case_output_inside_input,
    "output-inside-glob-input": _case_output_inside_glob_input,
    "password-in-input-url": _case_password_in_input_url,
    "token-as-user-in-input-url": _case_token_as_user_in_input_url,
    "signed-url-as-labels": _case_signed_url_as_labels,
    "token-in-weights-url": _case_token_in_weights_url,
    "token-in-templates-url": _case_token_in_templates_url,
    "scheme-not-allowed": _case_scheme_not_allowed,
    "malformed-model-json": _case_malformed_model_json,
    "incomplete-model-json": _case_incomplete_model_json,
    "unbuildable-model-json": _case_unbuildable_model_json,
    "fake-safetensors": _case_fake_safetensors,
    "cuda-without-cuda": _case_cuda_without_cuda,
    "manifest-repeats-a-column": _case_manifest_repeats_a_column,
}


@pytest.fixture
def _enforced_auth(s3_server):
    with s3_server.enforce_auth():
        yield


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.integration
def test_bad_configuration_fails_fast_with_exit_2_before_any_work(case, tmp_path, request):
    command, message = CONFIG_CASES[case](tmp_path, request)
    tag = uuid.uuid4().hex
    ray_tmp = tmp_path / "ray-tmp"
    env = {**os.environ, TAG: tag, "RAY_TMPDIR": str(ray_tmp)}  # a Ray started here would create this folder
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    elapsed = time.time() - started
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert elapsed < FAST_FAIL_S, elapsed
    assert not ray_tmp.exists(), "Ray was started"
    assert not _tagged_processes(tag)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))
    _report("bad configuration", case=case, seconds=round(elapsed, 1), exit=result.returncode)


# ---------------------------------------------------------------- 6. security


class _Evil:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is ever executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.integration
def test_malicious_pickle_weights_are_refused_and_never_executed(tmp_path):
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Evil(tmp_path / "armed")}, evil)
    torch.load(evil, weights_only=False)  # the payload works: an unsafe loader runs it
    assert (tmp_path / "armed").exists()
    torch.save({"visual.proj": _Evil(tmp_path / "pwned")}, evil)
    result = subprocess.run(_run_args(tmp_path, "--pretrained", str(evil)), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "refusing to load" in result.stderr and "safetensors" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.integration
def test_manifest_keys_and_paths_cannot_make_the_job_write_outside_the_output(tmp_path, ray_local):
    work = tmp_path / "a" / "b"  # room for ../../ to land inside tmp_path, where we can look
    names = _photos(work / "images", 3)
    manifest = work / "manifest.csv"
    rows = [
        ("../../escape-relative.jpg", f"images/{names[0]}"),
        (str(tmp_path / "escape-absolute.jpg"), str(work / "images" / names[1])),
        ("ok/../../../escape-mixed.jpg", f"../../escape-dir/{names[2]}"),
        ("/tmp/escape-root.jpg", f"file://{work / 'images' / names[2]}"),
    ]
    manifest.write_text("key,path\n" + "".join(f"{k},{p}\n" for k, p in rows))
    output = work / "out"
    labels = _labels(work)
    before = set(tmp_path.rglob("*"))
    run(_job([manifest], output, labels))
    created = set(tmp_path.rglob("*")) - before
    outside = [p for p in created if output not in p.parents and p != output]
    assert not outside, outside
    assert not list(tmp_path.rglob("escape*")) and not Path("/tmp/escape-root.jpg").exists()
    # file names come from shard ids (hashes of the unit), never from keys or paths
    names_written = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert {"_SUCCESS", "_manifest.json", "_plan/plan.json", "_lease.lock"} <= names_written
    others = names_written - {"_SUCCESS", "_manifest.json", "_plan/plan.json", "_lease.lock"}
    assert others and all(
        re.fullmatch(r"(part-|_plan/shards/|_plan/keys/)[0-9a-f]{12}(-\d{5})?\.(parquet|shard|keys)", n) for n in others
    ), others
    table = _read(str(output))
    assert sorted(table.column("key").to_pylist()) == sorted(k for k, _ in rows)  # keys stay data
    statuses = dict(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
    assert statuses["ok/../../../escape-mixed.jpg"] == READ_ERROR and statuses["../../escape-relative.jpg"] == OK


FAKE_KEY = "AKIALGCAFAKEKEY7TEST"
FAKE_SECRET = "lgcaFakeSecret/DoNotLog+8c1f2e"
ENV_KEY = "AKIALGCAENVKEY7TEST0"
ENV_SECRET = "lgcaEnvSecret/DoNotLog+77ab90"


@pytest.mark.integration
def test_credentials_never_reach_logs_manifest_or_parquet_metadata(tmp_path, s3_server, s3_bucket):
    _s3_images(s3_server, s3_bucket, tmp_path, 4)
    output = f"{s3_bucket}/out"
    ray_tmp = tempfile.mkdtemp(prefix="lg", dir="/tmp")  # short: Ray's socket paths must stay under ~107 bytes
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ENV_KEY, "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = _run_args(
        tmp_path,
        "--storage-option",
        f"endpoint_url={s3_server.endpoint_url}",
        "--storage-option",
        f"key={FAKE_KEY}",
        "--storage-option",
        f"secret={FAKE_SECRET}",
        "--storage-option",
        "client_kwargs.region_name=us-east-1",
        inputs=[f"{s3_bucket}/images"],
        output=output,
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        secrets = (FAKE_KEY, FAKE_SECRET, ENV_KEY, ENV_SECRET)
        seen = {"stdout+stderr": result.stdout + result.stderr}
        import fsspec

        fs = fsspec.filesystem("s3", **s3_server.storage_options)
        seen["_manifest.json"] = fs.cat_file(f"{output}/_manifest.json").decode()
        parts = [p for p in fs.ls(output, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")]
        assert parts
        for part in parts:
            with fs.open(part, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
            seen[f"{part} metadata"] = repr(metadata.metadata) + repr(metadata.schema.to_arrow_schema().metadata)
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")]
        for log in logs:
            seen[str(log)] = log.read_text(errors="replace")
        leaks = [(where, s) for where, text in seen.items() for s in secrets if s in text]
        assert not leaks, leaks
        _report("credentials", places_checked=len(seen), ray_logs=len(logs), leaks=0)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


# The image runs as a non-root user: tests/test_infra.py::test_dockerfile_contents checks the Dockerfile's last USER.
