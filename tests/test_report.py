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
from pipeline.review.gallery import gallery_rows, thumbnail_order
from pipeline.review.output_dir import CurationError, open_output
from pipeline.review.report import LEVEL_COLOURS, image_link, write_report
from pipeline.review.stats import collect_stats
from pipeline.review.summary import format_summary
from pipeline.review.thumbnails import make_thumbnail

from .outputs import (  # noqa: F401 - fixtures are used by name
    CLASSES,
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


def test_rerun_keeps_its_thumbnails_and_removes_only_its_stale_files(real_run, tmp_path):
    files = tmp_path / "report_files"
    (files / "thumbs").mkdir(parents=True)
    (files / "thumbs" / "0123456789abcdef.jpg").write_bytes(b"stale")
    (files / "thumbs" / "keep-me.txt").write_text("not ours")
    (files / "rows").mkdir()
    (files / "rows" / "rows-00099.js").write_text("stale")
    summary = write_report(open_output(str(real_run)), tmp_path / "report.html")
    statuses, _ = _parquet_counts(real_run)
    names = sorted(p.name for p in (files / "thumbs").iterdir())
    assert "0123456789abcdef.jpg" not in names and "keep-me.txt" in names
    assert summary.thumbnails == len(names) - 1 == statuses["ok"]
    assert sorted(p.name for p in (files / "rows").iterdir()) == ["rows-00000.js"]
    made = {p.name: p.stat().st_mtime_ns for p in (files / "thumbs").glob("*.jpg")}
    again = write_report(open_output(str(real_run)), tmp_path / "report.html")
    assert again.thumbnails == summary.thumbnails
    assert {p.name: p.stat().st_mtime_ns for p in (files / "thumbs").glob("*.jpg")} == made  # reused, not made again


def test_gallery_holds_every_row_and_above_the_cap_each_groups_extremes(tmp_path):
    rows = synthetic_rows(500, sample_images(tmp_path / "images", 2))
    out = write_output(tmp_path / "out", rows)
    output = open_output(str(out))
    every = gallery_rows(output, list(SYNTHETIC_CLASSES), max_rows=1000)
    assert every.rows == every.total == 500 and not every.cut
    keys = every.table.column("key").to_pylist()
    assert sorted(keys) == sorted(r["key"] for r in rows)
    statuses = every.table.column("status").to_pylist()
    first_failed = statuses.index(next(s for s in statuses if s != "ok"))
    assert set(statuses[:first_failed]) == {"ok"} and "ok" not in statuses[first_failed:]  # ok rows first, then failed ones
    ok = [r for r in rows if r["status"] == "ok"]
    for label in SYNTHETIC_CLASSES:  # within a label: lowest confidence first
        shown = [s for s, l in zip(every.table.column("score").to_pylist(), every.table.column("label").to_pylist()) if l == label]
        assert shown == sorted(shown) and len(shown) == sum(1 for r in ok if r["label"] == label)

    cut = gallery_rows(output, list(SYNTHETIC_CLASSES), max_rows=100, min_per_group=4)
    assert cut.cut and cut.total == 500
    table = cut.table.to_pylist()
    for label in SYNTHETIC_CLASSES:
        scores = sorted(r["score"] for r in ok if r["label"] == label)
        share = min(len(scores), max(4, 100 * len(scores) // 500))
        kept = [r["score"] for r in table if r["label"] == label]
        low = (share + 1) // 2
        assert kept == pytest.approx(scores[:low] + scores[len(scores) - (share - low) :])  # its least and most confident rows
    for status in ("decode_error", "read_error"):
        count = sum(1 for r in rows if r["status"] == status)
        assert sum(1 for r in table if r["status"] == status) == min(count, max(4, 100 * count // 500))
    by_key = {r["key"]: r for r in rows}
    for row in table:  # details travel with their own row
        expected = by_key[row["key"]].get("boxes") or []
        assert row["path"] == by_key[row["key"]]["path"] and len(row["boxes"] or []) == len(expected)
        assert [b["x0"] for b in row["boxes"] or []] == pytest.approx([b["x0"] for b in expected])


def test_thumbnails_go_to_each_labels_least_confident_rows_first(tmp_path):
    images = sample_images(tmp_path / "images", 40)
    rows = synthetic_rows(40, images, classes=SYNTHETIC_CLASSES[:2])
    output = open_output(str(write_output(tmp_path / "out", rows, classes=SYNTHETIC_CLASSES[:2])))
    gallery = gallery_rows(output, list(SYNTHETIC_CLASSES[:2]), max_rows=1000)
    chosen = thumbnail_order(gallery, 4)
    ok = [r for r in rows if r["status"] == "ok"]
    lowest = {label: sorted((r for r in ok if r["label"] == label), key=lambda r: r["score"])[:2] for label in SYNTHETIC_CLASSES[:2]}
    assert sorted(chosen) == sorted(r["path"] for pair in lowest.values() for r in pair)
    assert thumbnail_order(gallery, 0) == []


# ---------------------------------------------------------------- in Chromium


def _open_report(browser: HeadlessChromium, html_path: Path, fragment: str = "") -> None:
    browser.open(html_path.as_uri() + fragment)
    _settle(browser)


def _settle(browser: HeadlessChromium) -> None:
    """Wait for the gallery and the view to be drawn, and for the images in the viewport to decode (cards load lazily)."""
    browser.evaluate("window.lgcaReport.idle()")
    browser.evaluate(
        "Promise.all(Array.from(document.images).filter(i => { const r = i.getBoundingClientRect(); "
        "return r.bottom > 0 && r.top < innerHeight && r.width > 0; }).map(i => i.decode().catch(() => null)))"
    )


def _chunk_rows(files_dir: Path) -> list[list]:
    """The row details of a report, read back from its chunk scripts, in index order."""
    rows = []
    for path in sorted((files_dir / "rows").glob("rows-*.js")):
        text = path.read_text()
        rows.extend(json.loads(text[text.index(",") + 1 : text.rindex(")")]))
    return rows


_SHOWN = """(() => Array.from(document.querySelectorAll('#gallery-grid .card')).map(c => {
    const pred = c.querySelector('.pred'), status = c.querySelector('.status');
    return {key: c.dataset.key, label: pred ? pred.dataset.label : null, score: pred ? Number(pred.dataset.score) : null,
            margin: pred ? Number(pred.dataset.margin) : null, status: status ? status.dataset.status : 'ok',
            image: !!c.querySelector('.frame img'), error: c.querySelector('.error') ? c.querySelector('.error').textContent : null,
            placeholder: c.querySelector('.placeholder') ? c.querySelector('.placeholder').textContent : null};
}))()"""


def _set(browser: HeadlessChromium, control: str, value: str, event: str = "change") -> dict:
    """Set a gallery control as a user would, wait for the page, and return what it shows."""
    browser.evaluate(
        f"(() => {{ const c = document.getElementById({json.dumps(control)}); c.value = {json.dumps(value)}; "
        f"c.dispatchEvent(new Event({json.dumps(event)})); }})()"
    )
    _settle(browser)
    return _gallery(browser)


def _gallery(browser: HeadlessChromium) -> dict:
    status = browser.evaluate(
        "(() => { const s = document.getElementById('gallery-status'); return {matching: Number(s.dataset.matching), "
        "page: Number(s.dataset.page), pages: Number(s.dataset.pages)}; })()"
    )
    return {**status, "cards": browser.evaluate(_SHOWN)}


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
                errors: text('errors-decode_error'), summaryTop: document.getElementById('summary').getBoundingClientRect().top,
                galleryTop: document.getElementById('gallery').getBoundingClientRect().top,
                runTop: document.getElementById('run').getBoundingClientRect().top,
                keys: Array.from(document.querySelectorAll('.errors td.key')).map(e => e.textContent)};
    })()""")
    assert int(shown["rows"]) == sum(statuses.values())
    assert int(shown["ok"]) == statuses["ok"] and int(shown["decode"]) == statuses["decode_error"]
    assert int(shown["read"]) == int(shown["score"]) == 0
    assert shown["labels"] == labels and int(shown["errors"]) == statuses["decode_error"]
    assert shown["keys"] == ["broken.jpg"]
    assert shown["summaryTop"] < shown["galleryTop"] < shown["runTop"]  # the summary first, the run's settings last
    gallery = _gallery(chromium)
    assert gallery["matching"] == sum(statuses.values()) == len(gallery["cards"])  # every row, failed ones too
    assert all(c["image"] for c in gallery["cards"] if c["status"] == "ok")
    assert [c["status"] for c in gallery["cards"]][-1] == "decode_error"

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
    first_label = next(c for c in CLASSES if c in labels)
    assert row["label"] == first_label and row["score"] == min(r["score"] for r in table if r["label"] == first_label)
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


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A report of 500 synthetic rows over 6 images (3 labels, failed rows among them): the HTML and the rows."""
    base = tmp_path_factory.mktemp("curated")
    rows = synthetic_rows(500, sample_images(base / "images", 6), classes=SYNTHETIC_CLASSES[:3])
    out = write_output(base / "out", rows, classes=SYNTHETIC_CLASSES[:3], rows_per_file=128)
    write_report(open_output(str(out)), base / "report.html", page_size=24)
    table = pq.read_table(out).to_pylist()  # the scores as stored (float32)
    return base / "report.html", table


def _rounded(value):
    return None if value is None else round(value, 3)


def test_report_filters_sort_search_and_page_in_chromium(curated, chromium):
    html_path, rows = curated
    _open_report(chromium, html_path)
    first = _gallery(chromium)
    assert first["matching"] == len(rows) and first["pages"] == -(-len(rows) // 24) and len(first["cards"]) == 24

    # Paging shows the next rows, none of the first page's.
    chromium.evaluate("document.getElementById('page-next').click()")
    _settle(chromium)
    second = _gallery(chromium)
    assert second["page"] == 1 and {c["key"] for c in second["cards"]}.isdisjoint(c["key"] for c in first["cards"])
    chromium.evaluate("document.getElementById('page-last').click()")
    _settle(chromium)
    last = _gallery(chromium)
    assert last["page"] == last["pages"] - 1 and len(last["cards"]) == len(rows) - 24 * (last["pages"] - 1)

    # A label: its rows only, all of them, least confident first; the filter goes back to page 1.
    label = SYNTHETIC_CLASSES[1]
    shown = _set(chromium, "filter-label", "1")
    expected = sorted(_rounded(r["score"]) for r in rows if r["label"] == label)
    assert shown["page"] == 0 and shown["matching"] == len(expected)
    assert {c["label"] for c in shown["cards"]} == {label} and [c["score"] for c in shown["cards"]] == expected[:24]

    # A score range within the label, sorted by margin, most decisive first.
    _set(chromium, "filter-min", "0.4", "input")
    _set(chromium, "filter-max", "0.7", "input")
    shown = _set(chromium, "sort", "margin-desc")
    in_range = [r for r in rows if r["label"] == label and 0.4 <= _rounded(r["score"]) <= 0.7]
    assert shown["matching"] == len(in_range)
    assert [c["margin"] for c in shown["cards"]] == sorted((_rounded(r["margin"]) for r in in_range), reverse=True)[:24]
    assert all(0.4 <= c["score"] <= 0.7 for c in shown["cards"])

    # Following a plain anchor (the page's nav) keeps the gallery as it is.
    chromium.evaluate("document.querySelector('header nav a[href=\"#errors\"]').click()")
    _settle(chromium)
    assert _gallery(chromium)["cards"] == shown["cards"] and chromium.evaluate("document.getElementById('filter-label').value") == "1"

    # The view state lives in the URL: a reload with it shows the same rows.
    chromium.evaluate("history.back()")
    _settle(chromium)
    fragment = chromium.evaluate("location.hash")
    assert "label=1" in fragment and "sort=margin-desc" in fragment
    _open_report(chromium, html_path, fragment)
    assert _gallery(chromium)["cards"] == shown["cards"]

    # Reset, then a failure status: its rows with their error messages, no labels.
    chromium.evaluate("document.getElementById('filter-reset').click()")
    _settle(chromium)
    shown = _set(chromium, "filter-status", "2")  # decode_error
    failed = [r for r in rows if r["status"] == "decode_error"]
    assert shown["matching"] == len(failed) and {c["status"] for c in shown["cards"]} == {"decode_error"}
    messages = {r["key"]: r["error_message"] for r in failed}
    assert all(c["label"] is None and c["error"] == messages[c["key"]] for c in shown["cards"])

    # Key search, case-insensitive, across statuses.
    chromium.evaluate(
        "document.getElementById('filter-status').value = ''; document.getElementById('filter-status').dispatchEvent(new Event('change'))"
    )
    shown = _set(chromium, "filter-key", "IMG00012", "input")
    assert sorted(c["key"] for c in shown["cards"]) == sorted(r["key"] for r in rows if "img00012" in r["key"]) != []

    # Confidence, highest first, over every ok row.
    chromium.evaluate(
        "document.getElementById('filter-key').value = ''; document.getElementById('filter-key').dispatchEvent(new Event('input'))"
    )
    shown = _set(chromium, "sort", "score-desc")
    assert [c["score"] for c in shown["cards"]] == sorted((_rounded(r["score"]) for r in rows if r["status"] == "ok"), reverse=True)[:24]
    assert chromium.console_errors() == []


def test_a_histogram_bar_opens_exactly_the_rows_it_counts(curated, chromium):
    html_path, rows = curated
    _open_report(chromium, html_path)
    bars = chromium.evaluate("Array.from(document.querySelectorAll('#score-histogram [data-bin]')).map(g => "
                             "({bin: g.dataset.bin, count: Number(g.querySelector('.hbar').dataset.count)}))")  # fmt: skip
    assert sum(bar["count"] for bar in bars) == sum(1 for r in rows if r["status"] == "ok")
    for bar in [b for b in bars if b["count"]][:4]:
        chromium.evaluate(f"document.querySelector('#score-histogram [data-bin=\"{bar['bin']}\"]').dispatchEvent(new Event('click'))")
        _settle(chromium)
        shown = _gallery(chromium)
        low, high = int(bar["bin"]) / 20, (int(bar["bin"]) + 1) / 20
        assert shown["matching"] == bar["count"]  # the bar's count, boundaries included
        assert all(c["status"] == "ok" and low - 0.0005 <= c["score"] <= high + 0.0005 for c in shown["cards"])
    assert chromium.console_errors() == []


def test_a_report_named_with_url_characters_still_finds_its_files(tmp_path, chromium):
    rows = synthetic_rows(30, sample_images(tmp_path / "images", 3), classes=SYNTHETIC_CLASSES[:2])
    out = write_output(tmp_path / "out", rows, classes=SYNTHETIC_CLASSES[:2])
    summary = write_report(open_output(str(out)), tmp_path / "run #2 50%.html")
    assert summary.files_dir.endswith("run #2 50%_files")
    _open_report(chromium, tmp_path / "run #2 50%.html")
    cards = _gallery(chromium)["cards"]
    assert len(cards) == 24 and all(c["image"] for c in cards if c["status"] == "ok")
    assert chromium.console_errors() == []


def test_report_view_shows_one_image_with_all_its_boxes_and_top_k(curated, chromium):
    html_path, rows = curated
    _open_report(chromium, html_path, "#sort=score-asc")
    by_key = {r["key"]: r for r in rows}
    cards = _gallery(chromium)["cards"]
    chromium.evaluate("document.querySelector('#gallery-grid .card').click()")
    _settle(chromium)
    view = chromium.evaluate("""(() => ({hidden: document.getElementById('view').hidden, key: document.getElementById('view-key').textContent,
        boxes: document.querySelectorAll('#view-image .box').length, rows: document.querySelectorAll('#view-boxes tr[data-box]').length,
        topk: Array.from(document.querySelectorAll('#view-topk tr')).map(tr => tr.children[1].textContent),
        link: document.getElementById('view-link').href, position: document.getElementById('view-position').textContent}))()""")
    row = by_key[cards[0]["key"]]
    assert not view["hidden"] and view["key"] == row["key"] and view["position"].startswith("row 1 of")
    assert view["boxes"] == view["rows"] == len(row["boxes"])
    assert view["topk"] == row["topk_labels"]
    assert view["link"] == Path(row["path"]).as_uri()
    chromium.evaluate("document.getElementById('view-next').click()")
    _settle(chromium)
    assert chromium.evaluate("document.getElementById('view-key').textContent") == cards[1]["key"]
    chromium.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
    _settle(chromium)
    assert chromium.evaluate("document.getElementById('view').hidden") is True
    assert chromium.console_errors() == []


def test_report_in_chromium_escapes_hostile_text_and_survives_missing_images(tmp_path, chromium):
    images = sample_images(tmp_path / "images", 2)
    rows = synthetic_rows(100, images + [str(tmp_path / "images" / "gone.jpg")])
    rows[0]["key"] = "</script><img src=x onerror=alert(1)>.jpg"
    rows[49]["error_message"] = "<b>bold</b> & </script> stays text"
    out = write_output(tmp_path / "out", rows)
    summary = write_report(open_output(str(out)), tmp_path / "r.html")
    assert summary.thumbnail_failures == 1  # gone.jpg, shared by a third of the rows
    _open_report(chromium, tmp_path / "r.html", "#size=96")
    cards = []
    while True:
        cards.extend(_gallery(chromium)["cards"])
        if chromium.evaluate("document.getElementById('page-next').disabled"):
            break
        chromium.evaluate("document.getElementById('page-next').click()")
        _settle(chromium)
    state = chromium.evaluate("""(() => ({message: Array.from(document.querySelectorAll('.errors td, .card .error')).map(e => e.textContent),
                                 injected: document.querySelectorAll('img[src="x"], b').length}))()""")
    assert state["injected"] == 0
    assert "<b>bold</b> & </script> stays text" in state["message"]
    assert len(cards) == 100 and any(c["key"] == rows[0]["key"] for c in cards)
    missing = {r["key"] for r in rows if r["path"].endswith("gone.jpg") and r["status"] == "ok"}
    failed = [c for c in cards if c["key"] in missing]
    assert failed and all(c["placeholder"].startswith("thumbnail failed: FileNotFoundError") for c in failed)
    assert all(c["image"] for c in cards if c["status"] == "ok" and c["key"] not in missing)
    assert chromium.console_errors() == []


def test_rows_beyond_the_thumbnail_budget_show_local_images_and_say_why_for_remote_ones(tmp_path, chromium):
    images = sample_images(tmp_path / "images", 6)
    rows = synthetic_rows(30, images + ["s3://bucket/remote.jpg"], classes=SYNTHETIC_CLASSES[:1])
    out = write_output(tmp_path / "out", rows, classes=SYNTHETIC_CLASSES[:1])
    summary = write_report(open_output(str(out)), tmp_path / "r.html", max_thumbnails=2)
    assert summary.thumbnails == 2
    _open_report(chromium, tmp_path / "r.html", "#size=48")
    cards = {c["key"]: c for c in _gallery(chromium)["cards"]}
    local = [r["key"] for r in rows if r["status"] == "ok" and not r["path"].startswith("s3://")]
    remote = [r["key"] for r in rows if r["status"] == "ok" and r["path"].startswith("s3://")]
    assert all(cards[k]["image"] for k in local)  # a thumbnail, or the local image itself
    assert remote and all("beyond --max-thumbnails 2" in cards[k]["placeholder"] for k in remote)
    sources = chromium.evaluate("Array.from(document.querySelectorAll('#gallery-grid .frame img')).map(i => i.getAttribute('src'))")
    assert sum(1 for src in sources if src.startswith("r_files/thumbs/")) > 0 and any(src.startswith("file://") for src in sources)


def test_image_links_follow_path_prefixes():
    assert image_link("/data/my café #1.jpg") == "file:///data/my%20caf%C3%A9%20%231.jpg"
    assert image_link("s3://bucket/a b.jpg") is None
    assert image_link("s3://bucket/a b.jpg", [("s3://bucket/", "https://cdn.example.com/")]) == "https://cdn.example.com/a%20b.jpg"
    assert image_link("https://example.com/x.jpg") == "https://example.com/x.jpg"
    assert image_link("relative/x.jpg") is None


@pytest.fixture(scope="module")
def big_report(big_output, tmp_path_factory) -> tuple[Path, dict, dict]:
    """`lgca report` of the 100k-row output, run in a fresh process: the HTML path, its figures, the baseline's."""
    html = tmp_path_factory.mktemp("big-report") / "big.html"
    baseline = measure([])
    result = measure(["report", str(big_output), "--out", str(html)])
    return html, result, baseline


@pytest.mark.integration
def test_report_100k_rows_in_bounded_time_and_memory(big_report):
    html, result, baseline = big_report
    growth = result["peak_rss_mb"] - baseline["peak_rss_mb"]
    chunks = sum(p.stat().st_size for p in (html.parent / "big_files" / "rows").iterdir())
    print(
        f"\nreport 100k rows: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(+{growth:.0f} MB over a bare import, {baseline['peak_rss_mb']:.0f} MB); HTML {html.stat().st_size / 1e6:.1f} MB, "
        f"row details {chunks / 1e6:.1f} MB; {result['output'].strip()}"
    )
    assert result["seconds"] < 60 and growth < 1536
    assert "lgca report: 100000 rows, 8 thumbnails in" in result["output"]  # the 8 images the rows share, none failed
    assert html.stat().st_size < 8e6  # the page holds the index; details load per page


def test_report_100k_rows_pages_in_chromium(big_output, big_report, chromium):
    import time

    statuses, labels = _parquet_counts(big_output)
    started = time.monotonic()
    _open_report(chromium, big_report[0])
    loaded = time.monotonic() - started
    first = max(labels, key=labels.get)
    _set(chromium, "filter-label", str(SYNTHETIC_CLASSES.index(first)))
    shown = chromium.evaluate("""(async () => {
        const next = document.getElementById('page-next');
        const seen = new Set();
        let bare = 0;
        const collect = () => document.querySelectorAll('#gallery-grid .card').forEach(c => {
            seen.add(c.dataset.key); if (!c.querySelector('.frame img')) bare += 1; });
        let pages = 1;
        const t0 = performance.now();
        collect();
        while (!next.disabled) { next.click(); await window.lgcaReport.idle(); pages += 1; collect(); }
        return {ok: document.getElementById('count-ok').textContent, rows: document.getElementById('count-rows').textContent,
                pages, seen: seen.size, ms: performance.now() - t0, bare};
    })()""")
    print(
        f"\nChromium: loaded the 100k-row report in {loaded:.1f} s; paged through {shown['pages']} pages "
        f"({shown['seen']} rows of '{first}') in {shown['ms']:.0f} ms"
    )
    assert int(shown["ok"]) == statuses["ok"] and int(shown["rows"]) == 100_000
    assert shown["seen"] == labels[first] and shown["pages"] == -(-labels[first] // 24)
    assert shown["bare"] == 0  # every card on every page has its picture with its boxes
    started = time.monotonic()
    assert _set(chromium, "sort", "margin-asc")["matching"] == labels[first]
    assert time.monotonic() - started < 5
    assert chromium.console_errors() == []


def test_report_cli_writes_one_page_and_a_files_folder(real_run, tmp_path, capsys):
    out = tmp_path / "site" / "report.html"
    assert cli.main(["report", str(real_run), "--out", str(out), "--max-thumbnails", "3", "--page-size", "12"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("lgca report: 7 rows, 3 thumbnails") and str(out) in line
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report_files"]
    html = out.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing fetched from a network
    data = json.loads(re.search(r'<script type="application/json" id="lgca-data">(.*?)</script>', html, re.S).group(1))
    assert data["pageSize"] == 12 and data["filesDir"] == "report_files" and len(data["index"]["keys"]) == 7
    details = _chunk_rows(out.parent / "report_files")
    assert len(details) == 7 and sum(1 for d in details if d[4] and d[4]["src"].startswith("report_files/thumbs/")) == 3
    assert cli.main(["report", str(real_run), "--out", str(out), "--max-thumbnails", "0"]) == 0
    assert "0 thumbnails" in capsys.readouterr().out and not list((out.parent / "report_files" / "thumbs").glob("*.jpg"))


@pytest.mark.integration
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
    prefix = f"{s3_bucket}/images/=https://images.example.com/"
    assert cli.main(["report", f"{s3_bucket}/run", "--out", str(out), "--path-prefix", prefix, *options]) == 0
    details = _chunk_rows(tmp_path / "report_files")
    ok = [d for d in details if d[6]]
    assert len(details) == 40 and ok and all(d[4] and "src" in d[4] for d in ok)  # both images read from S3 and shrunk
    assert all(d[0].startswith(s3_bucket) and d[1].startswith("https://images.example.com/grey") for d in details)
