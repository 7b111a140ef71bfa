"""Tests of review.stats, summary, thumbnails and report: statistics, the terminal summary, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from pipeline.review.output_dir import CurationError, open_output
from pipeline.review.report import LEVEL_COLOURS, write_report
from pipeline.review.stats import collect_stats
from pipeline.review.summary import format_summary
from pipeline.review.thumbnails import make_thumbnail

from .outputs import (  # noqa: F401 - fixtures are used by name
    SYNTHETIC_CLASSES,
    HeadlessChromium,
    big_output,
    chromium,
    chromium_or_skip,
    measure,
    real_run,
    sample_images,
    synthetic_rows,
    write_output,
)

COLOUR_TOLERANCE = 40  # per channel: JPEG-free solid borders render exactly; leave room for antialiased edges


def _parquet_counts(output_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    table = pq.read_table(output_dir, columns=["status", "label"])
    statuses = dict(zip(*(pc.value_counts(table.column("status")).field(f).to_pylist() for f in ("values", "counts"))))
    labels = table.filter(pc.equal(table.column("status"), "ok")).column("label")
    return statuses, dict(zip(*(pc.value_counts(labels).field(f).to_pylist() for f in ("values", "counts"))))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def _near(pixel, colour, tolerance: int = COLOUR_TOLERANCE) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


# ---------------------------------------------------------------- statistics and summary


def test_stats_match_the_parquet(real_run):
    output = open_output(str(real_run))
    stats = collect_stats(output)
    statuses, labels = _parquet_counts(real_run)
    assert stats.rows == sum(statuses.values()) == 7
    assert {s: n for s, n in stats.status_counts.items() if n} == statuses
    assert {i.label: i.count for i in stats.labels} == labels
    assert sum(stats.score_histogram) == statuses["ok"]
    boxes = pq.read_table(real_run, columns=["boxes"]).column("boxes").to_pylist()
    assert stats.boxes == sum(len(b or ()) for b in boxes)
    assert [key for key, _ in stats.error_examples["decode_error"]] == ["broken.jpg"]
    assert stats.manifest_mismatch == []


def test_summary_prints_aligned_tables(real_run, capsys):
    assert cli.main(["summary", str(real_run)]) == 0
    text = capsys.readouterr().out
    statuses, labels = _parquet_counts(real_run)
    for status, count in statuses.items():
        assert re.search(rf"^{status}\s+{count}\s+", text, re.M)
    assert re.search(rf"^total\s+{sum(statuses.values())}\s+100.0%", text, re.M)
    for label, count in labels.items():
        assert re.search(rf"^{label}\s+{count}\s+", text, re.M)
    assert "broken.jpg" in text and "lgca-tiny-vit" in text and "complete (_SUCCESS present)" in text
    header = next(line for line in text.splitlines() if line.startswith("status"))
    assert [m.start() for m in re.finditer(r"\S+", header)][:2] == [0, header.index("rows")]


def test_summary_flags_manifest_disagreement_and_incomplete_runs(tmp_path):
    out = write_output(tmp_path / "out", synthetic_rows(60, sample_images(tmp_path / "images", 2)), success=False)
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["counts"]["ok"] += 5
    (out / "_manifest.json").write_text(json.dumps(manifest))
    output = open_output(str(out))
    text = format_summary(output, collect_stats(output))
    assert "INCOMPLETE: no _SUCCESS" in text
    assert "WARNING: _manifest.json disagrees with the Parquet files (ok: manifest" in text


def test_report_refuses_non_outputs(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert cli.main(["report", str(tmp_path / "photos"), "--out", str(tmp_path / "r.html")]) == cli.EXIT_CONFIG
    assert "not an lgca output directory" in capsys.readouterr().err
    out = write_output(tmp_path / "out", synthetic_rows(5, sample_images(tmp_path / "images", 1)))
    with pytest.raises(CurationError, match="must be a local file"):
        write_report(open_output(str(out)), "s3://bucket/report.html")


def test_thumbnails_are_upright_and_bounded(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (400, 300), (255, 0, 0))
    image.paste((0, 0, 255), (200, 0, 400, 300))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: upright, red is on top
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    data, width, height = make_thumbnail(path.read_bytes(), 64)
    thumb = Image.open(__import__("io").BytesIO(data)).convert("RGB")
    assert (width, height) == thumb.size == (48, 64)
    assert _near(thumb.getpixel((24, 8)), (255, 0, 0)) and _near(thumb.getpixel((24, 56)), (0, 0, 255))
    with pytest.raises(ValueError, match="not a recognised image format"):
        make_thumbnail(b"plain text", 64)


def test_rerun_replaces_only_its_own_thumbnails(real_run, tmp_path):
    thumbs = tmp_path / "report_thumbnails"
    thumbs.mkdir()
    (thumbs / "0123456789abcdef.jpg").write_bytes(b"stale")
    (thumbs / "keep-me.txt").write_text("not ours")
    summary = write_report(open_output(str(real_run)), tmp_path / "report.html", thumbnails_per_label=2)
    names = sorted(p.name for p in thumbs.iterdir())
    assert "0123456789abcdef.jpg" not in names and "keep-me.txt" in names
    assert summary.thumbnails == len(names) - 1 == min(2, 6) * len(_parquet_counts(real_run)[1])


def test_gallery_embeds_each_labels_lowest_confidence_share_above_the_cap(tmp_path):
    rows = synthetic_rows(500, sample_images(tmp_path / "images", 2))
    out = write_output(tmp_path / "out", rows)
    write_report(open_output(str(out)), tmp_path / "r.html", thumbnails_per_label=3, max_gallery_rows=100)
    data = json.loads(re.search(r'id="lgca-data">(.*?)</script>', (tmp_path / "r.html").read_text(), re.S).group(1))
    ok = [r for r in rows if r["status"] == "ok"]
    for group in data["groups"]:
        label = data["classes"][group["label"]]
        scores = sorted(r["score"] for r in ok if r["label"] == label)
        assert group["count"] == len(scores)
        assert len(group["keys"]) == min(len(scores), max(3, 100 * len(scores) // len(ok)))
        assert group["scores"] == [round(s, 3) for s in scores[: len(group["keys"])]]  # the lowest ones, in order
    assert len(data["thumbs"]) == 3 * len(data["groups"])


# ---------------------------------------------------------------- in Chromium


def _open_report(browser: HeadlessChromium, html_path: Path) -> None:
    browser.open(html_path.as_uri())
    browser.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")


def test_report_in_chromium_shows_the_parquet_counts_and_draws_boxes(real_run, tmp_path, chromium):
    summary = write_report(open_output(str(real_run)), tmp_path / "report.html")
    statuses, labels = _parquet_counts(real_run)
    assert summary.thumbnails == statuses["ok"] and summary.thumbnail_failures == 0
    _open_report(chromium, tmp_path / "report.html")

    shown = chromium.evaluate("""(() => {
        const text = id => { const e = document.getElementById(id); return e && e.textContent; };
        const labels = {};
        document.querySelectorAll('[data-label-count]').forEach(e => labels[e.dataset.labelCount] = Number(e.textContent));
        return {rows: text('count-rows'), ok: text('count-ok'), decode: text('count-decode_error'),
                read: text('count-read_error'), score: text('count-score_error'), labels,
                errors: text('errors-decode_error'), cards: document.querySelectorAll('.card').length,
                gallery: document.getElementById('gallery-status').dataset.count,
                keys: Array.from(document.querySelectorAll('.errors td.key')).map(e => e.textContent)};
    })()""")
    assert int(shown["rows"]) == sum(statuses.values())
    assert int(shown["ok"]) == statuses["ok"] and int(shown["decode"]) == statuses["decode_error"]
    assert int(shown["read"]) == int(shown["score"]) == 0
    assert shown["labels"] == labels and int(shown["errors"]) == statuses["decode_error"]
    assert shown["keys"] == ["broken.jpg"]
    top_label = max(labels, key=labels.get)
    assert int(shown["gallery"]) == labels[top_label] and shown["cards"] == min(24, labels[top_label])

    # The first card (lowest confidence of the first label): its boxes sit where the Parquet says.
    layout = chromium.evaluate("""(() => {
        const card = document.querySelector('.card');
        card.scrollIntoView({block: 'center'});
        const frame = card.querySelector('.frame').getBoundingClientRect();
        const boxes = Array.from(card.querySelectorAll('.box')).map(b => {
            const r = b.getBoundingClientRect();
            return {level: Number(b.dataset.level), left: r.left, top: r.top, width: r.width, height: r.height};
        });
        return {key: card.dataset.key, frame: {left: frame.left, top: frame.top, width: frame.width, height: frame.height}, boxes};
    })()""")
    table = pq.read_table(real_run).to_pylist()
    row = next(r for r in table if r["key"] == layout["key"])
    assert row["score"] == min(r["score"] for r in table if r["label"] == top_label)
    frame = layout["frame"]
    assert abs(frame["width"] / frame["height"] - row["width"] / row["height"]) < 0.03
    shot = chromium.screenshot()
    assert sorted(b["level"] for b in layout["boxes"]) == sorted(b["level"] for b in row["boxes"])
    for box in row["boxes"]:
        drawn = next(b for b in layout["boxes"] if b["level"] == box["level"])
        assert abs(drawn["left"] - (frame["left"] + box["x0"] * frame["width"])) <= 1.5
        assert abs(drawn["top"] - (frame["top"] + box["y0"] * frame["height"])) <= 1.5
        assert abs(drawn["width"] - (box["x1"] - box["x0"]) * frame["width"]) <= 1.5
        colour = _rgb(LEVEL_COLOURS[box["level"]])
        # The middle of the 3-pixel left border, halfway down the box, has the level's colour.
        x = round(drawn["left"] + 1)
        y = round(drawn["top"] + drawn["height"] / 2)
        assert _near(shot.getpixel((x, y)), colour), (box["level"], shot.getpixel((x, y)), colour)
    # The level-0 box is on top where boxes overlap: its top-left corner shows its own colour.
    level0 = next(b for b in layout["boxes"] if b["level"] == 0)
    assert _near(shot.getpixel((round(level0["left"] + 1), round(level0["top"] + 1))), _rgb(LEVEL_COLOURS[0]))
    assert chromium.console_errors() == []


def test_report_in_chromium_escapes_hostile_text_and_survives_missing_images(tmp_path, chromium):
    images = sample_images(tmp_path / "images", 2)
    rows = synthetic_rows(100, images + [str(tmp_path / "images" / "gone.jpg")])
    rows[0]["key"] = "</script><img src=x onerror=alert(1)>.jpg"
    rows[49]["error_message"] = "<b>bold</b> & </script> stays text"
    out = write_output(tmp_path / "out", rows)
    summary = write_report(open_output(str(out)), tmp_path / "r.html", thumbnails_per_label=100)
    assert summary.thumbnail_failures > 0
    _open_report(chromium, tmp_path / "r.html")
    state = chromium.evaluate("""(() => {
        const select = document.getElementById('gallery-label');
        const cards = [];
        for (const option of select.options) {
            select.value = option.value;
            select.dispatchEvent(new Event('change'));
            document.querySelectorAll('.card').forEach(c => cards.push({key: c.dataset.key,
                failed: c.querySelector('.placeholder') ? c.querySelector('.placeholder').textContent : null}));
        }
        return {cards, message: Array.from(document.querySelectorAll('.errors td')).map(e => e.textContent),
                injected: document.querySelectorAll('img[src="x"], b').length};
    })()""")
    assert state["injected"] == 0
    assert "<b>bold</b> & </script> stays text" in state["message"]
    assert any(c["key"] == rows[0]["key"] for c in state["cards"])
    failed = [c for c in state["cards"] if c["failed"]]
    assert failed and all("thumbnail failed: FileNotFoundError" in c["failed"] for c in failed)
    assert chromium.console_errors() == []


@pytest.fixture(scope="module")
def big_report(big_output, tmp_path_factory) -> tuple[Path, dict, dict]:
    """`lgca report` of the 100k-row output, run in a fresh process: the HTML path, its figures, the baseline's."""
    html = tmp_path_factory.mktemp("big-report") / "big.html"
    baseline = measure([])
    result = measure(["report", str(big_output), "--out", str(html), "--thumbnails-per-label", "24"])
    return html, result, baseline


