"""Cluster submission: `lgca submit` and `ray job submit` against a real Ray head on loopback, and the checks that run before submission."""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import pipeline.cli.cluster
from pipeline.cli.main import main as lgca_main
from pipeline.run.submit import (
    ENTRYPOINT_SCRIPT,
    WORKING_DIR_EXCLUDES,
    ClusterError,
    entrypoint,
    pinned_requirements,
    probe,
    runtime_env,
)

from .ray_head import RAY, RayHead

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LGCA = str(VENV_BIN / "lgca")
TINY_MODEL = str(REPO / "tests" / "fixtures" / "lgca-tiny-vit.json")
CLASSES = ("cat", "dog", "rocket")
IMAGE_SIZES = {"wide.png": (96, 64), "tall.jpg": (64, 96), "square.png": (50, 50), "pano.jpg": (120, 40), "small.png": (40, 36)}
BROKEN = "broken.jpg"  # bytes that are no image: its row must come out as decode_error
JOB_TIMEOUT_S = 240
RAYJOB = REPO / "infra" / "kuberay" / "rayjob.yaml"


class TokenRayHead(RayHead):
    """A loopback head with token authentication (Ray's default from 2.61) and the venv's `python` first on PATH.

    The submitted entrypoint runs `python` from the cluster's PATH, so the cluster starts with the venv's bin first.
    The token is a throwaway value held in the environment only.
    """

    def __init__(self) -> None:
        super().__init__(num_cpus=2, dashboard=True)
        self.token = secrets.token_hex(32)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
        return env

    def get(self, endpoint: str) -> Any:
        request = urllib.request.Request(f"{self.dashboard_url}{endpoint}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.get("/api/version")
                self.get("/api/jobs/")
                return
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TokenRayHead]:
    head = TokenRayHead()
    try:
        head.__enter__()
        head.wait_ready()
        yield head
    finally:
        head.__exit__(None, None, None)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGE_SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    (root / BROKEN).write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def _write_spec(directory: Path, images: Path, output: Path) -> Path:
    labels = directory / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    spec = {
        "inputs": [str(images)],
        "output": str(output),
        "vocabulary": {"labels": str(labels)},
        "model": {"name": TINY_MODEL, "pretrained": "random", "cache_dir": str(directory / "cache")},
        "scoring": {"method": "lgca", "crops": 4, "regions": 1, "steps": 1, "topk": 2},
        "execution": {"batch_size": 4, "concurrency": 1, "num_gpus": 0},
    }
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(output: Path) -> dict[str, dict[str, Any]]:
    files = sorted(output.glob("part-*.parquet"))
    assert files, f"no committed Parquet files in {output}"
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows), "a key has more than one row"
    return by_key


def _check_rows(output: Path, images: Path) -> dict[str, dict[str, Any]]:
    """Every input has exactly one row; ok rows carry a coherent prediction, the broken file a decode_error."""
    rows = _rows(output)
    assert set(rows) == {*IMAGE_SIZES, BROKEN}
    for key, (width, height) in IMAGE_SIZES.items():
        row = rows[key]
        assert row["status"] == "ok", row["error_message"]
        assert row["path"] == str(images / key)
        assert (row["width"], row["height"]) == (width, height)
        assert row["label"] in CLASSES and row["label"] == row["topk_labels"][0]
        assert len(row["topk_labels"]) == 2 and set(row["topk_labels"]) <= set(CLASSES)
        assert row["score"] == row["topk_scores"][0] and row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert 0 < sum(row["topk_scores"]) <= 1 + 1e-5 and math.isfinite(row["margin"])
        assert row["boxes"], "lgca keeps its salient boxes"
        for box in row["boxes"]:
            assert 0 <= box["x0"] < box["x1"] <= 1 and 0 <= box["y0"] < box["y1"] <= 1
        assert (row["method"], row["model"]) == ("lgca", "lgca-tiny-vit") and row["pretrained"].startswith("random")
    broken = rows[BROKEN]
    assert broken["status"] == "decode_error" and broken["error_message"]
    assert broken["label"] is None and broken["topk_labels"] is None
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["execution"]["address"] == "auto", "the job must join the cluster it was submitted to"
    assert (output / "_SUCCESS").exists()
    return rows


def _rayjob_entrypoint() -> tuple[str, str]:
    """The RayJob manifest's entrypoint and the spec path it names."""
    rayjob = next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "RayJob")
    command = rayjob["spec"]["entrypoint"]
    words = command.split()
    return command, words[words.index("--spec") + 1]


