"""Run summaries of an output directory: statistics, a terminal summary, and a self-contained HTML report with thumbnails."""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import os
import re
import textwrap
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.review.export import CurationError, OutputDir
from pipeline.schema import OK, STATUSES
from pipeline.stages.decode import DecodeFailure, decode_image
from pipeline.stages.sources import read_bytes

SCORE_BINS = 20  # confidence histogram bins over [0, 1]
LEVEL_COLOURS = ("#ff1744", "#2979ff", "#00c853", "#ffab00", "#d500f9", "#00b8d4")  # box colour by level, cycling
THUMBNAIL_QUALITY = 82  # JPEG quality of thumbnails: small files, boxes stay readable
THUMBNAIL_NAME = re.compile(r"^[0-9a-f]{16}\.jpg$")  # names this module writes; only these are ever deleted
PAGE_SIZES = (12, 24, 48, 96)
_DISPLAY_SIDE = 200  # CSS pixels of a gallery card's image area


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LabelCount:
    """One label's share of the ok rows."""

    label: str
    count: int
    mean_score: float


@dataclass(frozen=True)
class OutputStats:
    """Counts and distributions over every row of an output directory, read column by column."""

    rows: int
    status_counts: dict[str, int]  # every status in STATUSES, zeros included, then any unknown one
    labels: list[LabelCount]  # ok rows per label, most frequent first
    score_histogram: list[int]  # SCORE_BINS counts of ok-row scores over [0, 1]
    score_quantiles: dict[str, float]  # min, p10, median, p90, max of ok-row scores (empty without ok rows)
    boxes: int  # salient boxes over all rows
    boxes_by_level: dict[int, int]
    error_examples: dict[str, list[tuple[str, str]]]  # status -> first (key, error_message) pairs
    manifest_mismatch: list[str] = field(default_factory=list)  # where _manifest.json counts disagree with the Parquet

    @property
    def ok(self) -> int:
        return self.status_counts.get(OK, 0)

    @property
    def errors(self) -> int:
        return self.rows - self.ok


def collect_stats(output: OutputDir, error_examples: int = 20) -> OutputStats:
    """Read the status, label, score, error and box columns of every part file, a batch at a time.

    Args:
        output: the opened output directory.
        error_examples: (key, message) examples kept per failure status.

    Returns:
        The statistics; memory grows only with the number of ok rows (one float32 score each).
    """
    statuses: Counter[str] = Counter()
    label_counts: Counter[str] = Counter()
    label_sums: dict[str, float] = {}
    levels: Counter[int] = Counter()
    histogram = np.zeros(SCORE_BINS, dtype=np.int64)
    scores: list[np.ndarray] = []
    examples: dict[str, list[tuple[str, str]]] = {}
    columns = ["key", "status", "error_message", "label", "score", "boxes"]
    for batch in output.batches(columns):
        table = pa.Table.from_batches([batch])
        statuses.update(_value_counts(table.column("status")))
        ok = table.filter(pc.equal(table.column("status"), OK))
        if ok.num_rows:
            grouped = ok.group_by("label").aggregate([("score", "sum"), ("score", "count")])
            for label, total, count in zip(*(grouped.column(n).to_pylist() for n in ("label", "score_sum", "score_count"))):
                label_counts[label] += count
                label_sums[label] = label_sums.get(label, 0.0) + (total or 0.0)
            values = ok.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
            values = values[np.isfinite(values)]
            scores.append(values)
            histogram += np.histogram(np.clip(values, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))[0]
        boxes = table.column("boxes")
        if boxes.null_count < len(boxes):
            flat = pc.list_flatten(boxes)
            if len(flat):
                levels.update(_value_counts(pc.struct_field(flat, "level")))
        failed = table.filter(pc.not_equal(table.column("status"), OK))
        for status in pc.unique(failed.column("status")).to_pylist():
            kept = examples.setdefault(status, [])
            wanted = error_examples - len(kept)
            if wanted > 0:  # only the rows still needed become Python objects
                some = failed.filter(pc.equal(failed.column("status"), status)).slice(0, wanted)
                kept += [(k, m or "") for k, m in zip(some.column("key").to_pylist(), some.column("error_message").to_pylist())]
    all_scores = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    quantiles = {}
    if all_scores.size:
        points = np.quantile(all_scores, [0.0, 0.1, 0.5, 0.9, 1.0])
        quantiles = dict(zip(("min", "p10", "median", "p90", "max"), (float(p) for p in points)))
    counts = {status: statuses.get(status, 0) for status in STATUSES}
    counts.update({status: n for status, n in statuses.items() if status not in counts})
    labels = [LabelCount(label, n, label_sums[label] / n if n else math.nan) for label, n in label_counts.items()]
    labels.sort(key=lambda item: (-item.count, item.label))
    stats = OutputStats(
        rows=sum(counts.values()),
        status_counts=counts,
        labels=labels,
        score_histogram=histogram.tolist(),
        score_quantiles=quantiles,
        boxes=sum(levels.values()),
        boxes_by_level=dict(sorted(levels.items())),
        error_examples=examples,
    )
    return _with_manifest_check(stats, output.manifest)


