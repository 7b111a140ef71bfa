"""Memory stays flat as the job grows: driver and worker peak RSS for 200 and 2,000 images on a real Ray cluster,
measured by the benchmark that measures it at scale (`jobs/bench_pipeline.py scaling`), run as its users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ExecutionConfig

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench_pipeline.py"
GROWTH_ALLOWED = 1.25  # 10x the images may cost at most 25% more peak memory


@pytest.mark.slow
@pytest.mark.integration
def test_peak_memory_is_flat_from_200_to_2000_images(tmp_path, capsys):
    results = tmp_path / "scaling.json"
    command = [sys.executable, str(BENCH), "--json", str(results), "scaling", "--sizes", "200", "2000", "--num-cpus", "2"]
    defaults = ExecutionConfig()  # lgca run's own batch sizes (the benchmark's are larger), and 500 rows per file
    command += [
        "--workdir",
        str(tmp_path),
        "--batch-size",
        str(defaults.batch_size),
        "--decode-batch-size",
        str(defaults.decode_batch_size),
    ]
    command += ["--rows-per-file", "500"]
    bench = subprocess.run(command, capture_output=True, text=True, timeout=570)
    assert bench.returncode == 0, bench.stderr[-3000:]  # it exits 1 unless every image got its one ok row
    runs = {row["images"]: row for row in json.loads(results.read_text())}
    assert {count: (run["rows_written"], run["ok"]) for count, run in runs.items()} == {200: (200, 200), 2000: (2000, 2000)}
    with capsys.disabled():
        print("\npeak RSS (MiB)   images  driver  largest worker  seconds")
        for count, run in runs.items():
            print(
                f"                 {count:6d}  {run['driver_peak_rss_mib']:6.0f}  {run['worker_peak_rss_mib']:14.0f}  {run['wall_s']:7.1f}"
            )
    small, large = runs[200], runs[2000]
    assert large["driver_peak_rss_mib"] <= GROWTH_ALLOWED * small["driver_peak_rss_mib"]
    assert large["worker_peak_rss_mib"] <= GROWTH_ALLOWED * small["worker_peak_rss_mib"]