def _run(command: list[str], env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lgca_submit_wait_labels_every_image(cluster: TokenRayHead, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = _write_spec(tmp_path, images, output)
    job_id = f"lgca-test-{secrets.token_hex(3)}"
    started = time.monotonic()
    result = _run(
        [
            LGCA,
            "submit",
            "--spec",
            str(spec),
            "--address",
            cluster.dashboard_url,
            "--wait",
            "--working-dir",
            str(REPO),
            "--submission-id",
            job_id,
        ],
        cluster.env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == job_id
    assert "lgca: 6 images (0 already done), 6 rows written: 5 ok, 1 errors (decode_error 1)" in result.stdout
    assert f"job {job_id} SUCCEEDED" in result.stderr
    rows = _check_rows(output, images)
    print(f"lgca submit --wait: {time.monotonic() - started:.1f}s")

    # the command the cluster ran is the RayJob manifest's, up to the spec path
    submitted = cluster.get(f"/api/jobs/{job_id}")
    assert submitted["status"] == "SUCCEEDED"
    assert submitted["entrypoint"] == entrypoint(["--spec", str(spec)])
    rayjob_command, rayjob_spec = _rayjob_entrypoint()
    assert submitted["entrypoint"].replace(str(spec), rayjob_spec) == rayjob_command
    runtime = submitted["runtime_env"]
    assert runtime["working_dir"].startswith("gcs://") and "pip" not in runtime

    # status, logs and stop of the finished job
    status = _run([LGCA, "status", job_id, "--address", cluster.dashboard_url], cluster.env(), timeout=60)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id} SUCCEEDED"), status.stderr
    logs = _run([LGCA, "logs", job_id, "--address", cluster.dashboard_url], cluster.env(), timeout=60)
    assert logs.returncode == 0 and "6 rows written" in logs.stdout, logs.stderr
    stop = _run([LGCA, "stop", job_id, "--address", cluster.dashboard_url], cluster.env(), timeout=60)
    assert stop.returncode == 0 and "already ended (SUCCEEDED)" in stop.stderr, stop.stderr
    unknown = _run([LGCA, "status", "no-such-job", "--address", cluster.dashboard_url], cluster.env(), timeout=60)
    assert unknown.returncode == 2 and "no job no-such-job" in unknown.stderr, unknown.stderr

    # resubmitting with --resume finds every image done and writes nothing
    again = _run(
        [LGCA, "submit", "--spec", str(spec), "--resume", "--address", cluster.dashboard_url, "--wait", "--working-dir", str(REPO)],
        cluster.env(),
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "6 images (6 already done), 0 rows written" in again.stdout
    assert _rows(output) == rows


@pytest.mark.slow
def test_ray_job_submit_runs_the_same_entrypoint(cluster: TokenRayHead, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = _write_spec(tmp_path, images, output)
    job_id = f"ray-test-{secrets.token_hex(3)}"
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--working-dir",
        str(REPO),
        "--submission-id",
        job_id,
        "--",
        "python",
        ENTRYPOINT_SCRIPT,
        "--spec",
        str(spec),
    ]
    result = _run(command, cluster.env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "lgca: 6 images (0 already done), 6 rows written: 5 ok, 1 errors" in result.stdout
    _check_rows(output, images)
    assert cluster.get(f"/api/jobs/{job_id}")["entrypoint"] == entrypoint(["--spec", str(spec)])


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"executoin": {"batch_size": 4}}, "executoin"),
        ({"scoring": {"method": "lgca", "crop": 4}}, "crop"),
        ({"vocabulary": {}}, "labels"),
        ({"execution": {"batch_size": -3}}, "batch_size"),
        ({"storage_options": {"aws_secret_access_key": "x"}}, "aws_secret_access_key"),
    ],
    ids=["unknown-key", "unknown-section-key", "missing-labels", "negative-batch-size", "secret"],
)
def test_bad_spec_fails_before_submission(tmp_path: Path, body: dict[str, Any], named: str) -> None:
    spec = {"inputs": ["/data/images"], "output": "/data/out", "vocabulary": {"labels": "/data/labels.txt"}, **body}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.monotonic()
    result = _run([LGCA, "submit", "--spec", str(path), "--address", "http://127.0.0.1:1"], dict(os.environ), timeout=60)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and str(path) in result.stderr
    assert "cannot reach" not in result.stderr, "the spec must be refused before any connection"
    assert time.monotonic() - started < 20


