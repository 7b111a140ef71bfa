"""`lgca report`: an HTML workspace over an output directory (summary, filterable gallery, one-image view) that opens from disk."""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.progress import ProgressLine
from pipeline.review.export import rewrite_path
from pipeline.review.gallery import GalleryRows, detail_chunks, gallery_index, gallery_rows, thumbnail_order
from pipeline.review.output_dir import CurationError, OutputDir
from pipeline.review.stats import SCORE_BINS, OutputStats, collect_stats, run_facts
from pipeline.review.text import percent
from pipeline.review.thumbnails import THUMBNAIL_NAME, read_limits, remove_stale, write_thumbnails
from pipeline.schema import OK, STATUSES

LEVEL_COLOURS = ("#ff1744", "#2979ff", "#00c853", "#ffab00", "#d500f9", "#00b8d4")  # box colour by level, cycling
PAGE_SIZES = (12, 24, 48, 96)
_DISPLAY_SIDE = 200  # CSS pixels of a gallery card's image area
THUMBS, ROWS = "thumbs", "rows"  # folders under `<stem>_files/`: thumbnails, and the row-detail scripts
CHUNK_NAME = re.compile(r"^rows-\d{5}\.js$")  # detail scripts this module writes; only these are ever deleted
_ASSETS = "assets"  # package data beside this module: report.html (str.format fields), report.css, report.js (__DISPLAY_SIDE__ filled in)


@dataclass(frozen=True)
class ReportSummary:
    """What one report wrote."""

    path: str  # the HTML file
    files_dir: str  # thumbnails and row details beside it
    rows: int  # rows in the output
    gallery_rows: int  # rows the gallery holds (all of them up to --max-gallery-rows)
    thumbnails: int  # thumbnails made or kept from an earlier report
    thumbnail_failures: int  # images that could not be read or decoded for a thumbnail
    seconds: float

    def line(self) -> str:
        failed = f", {self.thumbnail_failures} failed" if self.thumbnail_failures else ""
        held = "" if self.gallery_rows == self.rows else f" ({self.gallery_rows} in the gallery)"
        return (
            f"lgca report: {self.rows} rows{held}, {self.thumbnails} thumbnails{failed} in {self.seconds:.1f} s -> {self.path} "
            f"(+ {self.files_dir}/)"
        )


def write_report(
    output: OutputDir,
    out: str | os.PathLike[str],
    page_size: int = 24,
    thumbnail_size: int = 256,
    max_thumbnails: int = 20_000,
    error_examples: int = 20,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 8,
    max_gallery_rows: int = 200_000,
    path_prefixes: Sequence[tuple[str, str]] = (),
    progress: bool = True,
) -> ReportSummary:
    """Write the HTML report of an output directory: one page, plus `<stem>_files/` (thumbnails, row details) beside it.

    The page needs no server and no network. Its top is the summary (counts, labels, confidence histogram,
    errors); below, a gallery of every row (up to `max_gallery_rows`) with filters by label, status, score
    range and key, sorting by confidence or margin either way, pages drawn on demand, and a view of one
    image with all its boxes and top-k. Row details load from small script files, only for the rows a
    page shows. Thumbnails are made for up to `max_thumbnails` images (each label's least confident rows
    first); rows beyond show a local image itself, a remote one as a placeholder. Thumbnails an earlier
    report made are kept and reused.

    Args:
        output: the opened output directory.
        out: the local HTML file to write.
        page_size: gallery cards per page initially (the page offers 12, 24, 48, 96).
        thumbnail_size: longer side of a thumbnail in pixels.
        max_thumbnails: images thumbnailed at most; 0 for none.
        error_examples: (key, message) examples shown per failure status.
        storage_options: fsspec options for reading remote images.
        workers: threads reading and shrinking images.
        max_gallery_rows: rows the gallery holds before each label and failure status is cut to its share
            (`gallery.gallery_rows`); statistics always cover every row.
        path_prefixes: (old, new) pairs rewriting image paths into the links the page opens (e.g. s3:// to https://).
        progress: report thumbnail progress on stderr.

    Returns:
        What was written.

    Raises:
        CurationError: a bad option or a remote `out`.
    """
    started = time.monotonic()
    if "://" in str(out):
        raise CurationError(f"--out {out} must be a local file: the report is opened from disk with its files folder")
    if max_thumbnails < 0 or page_size < 1 or thumbnail_size < 16 or max_gallery_rows < 1:
        raise CurationError("need --max-thumbnails >= 0, --page-size >= 1, --thumbnail-size >= 16 and --max-gallery-rows >= 1")
    path = Path(out).expanduser().resolve()
    files_dir = path.parent / f"{path.stem}_files"
    thumb_dir, rows_dir = files_dir / THUMBS, files_dir / ROWS
    rows_dir.mkdir(parents=True, exist_ok=True)

    stats = collect_stats(output, error_examples)
    classes = list(output.classes) + sorted({i.label for i in stats.labels} - set(output.classes))
    gallery = gallery_rows(output, classes, max_gallery_rows)
    wanted = thumbnail_order(gallery, max_thumbnails)
    # The run's read limits: images it accepted under a raised --max-pixels or --max-bytes must not fail here
    # on the defaults, and its URL schemes bound what the report fetches.
    limits = read_limits(output.manifest.get("decode") or {})
    meter = ProgressLine("lgca report: thumbnails", len(wanted), "images") if progress and wanted else None
    thumbs = write_thumbnails(wanted, thumb_dir, thumbnail_size, limits, storage_options or {}, workers, meter)
    if meter is not None:
        meter.close()
    remove_stale(thumb_dir, THUMBNAIL_NAME, {t["name"] for t in thumbs.values() if "name" in t})

    def link(image: str) -> str | None:
        return image_link(image, path_prefixes)

    chunk_names = set()
    for number_, text in detail_chunks(gallery, classes, thumbs, quote(f"{files_dir.name}/{THUMBS}"), link):
        name = f"rows-{number_:05d}.js"
        (rows_dir / name).write_text(text, encoding="utf-8")
        chunk_names.add(name)
    remove_stale(rows_dir, CHUNK_NAME, chunk_names)
    data = {
        "classes": classes,
        "statuses": list(STATUSES),
        "pageSize": page_size,
        "pageSizes": sorted(set(PAGE_SIZES) | {page_size}),
        "maxThumbnails": max_thumbnails,
        "scoreBins": SCORE_BINS,
        "colours": list(LEVEL_COLOURS),
        "filesDir": quote(files_dir.name),  # a URL path: a name with "#" or "%" must not end or escape it
        "index": gallery_index(gallery, classes),
    }
    document = _html_document(output, stats, data, gallery)
    staged = path.with_name(f".{path.name}.partial")
    staged.write_text(document, encoding="utf-8")
    staged.replace(path)
    failures = sum(1 for t in thumbs.values() if "error" in t)
    return ReportSummary(str(path), str(files_dir), stats.rows, gallery.rows, len(thumbs) - failures, failures, time.monotonic() - started)