def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict[Any, int]:
    counted = pc.value_counts(column)
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))


def _with_manifest_check(stats: OutputStats, manifest: Mapping[str, Any]) -> OutputStats:
    """Note where the manifest's counts differ from the rows actually in the Parquet files."""
    recorded = manifest.get("counts") or {}
    mismatch = []
    if "rows" in recorded and recorded["rows"] != stats.rows:
        mismatch.append(f"rows: manifest {recorded['rows']}, Parquet {stats.rows}")
    for status, count in stats.status_counts.items():
        if status in recorded and recorded[status] != count:
            mismatch.append(f"{status}: manifest {recorded[status]}, Parquet {count}")
    return replace(stats, manifest_mismatch=mismatch)


# ---------------------------------------------------------------- run summary (manifest)


def run_facts(output: OutputDir) -> list[tuple[str, str]]:
    """The run's identity and settings from `_manifest.json` as (name, value) text pairs, in display order."""
    m = output.manifest
    model = m.get("model") or {}
    vocabulary = m.get("vocabulary") or {}
    classes = vocabulary.get("classes") or []
    attempts = m.get("attempts") or []
    shown_classes = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    facts = [
        ("output", output.url),
        ("state", "complete (_SUCCESS present)" if output.complete else "INCOMPLETE: no _SUCCESS; finish it with lgca run --resume"),
        ("run id", str(m.get("run_id"))),
        ("format", str(m.get("format"))),
        ("code version", str(m.get("code_version"))),
        ("started", str(m.get("started_at"))),
        ("ended", str(m.get("ended_at"))),
        (
            "attempts",
            f"{len(attempts)} ({sum(a.get('rows_written', 0) for a in attempts)} rows written, "
            f"{sum(a.get('seconds', 0) for a in attempts):.1f} s)",
        ),
        ("inputs", ", ".join(m.get("inputs") or [])),
        ("model", f"{model.get('name')} / {model.get('pretrained')} ({model.get('source')})"),
        ("weights sha256", str(model.get("weights_sha256"))),
        ("method", str(m.get("method"))),
        ("scoring", _pairs(m.get("scoring") or {}, skip=("method",))),
        ("vocabulary", f"{len(classes)} classes: {shown_classes}"),
        ("labels file", str(vocabulary.get("labels_file"))),
        ("templates", str(vocabulary.get("templates_file") or "default")),
        ("prompt", str(vocabulary.get("prompt"))),
        ("vocabulary sha256", str(vocabulary.get("sha256"))),
        ("decode", _pairs(m.get("decode") or {})),
        ("execution", _pairs(m.get("execution") or {})),
    ]
    counts = m.get("counts") or {}
    if counts.get("non_image_files_skipped"):
        examples = ", ".join(counts.get("non_image_examples") or [])
        facts.append(("non-image files skipped", f"{counts['non_image_files_skipped']} (e.g. {examples})"))
    return facts


