"""Archive-scale mechanics of the job on a real Ray: the persisted plan, its reuse and refusal on resume, duplicate
keys across manifest files, a worker killed while committing, and one writer per output."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ExecutionConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.faults import FAULT_ENV, FAULT_ONCE_ENV
from pipeline.run.job import plan_only, run
from pipeline.stages.plan import PlanError

from .support import LGCA, TINY_MODEL, labels_file, lgca_run

pytestmark = pytest.mark.integration  # every test plans or runs a job on Ray


def _photos(directory: Path, count: int, prefix: str = "") -> list[str]:
    rng = np.random.default_rng(len(prefix) + count)
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}.jpg"
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(directory / name)
        names.append(name)
    return names


def _labels(directory: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    return labels_file(directory, classes, f"labels-{len(classes)}.txt")


def _job(inputs, output, labels, **overrides) -> JobConfig:
    return JobConfig(
        inputs=tuple(str(i) for i in inputs),
        output=str(output),
        vocabulary=VocabularyConfig(labels=str(labels)),
        model=ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu"),
        scoring=ScoringConfig(method="clip"),
        execution=ExecutionConfig(batch_size=4, decode_batch_size=4, rows_per_file=3),
        **overrides,
    )


def _rows(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))])


def _command(images: Path, labels: Path, output: Path, *extra: str) -> list[str]:
    return lgca_run(
        images, labels, output, "--method", "clip", "--rows-per-file", "3", "--batch-size", "2", "--decode-batch-size", "2", *extra
    )


def test_the_plan_is_written_once_reused_on_resume_and_a_changed_configuration_is_refused(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images / "a", 4) + _photos(images / "b", 3)
    labels = _labels(tmp_path)
    output = tmp_path / "out"
    planned = plan_only(_job([images], output, labels))
    assert (planned.images, planned.shards, planned.reused) == (7, 3, False)  # folders a/ (4: two shards) and b/ (3)
    assert "7 images in 3 shards" in planned.line() and "7 encoder passes" in planned.line()
    plan_file = (output / "_plan" / "plan.json").read_bytes()
    for name in ("a/new.jpg", "c/new.jpg"):  # the bucket changes after planning: the plan decides what is labelled
        _photos(images / name.split("/")[0], 1, prefix="new-")
    summary = run(_job([images], output, labels, resume=True))
    assert summary.plan_seconds == 0 and summary.inputs == 7 and summary.rows_written == 7
    assert (output / "_plan" / "plan.json").read_bytes() == plan_file
    assert sorted(_rows(output).column("key").to_pylist()) == sorted(f"{d}/{n}" for d, n in zip("aaaabbb", names))
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["plan"]["shards"] == 3 and manifest["counts"]["rows"] == 7
    with pytest.raises(PlanError) as error:  # another vocabulary would mix two label sets in one output
        run(_job([images], output, _labels(tmp_path, ("cat", "dog", "bird")), resume=True))
    assert "vocabulary_sha256" in str(error.value) and "--overwrite" in str(error.value)
    with pytest.raises(PlanError, match=r"scoring\.method: 'clip' -> 'wca'"):
        run(replace_scoring(_job([images], output, labels, resume=True), method="wca"))
    again = run(_job([images], output, labels, resume=True))
    assert again.rows_written == 0 and again.already_done == 7 and again.counts["ok"] == 7


def replace_scoring(job: JobConfig, **changes) -> JobConfig:
    from dataclasses import replace

    return replace(job, scoring=replace(job.scoring, **changes))


def test_an_s3_prefix_with_many_sub_prefixes_is_listed_by_parallel_tasks_into_the_same_rows(tmp_path, s3_server, s3_bucket, ray_local):
    tree = tmp_path / "tree"
    for group in range(8):
        _photos(tree / f"g{group}" / "sub", 2 + group % 2, prefix=f"{group}-")
    (tree / "notes.txt").write_text("not an image")
    s3_server.upload_tree(tree, f"{s3_bucket}/tree")
    from pipeline.stages.listing import list_inputs
    from pipeline.stages.sources import parse_input

    expected = list_inputs([parse_input(f"{s3_bucket}/tree")], s3_server.storage_options)
    job = _job([f"{s3_bucket}/tree"], f"{s3_bucket}/out", _labels(tmp_path))
    planned = plan_only(job, s3_server.storage_options)
    # one listing task per sub-prefix level: every leaf folder is its own unit, so its own shard(s)
    assert planned.images == expected.table.num_rows == 20 and planned.shards == 8 and planned.skipped_count == 1
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    shards = [p for p in fs.find(f"{s3_bucket}/out/_plan/shards") if p.endswith(".shard")]
    keys = sorted(k for p in shards for k in pq.read_table(fs.open(p, "rb")).column("key").to_pylist())
    assert keys == expected.table.column("key").to_pylist()
    assert not fs.glob(f"{s3_bucket}/out/**/*.parquet")  # a plan is no result


def test_results_without_a_plan_from_a_finished_run_are_refused_not_relabelled(tmp_path, ray_local):
    # Only an attempt that died while listing is labelled again from a new listing; results whose plan went
    # missing some other way are refused, never deleted.
    images = tmp_path / "images"
    _photos(images, 4)
    job = _job([images], tmp_path / "out", _labels(tmp_path))
    run(job)
    import shutil

    shutil.rmtree(tmp_path / "out" / "_plan")
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    with pytest.raises(PlanError, match="has results but no plan"):
        run(dataclasses.replace(job, resume=True))
    assert sorted((tmp_path / "out").glob("part-*.parquet")) == parts


def test_duplicate_keys_across_manifest_files_are_refused(tmp_path, ray_local):
    images = tmp_path / "images"
    names = _photos(images, 4)
    for index, chosen in enumerate((names[:3], names[2:])):  # both list 002.jpg under the same key
        pq.write_table(pa.table({"path": [str(images / n) for n in chosen], "key": chosen}), tmp_path / f"m{index}.parquet")
    with pytest.raises(PlanError, match=r"1 key\(s\) appear more than once across the inputs \(002\.jpg\)"):
        run(_job([tmp_path / "m0.parquet", tmp_path / "m1.parquet"], tmp_path / "out", _labels(tmp_path)))


@pytest.mark.slow
def test_a_second_job_is_refused_and_a_worker_killed_while_committing_is_retried(tmp_path):
    """One job whose first commit task is SIGKILLed (Ray retries it) while a second job on its output is refused."""
    images = tmp_path / "images"
    names = _photos(images, 7)
    labels = _labels(tmp_path)
    output = tmp_path / "out"
    once = tmp_path / "fault-fired"
    env = {**os.environ, FAULT_ENV: "committing", FAULT_ONCE_ENV: str(once)}  # the embedded Ray's workers inherit it
    first = subprocess.Popen(_command(images, labels, output), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (output / "_lease.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (output / "_lease.json").exists(), "the first job never took the lease"
    for extra in ((), ("--resume",), ("--overwrite",)):
        second = subprocess.run(_command(images, labels, output, *extra), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "being written by another job" in second.stderr, second.stderr[-2000:]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert once.exists()  # a commit task was SIGKILLed after building its file, before publishing it
    keys = _rows(output).column("key").to_pylist()
    assert sorted(keys) == names and (output / "_SUCCESS").exists()
    assert not (output / "_staging").exists() and not (output / "_lease.json").exists()
    # Ray Data's notices stay in its session logs, not on the terminal
    assert "streaming_executor" not in stderr and "Progress bars disabled" not in stderr, stderr[-2000:]


# ---------------------------------------------------------------- labelling while the listing goes on


def _tree_in_levels(tmp_path: Path, s3_server, bucket: str) -> tuple[str, Path, list[str]]:
    """Images at three depths of an S3 prefix (a/, a/b/, a/b/c/): each level is listed only after the one above;
    also the same tree on local disk. Returns the prefix, the local copy, the keys."""
    tree = tmp_path / "tree"
    keys = []
    for depth, folder in enumerate(("a", "a/b", "a/b/c")):
        keys += [f"{folder}/{name}" for name in _photos(tree / folder, 3, prefix=f"d{depth}-")]
    s3_server.upload_tree(tree, f"{bucket}/tree")
    return f"{bucket}/tree", tree, sorted(keys)


def _slow_deep_listings():
    """A proxy rule: the listings of tree/a/b and below answer late (the proxy's `slow_s`, under s3fs's 15 s read
    timeout), one level after the other, so the listing outlasts the first shards' labelling."""
    import re

    from .fault_proxy import Rule

    return Rule(every=1, faults=("slow",), methods=frozenset({"GET"}), pattern=re.compile(r"prefix=tree/a/b"))


