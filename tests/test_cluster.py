"""Cluster submission: `lgca submit` and `ray job submit` against a real Ray head on loopback, and the checks that run before submission."""

from __future__ import annotations

import importlib.util
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
import pipeline.run.job
import pipeline.run.manifest_record
import pipeline.run.prepare
from pipeline import __version__
from pipeline.cli.main import main as lgca_main
from pipeline.config import ConfigError
from pipeline.run.cluster_address import check_address, join_failure
from pipeline.run.submit import (
    COMMIT_VARIABLE,
    ENTRYPOINT_SCRIPT,
    WORKING_DIR_EXCLUDES,
    ClusterError,
    entrypoint,
    in_ray_working_dir_copy,
    missing_package_hint,
    pinned_requirements,
    probe,
    runtime_env,
    working_tree_commit,
)

from .ray_head import RAY, RayHead
from .support import LGCA, TINY_MODEL, labels_file, lgca_run

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ("cat", "dog", "rocket")
IMAGE_SIZES = {"wide.png": (96, 64), "tall.jpg": (64, 96), "square.png": (50, 50), "pano.jpg": (120, 40), "small.png": (40, 36)}
BROKEN = "broken.jpg"  # bytes that are no image: its row must come out as decode_error
JOB_TIMEOUT_S = 240
FAST_FAIL_S = 30  # a cold `lgca` process imports torch and Ray: ~10 s here, more on a loaded 2-core machine
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
    labels = labels_file(directory, CLASSES)
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
@pytest.mark.integration
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
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["code_version"] == f"{__version__}+{working_tree_commit(REPO)}", "the job ran a copy without .git"
    print(f"lgca submit --wait: {time.monotonic() - started:.1f}s")

    # the command the cluster ran is the RayJob manifest's, up to the spec path
    submitted = cluster.get(f"/api/jobs/{job_id}")
    assert submitted["status"] == "SUCCEEDED"
    assert submitted["entrypoint"] == entrypoint(["--spec", str(spec)])
    rayjob_command, rayjob_spec = _rayjob_entrypoint()
    assert submitted["entrypoint"].replace(str(spec), rayjob_spec) == rayjob_command
    runtime = submitted["runtime_env"]
    assert runtime["working_dir"].startswith("gcs://") and "pip" not in runtime
    assert runtime["env_vars"] == {COMMIT_VARIABLE: working_tree_commit(REPO)}

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
@pytest.mark.integration
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
@pytest.mark.integration
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


@pytest.mark.integration
def test_bad_run_arguments_fail_before_submission() -> None:
    def submit(*options: str) -> subprocess.CompletedProcess:
        run_arguments = ["/data/images", "--labels", "l.txt", "--output", "/data/out", *options]
        return _run([LGCA, "submit", "--address", "http://127.0.0.1:1", "--", *run_arguments], dict(os.environ), timeout=60)

    result = submit("--batch-size", "0")
    assert result.returncode == 2 and "batch_size" in result.stderr and "cannot reach" not in result.stderr
    secret = submit("--storage-option", "secret=abc")
    assert secret.returncode == 2 and "looks like a secret" in secret.stderr
    neither = _run([LGCA, "submit", "--address", "http://127.0.0.1:1"], dict(os.environ), timeout=60)
    assert neither.returncode == 2 and "--spec FILE" in neither.stderr


@pytest.mark.integration
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
@pytest.mark.integration
def test_submit_sends_the_entrypoint_and_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, arguments: list[str], expected: str
) -> None:
    client = _RecordingClient()
    monkeypatch.setattr(pipeline.cli.cluster, "connect", lambda address: client)
    monkeypatch.chdir(REPO)
    status = lgca_main(["submit", "--address", "http://head:8265", "--submission-id", "lgca-x", "--pip-pin", *arguments])
    assert status == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines() == ["lgca-x"]
    assert "about 5 GB per node" in printed.err, "--pip-pin says what it costs"
    assert client.submitted["entrypoint"] == expected
    assert client.submitted["submission_id"] == "lgca-x"
    runtime = client.submitted["runtime_env"]
    assert runtime["working_dir"] == str(REPO) and runtime["excludes"] == WORKING_DIR_EXCLUDES
    assert runtime["pip"]["packages"] == pinned_requirements()
    commit = working_tree_commit(REPO)
    assert commit and runtime["env_vars"] == {COMMIT_VARIABLE: commit}, "the job records the shipped tree's commit"