def _pairs(values: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    return ", ".join(f"{k}={_compact(v)}" for k, v in values.items() if k not in skip)


def _compact(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_compact(v) for v in value) + ")"
    return str(value)


# ---------------------------------------------------------------- terminal summary


def format_summary(output: OutputDir, stats: OutputStats, max_labels: int = 30, examples: int = 5) -> str:
    """The run summary as plain aligned text tables, for a terminal.

    Args:
        output: the opened output directory.
        stats: its statistics (`collect_stats`).
        max_labels: label rows shown (the rest are summed into one line).
        examples: error examples shown per status.

    Returns:
        Text ending in a newline.
    """
    lines = [f"lgca summary of {output.url}", ""]
    facts = run_facts(output)
    indent = max(len(name) for name, _ in facts) + 2
    for name, value in facts:  # long values (scoring settings) wrap under themselves, not across the table
        wrapped = textwrap.wrap(value, width=max(40, 110 - indent), break_on_hyphens=False) or [""]
        lines.append(name.ljust(indent) + wrapped[0])
        lines += [" " * indent + more for more in wrapped[1:]]
    lines += [""]
    status_rows = [(s, n, _percent(n, stats.rows)) for s, n in stats.status_counts.items()]
    lines += _text_table(["status", "rows", "share"], status_rows + [("total", stats.rows, "100.0%" if stats.rows else "-")], "lrr")
    for problem in stats.manifest_mismatch:
        lines.append(f"WARNING: _manifest.json disagrees with the Parquet files ({problem}); rerun lgca run --resume")
    lines += [""]
    if stats.labels:
        peak = max(item.count for item in stats.labels)
        label_rows = [
            (i.label, i.count, _percent(i.count, stats.ok), f"{i.mean_score:.3f}", _bar(i.count, peak, 30))
            for i in stats.labels[:max_labels]
        ]
        rest = stats.labels[max_labels:]
        if rest:
            label_rows.append(
                (f"({len(rest)} more labels)", sum(i.count for i in rest), _percent(sum(i.count for i in rest), stats.ok), "", "")
            )
        lines += _text_table(["label", "rows", "share", "mean score", ""], label_rows, "lrrrl")
    else:
        lines.append("no ok rows: no labels to show")
    lines += [""]
    if stats.score_quantiles:
        q = stats.score_quantiles
        lines.append("confidence (image-level score of ok rows): " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
        peak = max(stats.score_histogram) or 1
        width = 1.0 / SCORE_BINS
        filled = [i for i, n in enumerate(stats.score_histogram) if n]  # empty bins at either end are left out
        hist_rows = (
            [
                (f"{i * width:.2f}-{(i + 1) * width:.2f}", stats.score_histogram[i], _bar(stats.score_histogram[i], peak, 40))
                for i in range(filled[0], filled[-1] + 1)
            ]
            if filled
            else []
        )
        lines += _text_table(["score", "rows", ""], hist_rows, "lrl")
        lines += [""]
    levels = ", ".join(f"level {level}: {n}" for level, n in stats.boxes_by_level.items())
    lines.append(f"salient boxes: {stats.boxes}" + (f" ({levels})" if levels else ""))
    for status, kept in stats.error_examples.items():
        lines += ["", f"{status}: {stats.status_counts.get(status, 0)} rows; first {min(examples, len(kept))}:"]
        lines += _text_table(["key", "error_message"], [(k, _one_line(m, 160)) for k, m in kept[:examples]], "ll")
    return "\n".join(lines) + "\n"


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths])] + [line(row) for row in cells[1:]]


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _bar(value: int, peak: int, width: int) -> str:
    return "#" * (round(width * value / peak) if peak else 0)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- gallery data


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
                "topkScores": [[_round3(v) for v in row or ()] for row in part.column("topk_scores").to_pylist()],
            }
        )
        start += count
    groups.sort(key=lambda g: (-g["count"], classes[g["label"]]))
    return groups


def _rounded(column: pa.ChunkedArray) -> list[float | None]:
    return pc.round(pc.cast(column, pa.float64()), 3).to_pylist()


def _round3(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 3)


# ---------------------------------------------------------------- thumbnails


def thumbnail_name(key: str, path: str) -> str:
    """File name of a row's thumbnail: stable for the same key and path, safe in any file system."""
    return hashlib.sha1(f"{key}\0{path}".encode()).hexdigest()[:16] + ".jpg"