@pytest.mark.slow
def test_labelling_starts_while_the_listing_goes_on_and_a_resume_after_a_death_there_starts_over(tmp_path, s3_server, s3_bucket):
    from .fault_proxy import FaultProxy
    from .ray_head import RayHead

    prefix, _, keys = _tree_in_levels(tmp_path, s3_server, s3_bucket)
    output = tmp_path / "out"
    # 3 CPUs: the scoring actor and a decode task take one each, the listing tasks (a quarter each) the third
    with FaultProxy(s3_server.endpoint_url, [_slow_deep_listings()], slow_s=12.0) as proxy, RayHead(num_cpus=3) as head:
        options = [f"--storage-option=endpoint_url={proxy.url}", "--storage-option=key=testing", "--storage-option=secret=testing"]
        command = [*_command(prefix, _labels(tmp_path), output, *options), "--address", head.address]
        env = {**head.env(), "LGCA_LISTING_HEAD_START_S": "0"}  # label from the first listed shard
        # The first attempt dies once it has committed the shard of a/ while a/b/ and a/b/c/ are still being listed.
        killed = subprocess.run(command, env={**env, FAULT_ENV: "scoring"}, capture_output=True, text=True, timeout=240)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert "shards while the listing goes on" in killed.stderr
        parts = sorted(output.glob("part-*.parquet"))
        assert parts and not (output / "_plan" / "plan.json").exists()
        # `lgca plan` labels nothing and deletes nothing: it refuses, the committed shards untouched.
        planned = subprocess.run([LGCA, "plan", *command[2:]], env=env, capture_output=True, text=True, timeout=240)
        assert planned.returncode == 2 and "`lgca plan` labels nothing and deletes nothing" in planned.stderr, planned.stderr[-2000:]
        assert sorted(output.glob("part-*.parquet")) == parts
        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped before its listing ended (no _plan/plan.json), with 1 shards committed" in resumed.stderr
    assert "while the listing goes on" in resumed.stderr
    assert sorted(_rows(output).column("key").to_pylist()) == keys and (output / "_SUCCESS").exists()
    manifest = json.loads((output / "_manifest.json").read_text())
    assert [a["status"] for a in manifest["attempts"]] == ["died", "succeeded"]
    assert manifest["counts"]["rows"] == len(keys) == manifest["plan"]["images"]


