"""The report's gallery data: which rows it holds, in what order, the compact index the page filters and sorts, and its detail chunks.

The page holds an index of every gallery row (key, status, label, score, margin: about 40 bytes a row) and
loads the rest of a row (path, size, top-k, boxes, error, thumbnail) from small script files, a chunk of
CHUNK_ROWS rows at a time, only for the rows a page shows. Chunks follow the index's order (label, then
confidence), so the rows of one page mostly share a chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.review.output_dir import OutputDir
from pipeline.review.stats import score_bins
from pipeline.review.values import number
from pipeline.schema import OK, STATUSES

CHUNK_ROWS = 256  # rows per detail file: a page of up to 96 cards reads one to a few of them
CHUNK_CALLBACK = "lgcaRows"  # each chunk file is `lgcaRows(index, [...]);`, a classic script that works from file://
INDEX_COLUMNS = ["key", "status", "label", "score", "margin"]
DETAIL_COLUMNS = ["path", "width", "height", "topk_labels", "topk_scores", "boxes", "error_message"]


@dataclass(frozen=True)
class GalleryRows:
    """The rows the gallery holds, in its default order, and how they were chosen."""

    table: pa.Table  # INDEX_COLUMNS + DETAIL_COLUMNS: ok rows by label then score (lowest first), then failed rows
    total: int  # rows in the output
    cut: bool  # above the cap: each group kept its share

    @property
    def rows(self) -> int:
        return self.table.num_rows


def gallery_rows(output: OutputDir, classes: Sequence[str], max_rows: int, min_per_group: int = 24) -> GalleryRows:
    """Every row of the output, or above `max_rows` each group's share of them, in the gallery's default order.

    Groups are the labels of ok rows and each failure status. Above the cap a group keeps its share
    (its fraction of all rows times `max_rows`, at least `min_per_group`): half its lowest-confidence rows
    and half its highest, so either sort order shows real extremes; failed rows by key.

    Args:
        output: the opened output directory.
        classes: label names; ok rows are grouped in this order.
        max_rows: rows held before each group is cut to its share.
        min_per_group: rows a group keeps whatever its share.
    """
    dataset = output.dataset()
    index = dataset.to_table(columns=INDEX_COLUMNS)  # about 40 bytes a row; the details are read for kept rows only
    total = index.num_rows
    status_rank = pc.fill_null(pc.index_in(index.column("status"), value_set=pa.array(STATUSES)), len(STATUSES))
    label_rank = pc.fill_null(pc.index_in(index.column("label"), value_set=pa.array(list(classes), pa.string())), len(classes))
    index = index.append_column("_status", status_rank).append_column("_label", label_rank)
    index = index.sort_by([("_status", "ascending"), ("_label", "ascending"), ("score", "ascending"), ("key", "ascending")])
    cut = total > max_rows
    if not cut:
        details = dataset.to_table(columns=["key", *DETAIL_COLUMNS])
    else:
        index = index.take(pa.array(_kept_positions(index, total, max_rows, min_per_group), pa.int64()))
        details = dataset.to_table(columns=["key", *DETAIL_COLUMNS], filter=ds.field("key").isin(index.column("key")))
    # Keys are unique in an output: put each detail row where its key stands in the index.
    position = pc.index_in(details.column("key"), value_set=index.column("key"))
    details = details.take(pc.sort_indices(position))
    table = index.drop_columns(["_status", "_label"])
    for name in DETAIL_COLUMNS:
        table = table.append_column(details.schema.field(name), details.column(name))
    return GalleryRows(table, total, cut)


def _kept_positions(table: pa.Table, total: int, max_rows: int, min_per_group: int) -> np.ndarray:
    groups = np.column_stack([table.column("_status").to_numpy(), table.column("_label").to_numpy()])
    starts = np.flatnonzero(np.r_[True, np.any(groups[1:] != groups[:-1], axis=1)])
    ends = np.r_[starts[1:], len(groups)]
    kept = []
    for start, end in zip(starts, ends):
        count = end - start
        share = min(count, max(min_per_group, max_rows * count // total))
        low = (share + 1) // 2
        kept.append(np.arange(start, start + low))
        kept.append(np.arange(end - (share - low), end))
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def gallery_index(rows: GalleryRows, classes: Sequence[str]) -> dict[str, Any]:
    """The page's index of the gallery rows, as columns: keys, status and label indices, scores, margins, score bins.

    Labels are indices into `classes` (null for a failed row); statuses indices into STATUSES.
    """
    table = rows.table
    label_index = {label: i for i, label in enumerate(classes)}
    return {
        "keys": table.column("key").to_pylist(),
        "status": [STATUSES.index(s) if s in STATUSES else -1 for s in table.column("status").to_pylist()],
        "label": [label_index.get(label) if label is not None else None for label in table.column("label").to_pylist()],
        "score": _rounded(table.column("score")),
        "margin": _rounded(table.column("margin")),
        "bin": _bins(table.column("score")),
        "chunkRows": CHUNK_ROWS,
        "total": rows.total,
        "cut": rows.cut,
    }


def thumbnail_order(rows: GalleryRows, limit: int) -> list[str]:
    """The image paths to thumbnail, at most `limit`: each label's lowest-confidence rows first, labels in turn.

    Failed rows get none (their images could not be read or decoded).
    """
    table = rows.table
    ok = np.flatnonzero(table.column("status").to_numpy(zero_copy_only=False) == OK)
    if limit <= 0 or not len(ok):
        return []
    labels = table.column("label").take(pa.array(ok)).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(labels[1:] != labels[:-1]) + 1]
    within = np.arange(len(ok)) - np.repeat(starts, np.diff(np.r_[starts, len(ok)]))  # rank inside the label
    turn = ok[np.lexsort((np.arange(len(ok)), within))]  # rank 0 of every label, then rank 1, ...
    paths = table.column("path").take(pa.array(turn)).to_pylist()
    return list(dict.fromkeys(paths))[:limit]


def detail_chunks(
    rows: GalleryRows,
    classes: Sequence[str],
    thumbs: Mapping[str, Mapping[str, Any]],
    thumb_folder: str,
    link: Any,
) -> Iterator[tuple[int, str]]:
    """The detail chunk files' texts, CHUNK_ROWS rows each, in index order: (chunk number, script text).

    A row is `[path, link, width, height, thumb, topk, boxes, error]`: `link` the full-size image's URL or
    None, `thumb` {src, w, h} or {error} or None (beyond the budget), `topk` [[label, score], ...], boxes
    [x0, y0, x1, y1, level, parent, label, score, saliency] with labels as indices into `classes`.

    Args:
        rows: the gallery rows.
        classes: label names, for label indices.
        thumbs: image path -> what `write_thumbnails` returned.
        thumb_folder: thumbnails' folder relative to the page, for `src`.
        link: image path -> URL to open it in a browser, or None.
    """
    label_index = {label: i for i, label in enumerate(classes)}
    for number_, start in enumerate(range(0, rows.rows, CHUNK_ROWS)):
        part = rows.table.slice(start, CHUNK_ROWS).select(DETAIL_COLUMNS).to_pylist()
        items = [_detail(row, label_index, thumbs.get(row["path"]), thumb_folder, link(row["path"])) for row in part]
        yield number_, f"{CHUNK_CALLBACK}({number_},{json.dumps(items, ensure_ascii=False, separators=(',', ':'), allow_nan=False)});\n"


def _detail(
    row: Mapping[str, Any], label_index: Mapping[str, int], thumb: Mapping[str, Any] | None, thumb_folder: str, link: str | None
) -> list[Any]:
    shown: dict[str, Any] | None = None
    if thumb is not None:
        shown = (
            {"error": thumb["error"]} if "error" in thumb else {"src": f"{thumb_folder}/{thumb['name']}", "w": thumb["w"], "h": thumb["h"]}
        )
    topk = [[label_index.get(c), number(s, 3)] for c, s in zip(row.get("topk_labels") or (), row.get("topk_scores") or ())]
    boxes = [
        [round(float(box[k]), 4) for k in ("x0", "y0", "x1", "y1")]
        + [
            box.get("level"),
            box.get("parent"),
            label_index.get(box.get("label")),
            number(box.get("score"), 3),
            number(box.get("saliency"), 3),
        ]
        for box in row.get("boxes") or ()
    ]
    return [row["path"], link, row.get("width"), row.get("height"), shown, topk, boxes, row.get("error_message")]


def _bins(column: pa.ChunkedArray) -> list[int | None]:
    """Each row's confidence-histogram bin (`stats.score_bins`, on the unrounded score), None without a score."""
    values = pc.fill_null(pc.cast(column, pa.float64()), -1.0).to_numpy()
    return [int(b) if v >= 0 else None for b, v in zip(score_bins(values), values)]


def _rounded(column: pa.ChunkedArray) -> list[float | None]:
    return pc.round(pc.cast(column, pa.float64()), 3).to_pylist()