def test_bad_run_arguments_fail_before_submission() -> None:
    result = _run(
        [
            LGCA,
            "submit",
            "--address",
            "http://127.0.0.1:1",
            "--",
            "/data/images",
            "--labels",
            "l.txt",
            "--output",
            "/data/out",
            "--batch-size",
            "0",
        ],
        dict(os.environ),
        timeout=60,
    )
    assert result.returncode == 2 and "batch_size" in result.stderr and "cannot reach" not in result.stderr
    secret = _run(
        [
            LGCA,
            "submit",
            "--address",
            "http://127.0.0.1:1",
            "--",
            "/data/images",
            "--labels",
            "l.txt",
            "--output",
            "/data/out",
            "--storage-option",
            "secret=abc",
        ],
        dict(os.environ),
        timeout=60,
    )
    assert secret.returncode == 2 and "looks like a secret" in secret.stderr
    neither = _run([LGCA, "submit", "--address", "http://127.0.0.1:1"], dict(os.environ), timeout=60)
    assert neither.returncode == 2 and "--spec FILE" in neither.stderr


def test_unreachable_address_fails_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(
        [LGCA, "submit", "--spec", str(REPO / "jobs" / "specs" / "gpu-fleet.yaml"), "--address", "http://127.0.0.1:1"],
        dict(os.environ),
        timeout=60,
    )
    assert result.returncode == 2
    assert "--address http://127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 20
    with pytest.raises(ClusterError, match="--address"):
        probe("http://127.0.0.1:1", timeout_s=2)


def test_runtime_env_ships_code_only() -> None:
    env = runtime_env(REPO)
    assert env == {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES}
    for excluded in (".git", ".venv", "/tests", "/out"):
        assert excluded in env["excludes"]
    pins = pinned_requirements()
    names = {pin.split("==")[0].split("[")[0].lower() for pin in pins}
    assert {"torch", "open_clip_torch", "pyarrow", "fsspec"} <= names
    assert "ray" not in names and "pytest" not in names, "Ray comes from the cluster; test extras stay out"
    assert all("==" in pin for pin in pins)
    assert runtime_env(REPO, pins)["pip"]["packages"] == pins


def test_entrypoint_quotes_arguments() -> None:
    assert entrypoint(["--spec", "jobs/specs/gpu-fleet.yaml"]) == "python jobs/label_images.py --spec jobs/specs/gpu-fleet.yaml"
    assert entrypoint(["my images/", "--labels", "l.txt"]) == "python jobs/label_images.py 'my images/' --labels l.txt"


class _RecordingClient:
    """Stands in for JobSubmissionClient: records the submission instead of sending it."""

    def __init__(self) -> None:
        self.submitted: dict[str, Any] = {}

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted = kwargs
        return kwargs["submission_id"]

    def get_address(self) -> str:
        return "http://head:8265"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--spec", "jobs/specs/gpu-fleet.yaml"], "python jobs/label_images.py --spec jobs/specs/gpu-fleet.yaml"),
        (["--spec", "jobs/specs/gpu-fleet.yaml", "--resume"], "python jobs/label_images.py --spec jobs/specs/gpu-fleet.yaml --resume"),
        (
            ["--", "s3://b/images/", "--labels", "s3://b/l.txt", "--output", "s3://b/out/", "--num-gpus", "1"],
            "python jobs/label_images.py s3://b/images/ --labels s3://b/l.txt --output s3://b/out/ --num-gpus 1",
        ),
    ],
    ids=["spec-in-repo", "spec-resume", "run-arguments"],
)
def test_submit_sends_the_entrypoint_and_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, arguments: list[str], expected: str
) -> None:
    client = _RecordingClient()
    monkeypatch.setattr(pipeline.cli.cluster, "connect", lambda address: client)
    monkeypatch.chdir(REPO)
    status = lgca_main(["submit", "--address", "http://head:8265", "--submission-id", "lgca-x", "--pip-pin", *arguments])
    assert status == 0
    assert capsys.readouterr().out.splitlines() == ["lgca-x"]
    assert client.submitted["entrypoint"] == expected
    assert client.submitted["submission_id"] == "lgca-x"
    runtime = client.submitted["runtime_env"]
    assert runtime["working_dir"] == str(REPO) and runtime["excludes"] == WORKING_DIR_EXCLUDES
    assert runtime["pip"]["packages"] == pinned_requirements()
