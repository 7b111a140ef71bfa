"""Shared benchmark helpers: synthetic JPEG folders, and `lgca run` timed with the peak RSS of its driver and workers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


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
    return Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[1] / ".venv")) / "bin"