def make_thumbnail(data: bytes, size: int, max_pixels: int | None = None) -> tuple[bytes, int, int]:
    """JPEG bytes of an upright thumbnail whose longer side is at most `size`, and its width and height.

    Decoding goes through `pipeline.stages.decode` (EXIF orientation, decompression-bomb limit, transparency
    over grey), so a thumbnail is the same upright picture the boxes were computed on.

    Args:
        data: the image file's bytes.
        size: longest side of the thumbnail in pixels.
        max_pixels: the run's decompression-bomb limit (its --max-pixels); None for the default.

    Raises:
        ValueError: the bytes are not a decodable image (the message says why).
    """
    limits = {"max_pixels": max_pixels} if max_pixels else {}
    # Shorter side >= size, so the longer one is too: the thumbnail is never smaller than asked.
    decoded = decode_image(data, DecodeConfig(min_short_side=size, **limits))
    if isinstance(decoded, DecodeFailure):
        raise ValueError(decoded.message)
    image = Image.fromarray(decoded.pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return buffer.getvalue(), image.width, image.height


def _write_thumbnails(
    table: pa.Table, directory: Path, size: int, max_pixels: int | None, storage_options: Mapping[str, Any], workers: int
) -> dict[str, dict[str, Any]]:
    """Thumbnails for each row of `table` (key, path, boxes), written into `directory`; key -> gallery entry."""

    def one(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        entry: dict[str, Any] = {"path": row["path"], "boxes": [_box_entry(b) for b in row.get("boxes") or ()]}
        try:
            data, width, height = make_thumbnail(read_bytes(row["path"], storage_options), size, max_pixels)
        except Exception as error:  # an unreadable image costs its thumbnail, never the report
            entry["error"] = _one_line(f"{type(error).__name__}: {error}", 200)
            return row["key"], entry
        name = thumbnail_name(row["key"], row["path"])
        (directory / name).write_bytes(data)
        entry.update(src=f"{directory.name}/{name}", w=width, h=height)
        return row["key"], entry

    rows = table.to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # reads are I/O bound; PIL releases the GIL
        return dict(pool.map(one, rows))


def _box_entry(box: Mapping[str, Any]) -> list[Any]:
    # [x0, y0, x1, y1, level, parent, label, score, saliency], compact for the embedded JSON
    return [round(float(box[k]), 4) for k in ("x0", "y0", "x1", "y1")] + [
        box.get("level"),
        box.get("parent"),
        box.get("label"),
        _round3(box.get("score")),
        _round3(box.get("saliency")),
    ]


def _prepare_thumbnail_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():  # thumbnails of an earlier report; nothing else is touched
        if entry.is_file() and THUMBNAIL_NAME.match(entry.name):
            entry.unlink()


# ---------------------------------------------------------------- HTML report


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
    _prepare_thumbnail_dir(thumbnail_dir)

    stats = collect_stats(output, error_examples)
    classes = list(output.classes) + sorted({i.label for i in stats.labels} - set(output.classes))
    groups = gallery_groups(output, classes, max_gallery_rows, thumbnails_per_label)
    chosen = [key for group in groups for key in group["keys"][:thumbnails_per_label]]
    thumbs: dict[str, dict[str, Any]] = {}
    if chosen:
        table = output.dataset().to_table(
            columns=["key", "path", "boxes"], filter=(ds.field("status") == OK) & ds.field("key").isin(chosen)
        )
        # Images the run accepted under a raised --max-pixels must not fail here on the default limit.
        max_pixels = (output.manifest.get("decode") or {}).get("max_pixels")
        thumbs = _write_thumbnails(table, thumbnail_dir, thumbnail_size, max_pixels, storage_options or {}, workers)
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
        f'<td class="num">{_percent(n, stats.rows)}</td></tr>'
        for s, n in stats.status_counts.items()
    )
    status_table = (
        f'<table class="grid"><thead><tr><th>status</th><th>rows</th><th>share</th></tr></thead>'
        f'<tbody>{status_rows}<tr class="total"><td>total</td><td class="num" id="count-rows">{stats.rows}</td>'
        f'<td class="num">{"100.0%" if stats.rows else "-"}</td></tr></tbody></table>'
    )
    levels = ", ".join(f"level {level}: {n}" for level, n in stats.boxes_by_level.items())
    return _PAGE.format(
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
        style=_STYLE,
        data=_script_json(data),
        script=_SCRIPT,
    )


def _label_table(stats: OutputStats) -> str:
    if not stats.labels:
        return "<p>No ok rows, so no labels.</p>"
    e = html.escape
    peak = max(i.count for i in stats.labels)
    rows = "\n".join(
        f'<tr><td><a href="#gallery" class="label-link" data-label="{e(i.label)}">{e(i.label)}</a></td>'
        f'<td class="num" data-label-count="{e(i.label)}">{i.count}</td><td class="num">{_percent(i.count, stats.ok)}</td>'
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


_STYLE = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#d2d2d7; --bg:#fff; --panel:#f5f5f7; --accent:#0a66c2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg);
       margin: 0 auto; max-width: 1400px; padding: 16px 24px 48px; }
h1 { font-size: 20px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 16px 0 6px; }
code { background: var(--panel); padding: 0 4px; border-radius: 3px; }
.warn { background: #fff4e5; border: 1px solid #ffb74d; padding: 8px 12px; border-radius: 6px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
table.grid { border-collapse: collapse; } .grid th, .grid td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: left; }
table.facts th { text-align: left; color: var(--muted); font-weight: 500; padding: 2px 16px 2px 0; vertical-align: top; white-space: nowrap; }
table.facts td { word-break: break-word; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; border: 1px solid var(--line); border-radius: 6px; }
.labels .barcell { width: 260px; } .bar { height: 10px; background: var(--accent); border-radius: 2px; min-width: 1px; }
.errors td.key { font-family: ui-monospace, monospace; white-space: nowrap; }
.errors td { vertical-align: top; max-width: 900px; word-break: break-word; }
svg text { font-size: 11px; fill: var(--muted); } svg .hbar { fill: var(--accent); } svg .axis { stroke: var(--muted); }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 8px 0; }
.controls select, .controls button { font: inherit; padding: 3px 8px; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; margin: 6px 0 10px; color: var(--muted); }
.legend-item { display: inline-flex; align-items: center; gap: 6px; }
.swatch { display: inline-block; width: 18px; height: 12px; border: 3px solid; }
#gallery-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(224px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: var(--bg); }
.frame-wrap { height: 204px; display: flex; align-items: center; justify-content: center; background: var(--panel); border-radius: 4px; }
.frame { position: relative; overflow: hidden; }
.frame img { display: block; width: 100%; height: 100%; }
.box { position: absolute; border: 3px solid; box-sizing: border-box; pointer-events: auto; }
.placeholder { color: var(--muted); font-size: 12px; padding: 8px; text-align: center; }
.meta { margin-top: 6px; font-size: 12px; }
.meta .key { font-family: ui-monospace, monospace; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.meta .pred { font-weight: 600; }
.meta ol { margin: 2px 0 0; padding-left: 20px; color: var(--muted); }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("lgca-data").textContent);
  var DISPLAY = %(display)d;
  var state = { group: 0, page: 0, size: DATA.pageSize };
  var select = document.getElementById("gallery-label");
  var sizeSelect = document.getElementById("gallery-size");
  var grid = document.getElementById("gallery-grid");
  var status = document.getElementById("gallery-status");
  var prev = document.getElementById("gallery-prev");
  var next = document.getElementById("gallery-next");

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function num(x) { return x === null || x === undefined ? "-" : Number(x).toFixed(3); }
  function colour(level) { return DATA.colours[((level %% DATA.colours.length) + DATA.colours.length) %% DATA.colours.length]; }

  function frameFor(key, thumb) {
    var wrap = el("div", "frame-wrap");
    if (!thumb) {
      wrap.appendChild(el("div", "placeholder", DATA.thumbnailsPerLabel === 0 ? "no thumbnail (--thumbnails-per-label 0)" :
        "no thumbnail (beyond the " + DATA.thumbnailsPerLabel + " lowest-confidence rows of this label; see --thumbnails-per-label)"));
      return wrap;
    }
    if (thumb.error) {
      wrap.appendChild(el("div", "placeholder", "thumbnail failed: " + thumb.error));
      return wrap;
    }
    var scale = Math.min(DISPLAY / thumb.w, DISPLAY / thumb.h);
    var frame = el("div", "frame");
    frame.style.width = Math.round(thumb.w * scale) + "px";
    frame.style.height = Math.round(thumb.h * scale) + "px";
    var img = el("img");
    img.src = thumb.src;
    img.alt = key;
    img.decoding = "async";
    frame.appendChild(img);
    // Grown regions first, so the selected local crop (level 0) is drawn on top.
    var boxes = thumb.boxes.slice().sort(function (a, b) { return b[4] - a[4]; });
    boxes.forEach(function (b) {
      var box = el("div", "box");
      box.style.left = (b[0] * 100) + "%%";
      box.style.top = (b[1] * 100) + "%%";
      box.style.width = ((b[2] - b[0]) * 100) + "%%";
      box.style.height = ((b[3] - b[1]) * 100) + "%%";
      box.style.borderColor = colour(b[4]);
      box.dataset.level = b[4];
      box.title = "level " + b[4] + (b[5] >= 0 ? " (grown from box " + b[5] + ")" : "") + ": " + b[6] +
        " " + num(b[7]) + ", saliency " + num(b[8]);
      frame.appendChild(box);
    });
    wrap.appendChild(frame);
    return wrap;
  }

  function card(group, i) {
    var key = group.keys[i];
    var thumb = DATA.thumbs[key];
    var node = el("div", "card");
    node.dataset.key = key;
    node.appendChild(frameFor(key, thumb));
    var meta = el("div", "meta");
    var keyLine = el("div", "key", key);
    keyLine.title = thumb ? thumb.path : key;
    meta.appendChild(keyLine);
    meta.appendChild(el("div", "pred", DATA.classes[group.label] + " " + num(group.scores[i]) +
      "  (margin " + num(group.margins[i]) + ")"));
    var list = el("ol");
    var lines = [];
    group.topk[i].forEach(function (c, j) {
      var text = (c === null ? "?" : DATA.classes[c]) + " " + num(group.topkScores[i][j]);
      lines.push(text);
      list.appendChild(el("li", null, text));
    });
    meta.appendChild(list);
    node.title = "top-k: " + lines.join(", ");
    node.appendChild(meta);
    return node;
  }

  function render() {
    grid.textContent = "";
    var group = DATA.groups[state.group];
    if (!group) {
      status.textContent = "no ok rows";
      prev.disabled = next.disabled = true;
      return;
    }
    var embedded = group.keys.length;
    var pages = Math.max(1, Math.ceil(embedded / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var start = state.page * state.size, end = Math.min(embedded, start + state.size);
    for (var i = start; i < end; i++) grid.appendChild(card(group, i));
    status.textContent = "page " + (state.page + 1) + " of " + pages + " \u00b7 rows " + (start + 1) + "\u2013" + end +
      " of " + group.count + " \u00b7 lowest confidence first" + (embedded < group.count ? " \u00b7 only the " + embedded +
      " lowest-confidence rows are embedded (--max-gallery-rows); lgca export --labels lists them all" : "");
    status.dataset.count = group.count;
    status.dataset.embedded = embedded;
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
  }

  DATA.groups.forEach(function (g, i) {
    var option = el("option", null, DATA.classes[g.label] + " (" + g.count + ")");
    option.value = String(i);
    select.appendChild(option);
  });
  DATA.pageSizes.forEach(function (n) {
    var option = el("option", null, n + " per page");
    option.value = String(n);
    if (n === state.size) option.selected = true;
    sizeSelect.appendChild(option);
  });
  select.addEventListener("change", function () { state.group = Number(select.value); state.page = 0; render(); });
  sizeSelect.addEventListener("change", function () { state.size = Number(sizeSelect.value); state.page = 0; render(); });
  prev.addEventListener("click", function () { state.page -= 1; render(); });
  next.addEventListener("click", function () { state.page += 1; render(); });
  Array.prototype.forEach.call(document.querySelectorAll(".label-link"), function (link) {
    link.addEventListener("click", function () {
      for (var i = 0; i < DATA.groups.length; i++) {
        if (DATA.classes[DATA.groups[i].label] === link.dataset.label) { state.group = i; select.value = String(i); }
      }
      state.page = 0;
      render();
    });
  });
  render();
})();
""" % {"display": _DISPLAY_SIDE}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>lgca report</h1>
<p><code>{url}</code></p>
{banner}
<nav><a href="#run">run</a><a href="#statuses">statuses</a><a href="#labels">labels</a><a href="#confidence">confidence</a>
<a href="#errors">errors</a><a href="#gallery">gallery</a></nav>

<h2 id="run">Run</h2>
<table class="facts">{facts}</table>

<h2 id="statuses">Rows by status</h2>
{status_table}
<p>{boxes}</p>

<h2 id="labels">Labels</h2>
{label_table}

<h2 id="confidence">Confidence</h2>
<p>Image-level score of ok rows: {quantiles}</p>
{histogram}

<h2 id="errors">Errors</h2>
{errors}

<h2 id="gallery">Gallery</h2>
<p>Per label, lowest confidence first. The {thumbnails_per_label} lowest-confidence rows of each label have a thumbnail
with the salient boxes drawn; hover a card for its top-k, a box for its label and score.</p>
<div class="legend">{legend}</div>
<div class="controls">
  <label>label <select id="gallery-label"></select></label>
  <select id="gallery-size" aria-label="page size"></select>
  <button id="gallery-prev" type="button">&larr; previous</button>
  <button id="gallery-next" type="button">next &rarr;</button>
  <span id="gallery-status"></span>
</div>
<div id="gallery-grid"></div>

<script type="application/json" id="lgca-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