@pytest.mark.slow
def test_keys_repeated_across_inputs_found_after_labelling_started_fail_the_job(tmp_path, s3_server, s3_bucket):
    """A local copy of the tree lists at once and is labelled while the S3 prefix is still listed; the duplicate
    keys, found once every key is listed, stop the job: exit 1, the message, no _SUCCESS."""
    from .fault_proxy import FaultProxy
    from .ray_head import RayHead

    prefix, local, _ = _tree_in_levels(tmp_path, s3_server, s3_bucket)
    output = tmp_path / "out"
    with FaultProxy(s3_server.endpoint_url, [_slow_deep_listings()], slow_s=6.0) as proxy, RayHead(num_cpus=3) as head:
        options = [f"--storage-option=endpoint_url={proxy.url}", "--storage-option=key=testing", "--storage-option=secret=testing"]
        command = [*_command(local, _labels(tmp_path), output, *options), "--address", head.address]
        command.insert(3, prefix)  # a second input
        result = subprocess.run(command, env={**head.env(), "LGCA_LISTING_HEAD_START_S": "0"}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "while the listing goes on" in result.stderr
    assert "9 key(s) appear more than once across the inputs" in result.stderr
    assert not (output / "_SUCCESS").exists()
    attempt = json.loads((output / "_manifest.json").read_text())["attempts"][-1]
    assert attempt["status"] == "failed" and "9 key(s) appear more than once" in attempt["error"]  # on record, not `running`