def image_link(image: str, path_prefixes: Sequence[tuple[str, str]] = ()) -> str | None:
    """The URL a browser opens an image at: a rewritten prefix (`--path-prefix`), a file:// URL for a local
    path, the URL itself for http(s); None for a remote image no prefix maps (s3:// has no browser URL)."""
    rewritten = rewrite_path(image, path_prefixes, as_url=True)
    if rewritten != image or rewritten.startswith(("http://", "https://")):
        return rewritten
    if "://" in image:
        return None
    local = Path(image[len("file://") :] if image.startswith("file://") else image)
    return local.as_uri() if local.is_absolute() else None


def _html_document(output: OutputDir, stats: OutputStats, data: Mapping[str, Any], gallery: GalleryRows) -> str:
    e = html.escape
    facts = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in run_facts(output))
    banner = (
        ""
        if output.complete
        else (
            '<p class="warn">This output is incomplete (no _SUCCESS): a run is still going or stopped early. '
            "Finish it with <code>lgca run ... --resume</code>.</p>"
        )
    )
    mismatch = "".join(f'<p class="warn">_manifest.json disagrees with the Parquet files: {e(m)}</p>' for m in stats.manifest_mismatch)
    status_rows = "\n".join(
        f'<tr class="status-{e(s)}"><td>{_status_link(s, n)}</td><td class="num" id="count-{e(s)}">{n}</td>'
        f'<td class="num">{percent(n, stats.rows)}</td></tr>'
        for s, n in stats.status_counts.items()
    )
    status_table = (
        f'<table class="grid"><thead><tr><th>status</th><th>rows</th><th>share</th></tr></thead>'
        f'<tbody>{status_rows}<tr class="total"><td>total</td><td class="num" id="count-rows">{stats.rows}</td>'
        f'<td class="num">{"100.0%" if stats.rows else "-"}</td></tr></tbody></table>'
    )
    levels = ", ".join(f"level {level}: {n}" for level, n in stats.boxes_by_level.items())
    tiles = [
        ("rows", stats.rows, ""),
        ("ok", stats.ok, ""),
        ("failed", stats.errors, " bad" if stats.errors else ""),
        ("labels used", len(stats.labels), ""),
        ("salient boxes", stats.boxes, ""),
    ]
    note = (
        f"Every row, {gallery.rows:,} in all"
        if not gallery.cut
        else f"{gallery.rows:,} of {gallery.total:,} rows: each label and failure status keeps its share of --max-gallery-rows, "
        "half its least and half its most confident rows (lgca export lists them all)"
    )
    note += (
        ". Filter, sort and page; click a card for the image with all its boxes and its top-k. Thumbnails: up to "
        f"{data['maxThumbnails']:,} images, each label's least confident first."
    )
    manifest = output.manifest
    model = manifest.get("model") or {}
    return _asset("report.html").format(
        title=e(f"lgca report: {output.url}"),
        url=e(output.url),
        method=e(str(manifest.get("method") or "?")),
        model=e(f"{model.get('name', '?')} / {model.get('pretrained', '?')}"),
        banner=banner + mismatch,
        tiles="".join(
            f'<div class="tile{cls}" id="tile-{e(t.replace(" ", "-"))}"><div class="n">{n:,}</div><div class="t">{e(t)}</div></div>'
            for t, n, cls in tiles
        ),
        facts=facts,
        status_table=status_table,
        boxes=f"{stats.boxes} salient boxes" + (f" ({e(levels)})" if levels else ""),
        label_table=_label_table(stats),
        histogram=_score_histogram_svg(stats),
        quantiles=e(", ".join(f"{k} {v:.3f}" for k, v in stats.score_quantiles.items()) or "no ok rows"),
        errors=_error_section(stats),
        legend=_legend(max(stats.boxes_by_level, default=1)),
        gallery_note=e(note),
        style=_asset("report.css"),
        data=_script_json(data),
        script=_asset("report.js").replace("__DISPLAY_SIDE__", str(_DISPLAY_SIDE)),
    )