# ---------------------------------------------------------------- what `lgca run --address` and the job refuse


def _lgca_run(images: Path, output: Path, address: str) -> list[str]:
    return lgca_run(images, labels_file(output.parent, CLASSES), output, "--address", address)


def _without_token(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}


ADDRESS_CASES = {
    # case: (address from the head, environment from the head's, words the message must hold)
    "dashboard-port": (
        lambda h: f"127.0.0.1:{h.dashboard_port}",
        lambda h: h.env(),
        ["answers HTTP", "GCS", "lgca submit --address http://"],
    ),
    "ray-client": (lambda h: f"ray://{h.address}", lambda h: h.env(), ["Ray Client", "lgca submit", "6379"]),
    "no-token": (
        lambda h: h.address,
        lambda h: _without_token(h.env()),
        ["requires token authentication", "RAY_AUTH_TOKEN", "address itself is right"],
    ),
    "wrong-token": (lambda h: h.address, lambda h: {**h.env(), "RAY_AUTH_TOKEN": "0" * 64}, ["rejected this process's auth token"]),
}


@pytest.mark.parametrize("case", list(ADDRESS_CASES))
@pytest.mark.integration
def test_lgca_run_refuses_an_unusable_address_in_seconds(cluster: TokenRayHead, images: Path, tmp_path: Path, case: str) -> None:
    """Against a real head. Before, the dashboard port hung, ray:// went to Ray Client (under which Ray Data fails),
    and a token problem waited 20 s to blame the address; now exit 2 names the fix before any cluster work."""
    address, environment, words = ADDRESS_CASES[case]
    output = tmp_path / "out"
    ray_tmp = tmp_path / "ray-tmp"
    env = {**environment(cluster), "RAY_TMPDIR": str(ray_tmp)}  # a Ray started here would create this folder
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = _run(_lgca_run(images, output, address(cluster)), env, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    for word in words:
        assert word in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "check --address" not in result.stderr, result.stderr[-2000:]
    assert not output.exists() and not ray_tmp.exists(), "nothing may start before the address is known to work"
    assert elapsed < FAST_FAIL_S, elapsed
    print(f"lgca run --address ({case}): exit 2 in {elapsed:.1f}s")


@pytest.mark.integration
def test_the_right_token_passes_the_address_check(cluster: TokenRayHead) -> None:
    code = "import sys; from pipeline.run.cluster_address import check_address; check_address(sys.argv[1], 3.0)"
    env = cluster.env()
    env.pop("RAY_ADDRESS")
    result = _run([sys.executable, "-c", code, cluster.address], env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("ray://127.0.0.1:1", ["Ray Client", "lgca submit --address http://HEAD:8265"]),
        ("http://127.0.0.1:1", ["dashboard URL", "lgca submit --address http://127.0.0.1:1"]),
        ("127.0.0.1:1", ["cannot reach", "check --address", "6379"]),
    ],
    ids=["ray-client", "dashboard-url", "nothing-listens"],
)
def test_address_shapes_are_refused_without_ray(address: str, words: list[str]) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        pipeline.run.prepare.check_address_fast(address)
    for word in words:
        assert word in str(refused.value)
    assert time.monotonic() - started < 5
    check_address("auto", 1.0)  # a cluster node's own address is ray.init's to resolve
    check_address(None, 1.0)


