"""Tests of run.progress and pipeline.progress: counts over the plan's true total, the rate and the time left."""

from __future__ import annotations

import io
import re

from pipeline.progress import ProgressLine, duration
from pipeline.run.plan_progress import Progress


def test_a_runs_progress_counts_to_the_plans_total_and_not_beyond():
    stream = io.StringIO()
    progress = Progress(images=200, shards=10, done_images=40, done_shards=2, stream=stream, interval_s=0)
    for _ in range(8):  # the 8 shards this run commits
        progress.committed({"ok": 19, "decode_error": 1})
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 8
    assert lines[0].startswith("lgca: 60/200 images (30.0%), 3/10 shards; ok 19, failed 1 this run;")
    assert lines[-1].startswith("lgca: 200/200 images (100.0%), 10/10 shards; ok 152, failed 8 this run;")
    assert lines[-1].endswith("ETA 0s")


def test_a_progress_line_gives_rate_and_time_left():
    stream = io.StringIO()
    meter = ProgressLine("lgca report: thumbnails", 400, "images", stream=stream, interval_s=0)
    meter.advance(100)
    line = stream.getvalue().strip()
    assert re.fullmatch(r"lgca report: thumbnails: 100/400 images \(25\.0%\), [\d.e+]+ images/s, ETA \d+s", line), line
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_tars_counted_as_they_are_read_give_an_estimate_or_an_eta_by_shards():
    stream = io.StringIO()
    estimated = Progress(images=0, shards=4, done_images=0, done_shards=0, stream=stream, interval_s=0, uncounted=4, estimate=400)
    estimated.committed({"ok": 99, "read_error": 1})
    assert stream.getvalue().startswith("lgca: 100/~400 images (estimated from img2dataset's statistics), 1/4 shards;")
    stream = io.StringIO()
    by_shards = Progress(images=0, shards=4, done_images=0, done_shards=0, stream=stream, interval_s=0, uncounted=4)
    by_shards.committed({"ok": 100})
    line = stream.getvalue()
    assert line.startswith("lgca: 100 images so far (tars are counted as they are read), 1/4 shards;") and "(by shards)" in line
