"""`lgca report`: one self-contained HTML page of an output directory (statistics, histogram, errors, gallery) and its thumbnails."""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.review.output_dir import CurationError, OutputDir
from pipeline.review.stats import SCORE_BINS, OutputStats, collect_stats, run_facts
from pipeline.review.text import percent
from pipeline.review.thumbnails import prepare_thumbnail_dir, read_limits, write_thumbnails
from pipeline.review.values import number
from pipeline.schema import OK

LEVEL_COLOURS = ("#ff1744", "#2979ff", "#00c853", "#ffab00", "#d500f9", "#00b8d4")  # box colour by level, cycling
PAGE_SIZES = (12, 24, 48, 96)
_DISPLAY_SIDE = 200  # CSS pixels of a gallery card's image area
_ASSETS = "assets"  # package data beside this module: report.html (str.format fields), report.css, report.js (__DISPLAY_SIDE__ filled in)


@dataclass(frozen=True)
class ReportSummary:
    """What one report wrote."""

    path: str  # the HTML file
    thumbnail_dir: str
    rows: int
    thumbnails: int  # written
    thumbnail_failures: int  # images that could not be read or decoded for a thumbnail
    seconds: float

    def line(self) -> str:
        failed = f", {self.thumbnail_failures} failed" if self.thumbnail_failures else ""
        return (
            f"lgca report: {self.rows} rows, {self.thumbnails} thumbnails{failed} in {self.seconds:.1f} s -> {self.path} "
            f"(+ {self.thumbnail_dir}/)"
        )


def write_report(
    output: OutputDir,
    out: str | os.PathLike[str],
    thumbnails_per_label: int = 24,
    page_size: int = 24,
    thumbnail_size: int = 256,
    error_examples: int = 20,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 8,
    max_gallery_rows: int = 200_000,
) -> ReportSummary:
    """Write the HTML report of an output directory: one file, plus `<stem>_thumbnails/` beside it.

    The page needs no server and no network: styles, script and data are inline; thumbnails are
    relative links. Statistics are computed over every row; the gallery embeds every ok row as compact
    columns (key, score, top-k) and pages through them in the browser, lowest confidence first per label;
    only the first `thumbnails_per_label` rows of each label get a thumbnail with its boxes drawn.

    Args:
        output: the opened output directory.
        out: the local HTML file to write.
        thumbnails_per_label: thumbnails made per label (the lowest-confidence rows); 0 for none.
        page_size: gallery cards per page initially (the page offers 12, 24, 48, 96).
        thumbnail_size: longer side of a thumbnail in pixels.
        error_examples: (key, message) examples shown per failure status.
        storage_options: fsspec options for reading remote images.
        workers: threads reading and shrinking images.
        max_gallery_rows: ok rows embedded in the gallery before each label is cut to its
            lowest-confidence share (see `gallery_groups`); statistics always cover every row.

    Returns:
        What was written.

    Raises:
        CurationError: a bad option or a remote `out`.
    """
    started = time.monotonic()
    if "://" in str(out):
        raise CurationError(f"--out {out} must be a local file: the report is opened from disk with its thumbnails folder")
    if thumbnails_per_label < 0 or page_size < 1 or thumbnail_size < 16 or max_gallery_rows < 1:
        raise CurationError("need --thumbnails-per-label >= 0, --page-size >= 1, --thumbnail-size >= 16 and --max-gallery-rows >= 1")
    path = Path(out).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    thumbnail_dir = path.parent / f"{path.stem}_thumbnails"
    prepare_thumbnail_dir(thumbnail_dir)

    stats = collect_stats(output, error_examples)
    classes = list(output.classes) + sorted({i.label for i in stats.labels} - set(output.classes))
    groups = gallery_groups(output, classes, max_gallery_rows, thumbnails_per_label)
    chosen = [key for group in groups for key in group["keys"][:thumbnails_per_label]]
    thumbs: dict[str, dict[str, Any]] = {}
    if chosen:
        table = output.dataset().to_table(
            columns=["key", "path", "boxes"], filter=(ds.field("status") == OK) & ds.field("key").isin(chosen)
        )
        # The run's read limits: images it accepted under a raised --max-pixels or --max-bytes must not fail here
        # on the defaults, and its URL schemes bound what the report fetches.
        limits = read_limits(output.manifest.get("decode") or {})
        thumbs = write_thumbnails(table, thumbnail_dir, thumbnail_size, limits, storage_options or {}, workers)
    data = {
        "classes": classes,
        "pageSize": page_size,
        "pageSizes": sorted(set(PAGE_SIZES) | {page_size}),
        "thumbnailsPerLabel": thumbnails_per_label,
        "colours": list(LEVEL_COLOURS),
        "groups": groups,
        "thumbs": thumbs,
    }
    document = _html_document(output, stats, data)
    staged = path.with_name(f".{path.name}.partial")
    staged.write_text(document, encoding="utf-8")
    staged.replace(path)
    failures = sum(1 for t in thumbs.values() if "error" in t)
    return ReportSummary(str(path), str(thumbnail_dir), stats.rows, len(thumbs) - failures, failures, time.monotonic() - started)