def test_join_failure_tells_a_missing_token_from_a_wrong_address() -> None:
    from ray.exceptions import AuthenticationError

    missing = join_failure("auto", AuthenticationError("Token authentication is enabled but no authentication token was found"), 1.0)
    assert "no authentication token was found" in missing and "RAY_AUTH_TOKEN" in missing and "check --address" not in missing
    unreachable = join_failure("127.0.0.1:1", ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1"), 1.0)
    assert "check --address" in unreachable


def _spec_with_output(tmp_path: Path, output: str) -> Path:
    spec = {"inputs": ["s3://bucket/images/"], "output": output, "vocabulary": {"labels": "s3://bucket/labels.txt"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("form", ["spec", "run-arguments"])
def test_submit_refuses_a_relative_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, form: str
) -> None:
    def no_connection(address: str) -> None:
        raise AssertionError("a relative output must be refused before connecting")

    monkeypatch.setattr(pipeline.cli.cluster, "connect", no_connection)
    monkeypatch.chdir(REPO)
    if form == "spec":
        arguments = ["--spec", str(_spec_with_output(tmp_path, "out/labels"))]
    else:
        arguments = ["--", "s3://bucket/images/", "--labels", "s3://bucket/labels.txt", "--output", "out/labels"]
    assert lgca_main(["submit", "--address", "http://head:8265", *arguments]) == 2
    message = capsys.readouterr().err
    assert "output out/labels is a relative path" in message and "Ray deletes" in message
    assert str(REPO / "out" / "labels") in message, "the message offers the absolute path"


def _label_images_module() -> Any:
    spec = importlib.util.spec_from_file_location("label_images", REPO / ENTRYPOINT_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_in_rays_copy_of_the_working_dir_refuses_a_relative_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    label_images = _label_images_module()
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    spec = _spec_with_output(copy, "out/labels")
    monkeypatch.setattr(pipeline.run.job, "run", lambda *a: pytest.fail("the job must not run"))
    monkeypatch.chdir(copy)
    assert in_ray_working_dir_copy() and not in_ray_working_dir_copy(REPO)
    assert label_images.main(["--spec", str(spec)]) == 2
    assert "is a relative path" in capsys.readouterr().err


def _ray_wrapped(error: BaseException, how: str) -> BaseException:
    from ray.exceptions import RaySystemError, RayTaskError

    if how == "driver":
        return error
    if how == "task":  # a worker's exception as ray.get raises it: an instance of both RayTaskError and the cause's type
        return RayTaskError("_read_and_decode", f"Traceback ...\n{type(error).__name__}: {error}", error).as_instanceof_cause()
    return RaySystemError(error)  # an object a worker could not deserialise: "System error: No module named ..."


@pytest.mark.parametrize("how", ["driver", "task", "system"])
@pytest.mark.parametrize(("module", "fix"), [("pipeline", "lgca submit"), ("open_clip", "infra/Dockerfile")], ids=["code", "dependency"])
def test_job_names_the_fix_for_a_module_missing_on_the_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, how: str, module: str, fix: str
) -> None:
    label_images = _label_images_module()
    error = _ray_wrapped(ModuleNotFoundError(f"No module named '{module}'", name=module), how)

    def missing(*args: Any) -> None:
        raise error

    monkeypatch.setattr(pipeline.run.job, "run", missing)
    assert label_images.main(["--spec", str(_spec_with_output(tmp_path, "s3://bucket/out/"))]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"`{module}`" in last and fix in last, last
    assert missing_package_hint(ValueError("not an import")) is None


def test_job_lets_other_errors_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    label_images = _label_images_module()

    def broken(*args: Any) -> None:
        raise ValueError("a bug, not a missing module")

    monkeypatch.setattr(pipeline.run.job, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        label_images.main(["--spec", str(_spec_with_output(tmp_path, "s3://bucket/out/"))])


@pytest.mark.integration
def test_code_version_names_the_shipped_commit_without_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary: a submitted job's copy has no .git either
    monkeypatch.delenv(COMMIT_VARIABLE, raising=False)
    assert pipeline.run.manifest_record.code_version() == __version__
    monkeypatch.setenv(COMMIT_VARIABLE, "abc1234")
    assert pipeline.run.manifest_record.code_version() == f"{__version__}+abc1234"
    assert working_tree_commit(tmp_path) == ""