def _status_link(status: str, count: int) -> str:
    e = html.escape
    if status == OK or not count:
        return e(status)
    return f'<a href="#gallery" class="filter-link" data-filter-status="{e(status)}">{e(status)}</a>'


def _label_table(stats: OutputStats) -> str:
    if not stats.labels:
        return "<p>No ok rows, so no labels.</p>"
    e = html.escape
    peak = max(i.count for i in stats.labels)
    rows = "\n".join(
        f'<tr><td><a href="#gallery" class="filter-link" data-filter-label="{e(i.label)}">{e(i.label)}</a></td>'
        f'<td class="num" data-label-count="{e(i.label)}">{i.count}</td><td class="num">{percent(i.count, stats.ok)}</td>'
        f'<td class="num">{i.mean_score:.3f}</td>'
        f'<td class="barcell"><div class="bar" style="width:{100.0 * i.count / peak:.1f}%"></div></td></tr>'
        for i in stats.labels
    )
    return (
        f'<div class="scroll"><table class="grid labels"><thead><tr><th>label</th><th>rows</th><th>share of ok</th>'
        f"<th>mean score</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _score_histogram_svg(stats: OutputStats) -> str:
    width, height, pad = 640, 180, 28
    peak = max(stats.score_histogram) or 1
    bar = (width - 2 * pad) / SCORE_BINS
    parts = [
        f'<svg id="score-histogram" viewBox="0 0 {width} {height}" style="width:100%;max-width:{width}px;height:auto" role="img" '
        f'aria-label="confidence histogram">'
    ]
    for i, n in enumerate(stats.score_histogram):
        h = (height - 2 * pad) * n / peak
        x, y = pad + i * bar, height - pad - h
        low, high = i / SCORE_BINS, (i + 1) / SCORE_BINS
        # a whole-height hit area, so a bin with few rows is still easy to click
        parts.append(
            f'<g class="bin" data-bin="{i}"><title>{low:.2f}-{high:.2f}: {n} rows; click to see them</title>'
            f'<rect x="{x:.1f}" y="{pad}" width="{bar:.1f}" height="{height - 2 * pad:.1f}" fill="transparent"/>'
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" class="hbar" data-count="{n}"/></g>'
        )
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + tick * (width - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{pad}" y="{pad - 10}">peak {peak} rows per bin</text></svg>')
    return "".join(parts)


def _error_section(stats: OutputStats) -> str:
    e = html.escape
    failed = {s: n for s, n in stats.status_counts.items() if s != OK and n}
    if not failed:
        return "<p>No failed rows.</p>"
    parts = []
    for status, n in failed.items():
        kept = stats.error_examples.get(status, [])
        rows = "\n".join(f'<tr><td class="key">{e(k)}</td><td>{e(m)}</td></tr>' for k, m in kept)
        parts.append(
            f'<h3>{_status_link(status, n)}: <span id="errors-{e(status)}">{n}</span> rows'
            f"{f' (first {len(kept)} shown; all of them in the gallery)' if len(kept) < n else ''}</h3>"
            f'<table class="grid errors"><thead><tr><th>key</th><th>error_message</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    return "\n".join(parts)


def _legend(max_level: int) -> str:
    items = []
    for level in range(max(max_level, 1) + 1):
        name = "selected local crop" if level == 0 else f"grown {level}x"
        items.append(
            f'<label class="legend-item"><input type="checkbox" checked data-toggle-level="{level}">'
            f'<span class="swatch" style="border-color:{LEVEL_COLOURS[level % len(LEVEL_COLOURS)]}"></span>level {level}: {name}</label>'
        )
    return "".join(items) + '<span class="muted">hover a box for its label and score</span>'


def _script_json(data: Mapping[str, Any]) -> str:
    # Inside <script type="application/json"> only "</" could end the element early; escaping <, > and &
    # as JSON unicode escapes keeps any key, path or message inert.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@cache
def _asset(name: str) -> str:
    """A report asset's text, read once from the installed package (a wheel ships them as package data)."""
    return (files("pipeline.review") / _ASSETS / name).read_text(encoding="utf-8")