def test_report_100k_rows_in_bounded_time_and_memory(big_report):
    html, result, baseline = big_report
    growth = result["peak_rss_mb"] - baseline["peak_rss_mb"]
    print(
        f"\nreport 100k rows: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(+{growth:.0f} MB over a bare import, {baseline['peak_rss_mb']:.0f} MB); HTML {html.stat().st_size / 1e6:.1f} MB; "
        f"{result['output'].strip()}"
    )
    assert result["seconds"] < 60 and growth < 1536
    assert "lgca report: 100000 rows, 240 thumbnails in" in result["output"]  # 10 labels x 24, none failed


def test_report_100k_rows_pages_in_chromium(big_output, big_report, chromium):
    import time

    statuses, labels = _parquet_counts(big_output)
    started = time.monotonic()
    _open_report(chromium, big_report[0])
    loaded = time.monotonic() - started
    first = max(labels, key=labels.get)
    shown = chromium.evaluate("""(() => {
        const next = document.getElementById('gallery-next');
        const seen = new Set();
        const collect = () => document.querySelectorAll('.card').forEach(c => seen.add(c.dataset.key));
        let pages = 1;
        const t0 = performance.now();
        collect();
        while (!next.disabled) { next.click(); pages += 1; collect(); }
        return {ok: document.getElementById('count-ok').textContent, rows: document.getElementById('count-rows').textContent,
                pages, seen: seen.size, ms: performance.now() - t0,
                placeholders: document.querySelectorAll('.placeholder').length};
    })()""")
    print(
        f"\nChromium: loaded the 100k-row report in {loaded:.1f} s; paged through {shown['pages']} pages "
        f"({shown['seen']} rows of '{first}') in {shown['ms']:.0f} ms"
    )
    assert int(shown["ok"]) == statuses["ok"] and int(shown["rows"]) == 100_000
    assert shown["seen"] == labels[first] and shown["pages"] == -(-labels[first] // 24)
    assert shown["placeholders"] > 0  # last page: beyond the thumbnailed rows
    assert chromium.console_errors() == []


def test_report_cli_writes_one_file_and_a_thumbnail_folder(real_run, tmp_path, capsys):
    out = tmp_path / "site" / "report.html"
    assert cli.main(["report", str(real_run), "--out", str(out), "--thumbnails-per-label", "3", "--page-size", "12"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("lgca report: 7 rows, 3 thumbnails") and str(out) in line
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report_thumbnails"]
    html = out.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing fetched from a network
    data = json.loads(re.search(r'<script type="application/json" id="lgca-data">(.*?)</script>', html, re.S).group(1))
    assert data["pageSize"] == 12 and all(t["src"].startswith("report_thumbnails/") for t in data["thumbs"].values())
    assert cli.main(["report", str(real_run), "--out", str(out), "--thumbnails-per-label", "0"]) == 0
    assert "0 thumbnails" in capsys.readouterr().out and not list((out.parent / "report_thumbnails").iterdir())


def test_report_modules_import_neither_torch_nor_ray():
    code = "import sys, pipeline.review.report, pipeline.review.summary; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_report_reads_output_and_images_from_s3(s3_bucket, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    local_images = sample_images(tmp_path / "images", 2)
    for path in local_images:
        fs.put(path, f"{s3_bucket[5:]}/images/{Path(path).name}")
    remote_images = [f"{s3_bucket}/images/{Path(p).name}" for p in local_images]
    local = write_output(tmp_path / "out", synthetic_rows(40, remote_images, classes=SYNTHETIC_CLASSES[:2]), rows_per_file=16)
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/run/", recursive=True)
    options = [f"--storage-option=endpoint_url={s3_server.endpoint_url}", "--storage-option=key=testing", "--storage-option=secret=testing"]
    out = tmp_path / "report.html"
    assert cli.main(["report", f"{s3_bucket}/run", "--out", str(out), "--thumbnails-per-label", "5", *options]) == 0
    data = json.loads(re.search(r'id="lgca-data">(.*?)</script>', out.read_text(), re.S).group(1))
    assert len(data["thumbs"]) == 10 and not [t for t in data["thumbs"].values() if "error" in t]
    assert all(t["path"].startswith(s3_bucket) for t in data["thumbs"].values())
