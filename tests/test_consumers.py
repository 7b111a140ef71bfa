"""The output and every export read by the real tool that consumes it, with the commands the docs give (read from the docs).

pycocotools evaluates the COCO export against itself, Label Studio's SDK validates every prediction against the
exported config, FiftyOne imports the export as docs/CURATION.md says, and pandas, DuckDB and Polars read the
output with `**/*.parquet` globs while a job writes it, after it, and after a resume over a grown manifest.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli

from .outputs import real_run, sample_images  # noqa: F401 - fixtures are used by name
from .ray_head import RayHead
from .support import labels_file, lgca_run

pytestmark = pytest.mark.integration  # every test reads a real run's output (Ray), one runs `lgca run` itself

ROOT = Path(__file__).resolve().parents[1]
CURATION = ROOT / "docs" / "CURATION.md"
OUTPUT_DOC = ROOT / "docs" / "OUTPUT.md"


def doc_block(doc: Path, name: str) -> str:
    """The code block of `doc` marked `<!-- test: name -->`."""
    match = re.search(rf"<!-- test: {re.escape(name)} -->\n```\w+\n(.*?)```", doc.read_text(), re.S)
    assert match, f"{doc.name} has no code block marked <!-- test: {name} -->"
    return match.group(1)


def run_doc_commands(block: str, replacements: dict[str, str] | None = None) -> None:
    """Run each `lgca ...` command of a shell block in this process, continuation lines joined."""
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("lgca ")]
    assert commands, block
    for line in commands:
        for old, new in (replacements or {}).items():
            line = line.replace(old, new)
        assert cli.main(shlex.split(line)[1:]) == 0, line


def run_doc_python(block: str) -> dict[str, Any]:
    """Run a Python block of the docs; its variables."""
    namespace: dict[str, Any] = {}
    exec(compile(block, "<docs>", "exec"), namespace)
    return namespace


@pytest.fixture
def workspace(real_run, tmp_path, monkeypatch) -> Path:
    """A working directory with the real run's output as `out/`, as the docs' commands expect."""
    (tmp_path / "out").symlink_to(real_run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ok_rows(output: Path, min_score: float | None = None) -> dict[str, dict]:
    table = pq.read_table(output)
    table = table.filter(pc.equal(table.column("status"), "ok"))
    rows = {row["path"]: row for row in table.to_pylist()}
    return {path: row for path, row in rows.items() if min_score is None or row["score"] >= min_score}


# ---------------------------------------------------------------- COCO: pycocotools


def test_coco_export_loads_in_pycocotools_and_evaluates_against_itself_at_ap_1(workspace, real_run):
    from pycocotools.cocoeval import COCOeval

    run_doc_commands(doc_block(CURATION, "coco-export"))
    found = run_doc_python(doc_block(CURATION, "coco-check"))
    coco, evaluation = found["coco"], found["evaluation"]
    rows = _ok_rows(real_run, min_score=0.3)
    assert len(coco.imgs) == len(rows) > 0 and len(coco.anns) == sum(len(r["boxes"]) for r in rows.values()) > 0
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP over IoU 0.5:0.95, every category

    # The same evaluation tells boxes that are off: each moved by its own width scores nothing.
    moved = [
        {**{k: a[k] for k in ("image_id", "category_id", "score")}, "bbox": [a["bbox"][0] + a["bbox"][2], *a["bbox"][1:]]}
        for a in coco.anns.values()
    ]
    check = COCOeval(coco, coco.loadRes(moved), "bbox")
    check.evaluate(), check.accumulate(), check.summarize()
    assert check.stats[0] < 0.5


# ---------------------------------------------------------------- Label Studio: its SDK


def test_labelstudio_sdk_validates_every_prediction_against_the_exported_config(workspace, real_run):
    rows = _ok_rows(real_run)
    images = os.path.dirname(next(iter(rows)))
    run_doc_commands(doc_block(CURATION, "labelstudio-export"), {"/data/photos/": f"{images}/"})
    found = run_doc_python(doc_block(CURATION, "labelstudio-check"))
    tasks, errors, config = found["tasks"], found["errors"], found["config"]
    assert len(tasks) == len(rows) and errors == []
    assert sum(len(t["predictions"][0]["result"]) - 1 for t in tasks) == sum(len(r["boxes"]) for r in rows.values())
    assert all(t["data"]["image"].startswith("/data/local-files/?d=photos/photo") for t in tasks)
    # The SDK does reject what the config cannot hold: the check can fail.
    wrong = json.loads(json.dumps(tasks[0]["predictions"][0]))
    wrong["result"][0]["value"]["choices"] = ["no such class"]
    wrong["result"][1]["from_name"] = "nope"
    assert len(config.validate_prediction(wrong, return_errors=True)) == 2


# ---------------------------------------------------------------- FiftyOne

# FiftyOne keeps its database in a folder of the test's own, and reports the imported samples back as JSON.
_FIFTYONE_DUMP = """
import json
samples = {}
for sample in dataset:
    detections = sample.lgca_boxes.detections if sample.lgca_boxes else []
    samples[sample.filepath] = {
        "label": sample.lgca_label.label if sample.lgca_label else None,
        "confidence": sample.lgca_label.confidence if sample.lgca_label else None,
        "margin": sample.lgca_label["margin"] if sample.lgca_label else None,
        "boxes": [[d.label, d.confidence, list(d.bounding_box), d["level"], d["parent"]] for d in detections],
    }