def gallery_groups(output: OutputDir, classes: Sequence[str], max_rows: int = 200_000, min_per_label: int = 24) -> list[dict[str, Any]]:
    """The ok rows per label, lowest confidence first, as compact columns for the report's JavaScript.

    Every ok row is embedded while there are at most `max_rows`; above that each label keeps its
    lowest-confidence share (its fraction of the ok rows times `max_rows`, at least `min_per_label`), so
    the page stays a few tens of MB however large the run. Labels are indices into `classes`; scores are
    rounded to 3 decimals.

    Args:
        output: the opened output directory.
        classes: label names; a label's index here is how rows refer to it.
        max_rows: rows embedded over all labels before each label is cut to its share.
        min_per_label: rows kept per label whatever its share (the thumbnailed ones).

    Returns:
        One dict per label, most frequent label first: label, count (all its ok rows), keys, scores,
        margins, topk (lists of label indices), topkScores (the embedded rows only).
    """
    columns = ["key", "label", "score", "margin", "topk_labels", "topk_scores"]
    table = output.dataset().to_table(columns=columns, filter=ds.field("status") == OK)
    if table.num_rows == 0:
        return []
    table = table.sort_by([("label", "ascending"), ("score", "ascending"), ("key", "ascending")])
    index = {label: i for i, label in enumerate(classes)}
    # Sorted by label, so each label's rows are one contiguous run, in the order value_counts meets them.
    runs = pc.value_counts(table.column("label"))
    groups: list[dict[str, Any]] = []
    start = 0
    for label, count in zip(runs.field("values").to_pylist(), runs.field("counts").to_pylist()):
        share = count if table.num_rows <= max_rows else max(min_per_label, max_rows * count // table.num_rows)
        part = table.slice(start, min(count, share))  # only these rows ever become Python objects
        groups.append(
            {
                "label": index.get(label),
                "count": count,
                "keys": part.column("key").to_pylist(),
                "scores": _rounded(part.column("score")),
                "margins": _rounded(part.column("margin")),
                "topk": [[index.get(c) for c in row or ()] for row in part.column("topk_labels").to_pylist()],
                "topkScores": [[number(v, 3) for v in row or ()] for row in part.column("topk_scores").to_pylist()],
            }
        )
        start += count
    groups.sort(key=lambda g: (-g["count"], classes[g["label"]]))
    return groups


def _rounded(column: pa.ChunkedArray) -> list[float | None]:
    return pc.round(pc.cast(column, pa.float64()), 3).to_pylist()


def _html_document(output: OutputDir, stats: OutputStats, data: Mapping[str, Any]) -> str:
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
        f'<tr class="status-{e(s)}"><td>{e(s)}</td><td class="num" id="count-{e(s)}">{n}</td>'
        f'<td class="num">{percent(n, stats.rows)}</td></tr>'
        for s, n in stats.status_counts.items()
    )
    status_table = (
        f'<table class="grid"><thead><tr><th>status</th><th>rows</th><th>share</th></tr></thead>'
        f'<tbody>{status_rows}<tr class="total"><td>total</td><td class="num" id="count-rows">{stats.rows}</td>'
        f'<td class="num">{"100.0%" if stats.rows else "-"}</td></tr></tbody></table>'
    )
    levels = ", ".join(f"level {level}: {n}" for level, n in stats.boxes_by_level.items())
    return _asset("report.html").format(
        title=e(f"lgca report: {output.url}"),
        url=e(output.url),
        banner=banner + mismatch,
        facts=facts,
        status_table=status_table,
        boxes=f"{stats.boxes} salient boxes" + (f" ({e(levels)})" if levels else ""),
        label_table=_label_table(stats),
        histogram=_score_histogram_svg(stats),
        quantiles=e(", ".join(f"{k} {v:.3f}" for k, v in stats.score_quantiles.items()) or "no ok rows"),
        errors=_error_section(stats),
        legend=_legend(max(stats.boxes_by_level, default=1)),
        thumbnails_per_label=int(data["thumbnailsPerLabel"]),
        style=_asset("report.css"),
        data=_script_json(data),
        script=_asset("report.js").replace("__DISPLAY_SIDE__", str(_DISPLAY_SIDE)),
    )


def _label_table(stats: OutputStats) -> str:
    if not stats.labels:
        return "<p>No ok rows, so no labels.</p>"
    e = html.escape
    peak = max(i.count for i in stats.labels)
    rows = "\n".join(
        f'<tr><td><a href="#gallery" class="label-link" data-label="{e(i.label)}">{e(i.label)}</a></td>'
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
        f'<svg id="score-histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="confidence histogram">'
    ]
    for i, n in enumerate(stats.score_histogram):
        h = (height - 2 * pad) * n / peak
        x, y = pad + i * bar, height - pad - h
        low, high = i / SCORE_BINS, (i + 1) / SCORE_BINS
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" class="hbar" data-count="{n}">'
            f"<title>{low:.2f}-{high:.2f}: {n} rows</title></rect>"
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
            f'<h3>{e(status)}: <span id="errors-{e(status)}">{n}</span> rows'
            f"{f' (first {len(kept)} shown)' if len(kept) < n else ''}</h3>"
            f'<table class="grid errors"><thead><tr><th>key</th><th>error_message</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    return "\n".join(parts)


def _legend(max_level: int) -> str:
    items = []
    for level in range(max(max_level, 1) + 1):
        name = "selected local crop" if level == 0 else f"grown {level}x"
        items.append(
            f'<span class="legend-item"><span class="swatch" style="border-color:{LEVEL_COLOURS[level % len(LEVEL_COLOURS)]}">'
            f"</span>level {level}: {name}</span>"
        )
    return "".join(items)


def _script_json(data: Mapping[str, Any]) -> str:
    # Inside <script type="application/json"> only "</" could end the element early; escaping <, > and &
    # as JSON unicode escapes keeps any key, path or message inert.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@cache
def _asset(name: str) -> str:
    """A report asset's text, read once from the installed package (a wheel ships them as package data)."""
    return (files("pipeline.review") / _ASSETS / name).read_text(encoding="utf-8")
