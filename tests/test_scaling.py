"""Memory stays flat as the job grows: driver and worker peak RSS for 200 and 2,000 images on a real Ray head."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .ray_head import RayHead
from .tiny import TINY_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
from benchlib import measure, megabytes, ray_workers_root, synthetic_jpegs

LGCA = str(Path(sys.executable).with_name("lgca"))
GROWTH_ALLOWED = 1.25  # 10x the images may cost at most 25% more peak memory


@pytest.mark.slow
def test_peak_memory_is_flat_from_200_to_2000_images(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    results = {}
    with RayHead() as head:
        for count in (200, 2000):
            images = synthetic_jpegs(tmp_path / f"images{count}", count)
            command = [
                LGCA,
                "run",
                str(images),
                "--labels",
                str(labels),
                "--output",
                str(tmp_path / f"out{count}"),
                "--model",
                TINY_MODEL,
                "--pretrained",
                "random",
                "--method",
                "clip",
                "--address",
                head.address,
                "--rows-per-file",
                "500",
            ]
            run = measure(command, head.env(), ray_workers_root(head.temp_dir))
            assert run.returncode == 0, run.stderr[-3000:]
            assert f"{count} rows written: {count} ok" in run.stdout
            results[count] = run
    with capsys.disabled():
        print("\npeak RSS (MiB)   images  driver  largest worker  seconds")
        for count, run in results.items():
            print(
                f"                 {count:6d}  {megabytes(run.driver_peak_rss):6.0f}  {megabytes(run.worker_peak_rss):14.0f}"
                f"  {run.seconds:7.1f}"
            )
    small, large = results[200], results[2000]
    assert large.driver_peak_rss <= GROWTH_ALLOWED * small.driver_peak_rss
    assert large.worker_peak_rss <= GROWTH_ALLOWED * small.worker_peak_rss
