"""Shared benchmark helpers: synthetic JPEG folders, `lgca` command lines, a Ray cluster of the benchmark's own,
and `lgca run` timed with the peak RSS of its driver and workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tests" / "fixtures" / "lgca-tiny-vit.json")  # a real open_clip architecture, tiny (a config file)


def synthetic_jpegs(directory: Path, count: int, size: tuple[int, int] = (96, 72), seed: int = 0) -> Path:
    """`count` small distinct JPEGs under `directory` (1,000 per subfolder), reused if already there."""
    marker = directory / f".complete-{count}-{size[0]}x{size[1]}"
    if marker.exists():
        return directory
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = directory / f"{index // 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(folder / f"{index:07d}.jpg", quality=85)
    marker.touch()
    return directory


@dataclass(frozen=True)
class RunMeasurement:
    seconds: float
    returncode: int
    driver_peak_rss: int  # bytes
    worker_peak_rss: int  # bytes, the largest single Ray worker process
    stdout: str
    stderr: str


def measure(
    command: Sequence[str],
    env: dict[str, str],
    worker_roots: Sequence[psutil.Process] = (),
    interval_s: float = 0.25,
    timeout_s: float = 3600,
) -> RunMeasurement:
    """Run `command`, sampling the RSS of its process tree and of the trees under `worker_roots` (a Ray head's
    raylet, whose children are the workers) every `interval_s`."""
    started = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"driver": 0, "worker": 0}
    done = threading.Event()

    def sample() -> None:
        driver = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [driver, *driver.children(recursive=True)]
                workers = [c for root in worker_roots for c in root.children(recursive=True)]
                peaks["driver"] = max(peaks["driver"], driver.memory_info().rss)
                for worker in tree[1:] + workers:
                    try:
                        if "ray::" in " ".join(worker.cmdline()[:1]) or worker in workers:
                            peaks["worker"] = max(peaks["worker"], worker.memory_info().rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            except psutil.NoSuchProcess:
                return
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    finally:
        done.set()
        sampler.join()
    return RunMeasurement(time.perf_counter() - started, process.returncode, peaks["driver"], peaks["worker"], stdout, stderr)


def ray_workers_root(temp_dir: str) -> list[psutil.Process]:
    """The raylet of the Ray head started with `temp_dir`: its children are the worker processes."""
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        try:
            cmdline = process.info["cmdline"] or []
            if "raylet" in (process.info["name"] or "") and any(temp_dir in part for part in cmdline):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def megabytes(value: int) -> float:
    return value / 2**20


def venv_bin() -> Path:
    return Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def lgca_command(
    command: str,
    inputs: str | Path,
    labels: str | Path,
    output: str | Path,
    *flags: str,
    model: str = TINY_MODEL,
    pretrained: str = "random",
) -> list[str]:
    """`lgca COMMAND INPUTS --labels ... --output ... --model ... --pretrained ... FLAGS`, for `run` or `plan`."""
    named = ["--labels", str(labels), "--output", str(output), "--model", model, "--pretrained", pretrained]
    return [str(venv_bin() / "lgca"), command, str(inputs), *named, *flags]


@dataclass(frozen=True)
class Cluster:
    address: str  # the GCS address `lgca --address` joins
    temp_dir: str  # its session folder: `ray_workers_root(temp_dir)` finds the raylet

    def env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster."""
        return {**os.environ, **_CLUSTER_ENV, "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"}


_CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # a throwaway local cluster: no token


@contextmanager
def local_cluster(num_cpus: int) -> Iterator[Cluster]:
    """A Ray cluster on this machine, started by this process (`ray.init`) for the `lgca` drivers it runs, and ended
    with every process of it on exit. Its session folder is a fresh one, so other Ray instances stay untouched."""
    import ray

    os.environ.update(_CLUSTER_ENV)
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must stay under ~107 bytes
    ray.init(  # "local": a new cluster, whatever RAY_ADDRESS says
        address="local",
        num_cpus=num_cpus,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    try:
        yield Cluster(ray.get_runtime_context().gcs_address, temp_dir)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