print("@@samples=" + json.dumps(samples))
"""


@pytest.mark.skipif(importlib.util.find_spec("fiftyone") is None, reason="fiftyone is not installed (the test extras install it)")
def test_fiftyone_imports_the_export_as_the_docs_say(workspace, real_run):
    run_doc_commands(doc_block(CURATION, "fiftyone-export"))
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_DIR": str(workspace / "fiftyone-db"),
        "FIFTYONE_CONFIG_PATH": str(workspace / "fiftyone-config.json"),  # no user configuration applies
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
    script = doc_block(CURATION, "fiftyone-import") + _FIFTYONE_DUMP
    # A process of its own: FiftyOne starts mongod beside it and stops it when that process ends.
    result = subprocess.run([sys.executable, "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = json.loads(re.search(r"^@@samples=(.*)$", result.stdout, re.M).group(1))
    rows = _ok_rows(real_run)
    assert set(samples) == set(rows)
    for path, sample in samples.items():
        row = rows[path]
        assert sample["label"] == row["label"]
        assert sample["confidence"] == pytest.approx(row["score"], abs=1e-5)
        assert sample["margin"] == pytest.approx(row["margin"], abs=1e-5)
        assert len(sample["boxes"]) == len(row["boxes"])
        for (label, confidence, box, level, parent), expected in zip(sample["boxes"], row["boxes"]):
            assert label == expected["label"] and confidence == pytest.approx(expected["score"], abs=1e-5)
            assert (level, parent) == (expected["level"], expected["parent"])
            corners = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
            assert corners == pytest.approx([expected[k] for k in ("x0", "y0", "x1", "y1")], abs=1e-4)


# ---------------------------------------------------------------- pandas, DuckDB and Polars, during and after runs


class _Readers:
    """Runs the docs' three reads (pandas, Polars, DuckDB) over an output, again and again, until stopped."""

    def __init__(self, output: Path, keys: set[str], rows_per_file: int) -> None:
        self.code = doc_block(OUTPUT_DOC, "read-output").replace("DIR", str(output))
        self.output, self.keys, self.rows_per_file = output, keys, rows_per_file
        self.reads: list[tuple[int, int, int]] = []  # rows seen by pandas, Polars, DuckDB
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def read_once(self) -> tuple[int, int, int]:
        found = run_doc_python(self.code)
        frame, table, labels = found["frame"], found["table"], found["labels"]
        counts = (len(frame), table.height, sum(n for _, n in labels))
        keys = list(frame["key"])
        # Whole part files only (every shard holds rows_per_file rows), each key once; the three reads run one
        # after the other, so a later one may see shards committed since, never fewer.
        whole = all(n % self.rows_per_file == 0 for n in counts) and list(counts) == sorted(counts)
        if not whole or len(set(keys)) != len(keys) or not set(keys) <= self.keys:
            self.problems.append(f"rows {counts}, {len(keys) - len(set(keys))} repeated keys, {len(set(keys) - self.keys)} unknown")
        if str(frame["width"].dtype) != "Int32":
            self.problems.append(f"pandas reads width as {frame['width'].dtype}")
        return counts

    def _loop(self) -> None:
        while not self._stop.is_set():
            if list(self.output.glob("part-*.parquet")):  # before the first commit there is nothing to read
                try:
                    self.reads.append(self.read_once())
                except Exception as error:  # a reader that fails on a live output is a finding
                    self.problems.append(f"{type(error).__name__}: {error}")
            time.sleep(0.2)


def _manifest(path: Path, images: list[str], notes: dict[int, int] | None = None) -> None:
    """A CSV manifest: path, key, a `note` column (empty unless given) and an integer `batch`."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "key", "note", "batch"])
        for index, image in enumerate(images):
            writer.writerow([image, f"k{index:03d}", (notes or {}).get(index, ""), index % 3])


@pytest.mark.slow
def test_readers_see_whole_results_during_a_run_after_it_and_after_a_resume_over_a_grown_manifest(tmp_path):
    images = sample_images(tmp_path / "images", 48)
    manifest = tmp_path / "manifest.csv"
    _manifest(manifest, images[:40])  # `note` empty in every row: the plan fixes its type
    labels = labels_file(tmp_path, ("cat", "dog", "bird"))
    output = tmp_path / "out"
    command = lgca_run(
        manifest, labels, output, "--method", "clip", "--rows-per-file", "4", "--batch-size", "2", "--decode-batch-size", "2"
    )
    planned = {f"k{i:03d}" for i in range(40)}
    with RayHead() as head, _Readers(output, planned, rows_per_file=4) as readers:
        # The first attempt dies once its first shard is committed, pieces of others staged.
        killed = subprocess.run(
            [*command, "--address", head.address],
            env={**head.env(), "LGCA_FAULT_POINT": "scoring"},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        _manifest(manifest, images, notes=dict.fromkeys(range(40, 48), 7))  # 8 more rows, with a number in `note`
        resumed = subprocess.run(
            [*command, "--address", head.address, "--resume"], env=head.env(), capture_output=True, text=True, timeout=240
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("RANDOM weights") == 1  # said once, by the driver
    assert readers.problems == [] and readers.reads
    assert any(0 < seen[0] < 40 for seen in readers.reads)  # reads of a job half done, whole part files only
    assert re.search(rf"manifest {re.escape(str(manifest))} \(size \d+ -> \d+\) changed since the plan was made", resumed.stderr)
    assert readers.read_once() == (40, 40, 40) and readers.problems == []
    note_types = {str(pq.read_schema(part).field("note").type) for part in output.glob("part-*.parquet")}
    assert note_types == {"null"} and len(list(output.glob("part-*.parquet"))) == 10  # one type in every file
