"""Curation exports of an output directory (Label Studio, COCO, FiftyOne, CSV) and the box coordinate conversions they use."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.review.formats import FORMATS, PREDICTION_FORMATS
from pipeline.schema import OK, OUTPUT_COLUMNS, STATUSES, output_schema
from pipeline.stages.sink import MANIFEST, PART_PATTERN, SUCCESS
from pipeline.stages.sources import filesystem_for

# Formats that carry predictions: by default they take ok rows only, since failed rows have no label,
# no boxes and usually no size. CSV takes every row unless --status says otherwise.
LS_IMAGE = "image"  # Label Studio object tag name: <Image name="image" value="$image"/>
LS_CHOICES = "label"  # <Choices name="label" toName="image">, the image-level label
LS_BOXES = "box"  # <RectangleLabels name="box" toName="image">, the salient boxes
FIFTYONE_FILES = ("data.json", "labels.json", "classifications.json")
CSV_COLUMNS = (
    "key",
    "path",
    "status",
    "label",
    "score",
    "margin",
    "topk",
    "error_message",
    "width",
    "height",
    "boxes",
    "method",
    "model",
    "pretrained",
)
BATCH_ROWS = 8192  # rows per Arrow batch while streaming a directory: bounded memory, few Python round trips
_PIXEL_DECIMALS = 3  # COCO pixel coordinates: a thousandth of a pixel is below any use
_PERCENT_DECIMALS = 5  # Label Studio percent coordinates; 1e-5 % of a 100k-pixel side is 0.01 px
_RELATIVE_DECIMALS = 7  # FiftyOne relative coordinates, near float32 precision
_SCORE_DECIMALS = 6

Box4 = tuple[float, float, float, float]


class CurationError(ConfigError):
    """An output directory or an export request cannot be used as given; the message names the fix."""


# ---------------------------------------------------------------- coordinates


def xyxy_to_coco(box: Sequence[float], width: float, height: float) -> Box4:
    """Normalised (x0, y0, x1, y1) to COCO absolute (x, y, w, h) in pixels of the upright image.

    Args:
        box: corners as fractions of the image width and height, x0 <= x1, y0 <= y1.
        width: upright image width in pixels, > 0.
        height: upright image height in pixels, > 0.

    Returns:
        (left, top, box width, box height) in pixels.

    Raises:
        ValueError: a non-positive image size.
    """
    _check_size(width, height)
    x0, y0, x1, y1 = box
    return (x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height)


def coco_to_xyxy(bbox: Sequence[float], width: float, height: float) -> Box4:
    """COCO absolute (x, y, w, h) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_coco`.

    Raises:
        ValueError: a non-positive image size.
    """
    _check_size(width, height)
    x, y, w, h = bbox
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def xyxy_to_percent(box: Sequence[float]) -> Box4:
    """Normalised (x0, y0, x1, y1) to Label Studio's (x, y, width, height) in percent of the image.

    Label Studio stores rectangles as the top-left corner and size, each in percent of the image's
    width or height, so no pixel size is needed (it is sent alongside as original_width/original_height).
    """
    x0, y0, x1, y1 = box
    return (x0 * 100.0, y0 * 100.0, (x1 - x0) * 100.0, (y1 - y0) * 100.0)


def percent_to_xyxy(rect: Sequence[float]) -> Box4:
    """Label Studio percent (x, y, width, height) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_percent`."""
    x, y, w, h = rect
    return (x / 100.0, y / 100.0, (x + w) / 100.0, (y + h) / 100.0)


def xyxy_to_relative_xywh(box: Sequence[float]) -> Box4:
    """Normalised (x0, y0, x1, y1) to FiftyOne's bounding_box [top-left-x, top-left-y, width, height] in [0, 1]."""
    x0, y0, x1, y1 = box
    return (x0, y0, x1 - x0, y1 - y0)


def relative_xywh_to_xyxy(rect: Sequence[float]) -> Box4:
    """FiftyOne relative (x, y, w, h) to normalised (x0, y0, x1, y1); the inverse of `xyxy_to_relative_xywh`."""
    x, y, w, h = rect
    return (x, y, x + w, y + h)


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width} x {height}")


# ---------------------------------------------------------------- reading an output directory


@dataclass(frozen=True)
class OutputDir:
    """A committed `lgca run` output: its Parquet parts, `_manifest.json` and whether `_SUCCESS` is there."""

    url: str  # as given by the user
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str  # path within `fs`, no trailing slash
    manifest: dict[str, Any] = field(repr=False)
    files: tuple[str, ...]  # part-*.parquet paths within `fs`, sorted
    complete: bool  # _SUCCESS present: the run (or its last resume) finished

    @property
    def classes(self) -> tuple[str, ...]:
        """The run's vocabulary, in label order."""
        return tuple((self.manifest.get("vocabulary") or {}).get("classes") or ())

    def dataset(self) -> ds.Dataset:
        """All part files as one pyarrow dataset (lazy; columns and rows are read on demand)."""
        return self._dataset

    @cached_property
    def _dataset(self) -> ds.Dataset:  # built once: on S3 it costs a listing and a footer read
        if not self.files:
            return ds.dataset(output_schema().empty_table())
        # pyarrow's own local filesystem is faster than going through fsspec's wrapper.
        filesystem = None if isinstance(self.fs, LocalFileSystem) else self.fs
        return ds.dataset(list(self.files), format="parquet", filesystem=filesystem)

    def passthrough_columns(self) -> list[str]:
        """Manifest columns copied to the output, in file order."""
        return [name for name in self.dataset().schema.names if name not in OUTPUT_COLUMNS]

    def batches(self, columns: Sequence[str], filter: ds.Expression | None = None) -> Iterator[pa.RecordBatch]:
        """Stream `columns` of the rows matching `filter`, BATCH_ROWS at a time, in file order."""
        yield from self.dataset().to_batches(columns=list(columns), filter=filter, batch_size=BATCH_ROWS)


def open_output(url: str, storage_options: Mapping[str, Any] | None = None) -> OutputDir:
    """Open the output directory of an `lgca run` (local path or fsspec URI such as s3://bucket/out).

    Args:
        url: the --output given to `lgca run`.
        storage_options: fsspec options (endpoint_url, key, secret, ...) for remote outputs.

    Returns:
        The directory, with its manifest loaded and its part files listed.

    Raises:
        CurationError: the directory does not exist or has no `_manifest.json`, or the manifest is not JSON.
    """
    fs, root = filesystem_for(url, storage_options or {})
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)
        if not fs.exists(root):
            raise CurationError(f"output directory {url} does not exist; point at the --output of lgca run")
        manifest_path = f"{root}/{MANIFEST}"
        if not fs.exists(manifest_path):
            parts = " (it has part files: the run did not finish; rerun lgca run with --resume)" if _part_files(fs, root) else ""
            raise CurationError(f"not an lgca output directory: {url} has no {MANIFEST}{parts}; point at the --output of lgca run")
        with fs.open(manifest_path, "rb") as handle:
            raw = handle.read()
        files = tuple(_part_files(fs, root))
        complete = fs.exists(f"{root}/{SUCCESS}")
    except OSError as error:  # PermissionError included: wrong credentials, endpoint or bucket
        raise CurationError(f"cannot read output {url}: {error}; check the path and --storage-option (endpoint_url, key, secret)") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CurationError(f"{url}/{MANIFEST} is not valid JSON ({error}); rerun lgca run with --resume to rewrite it") from None
    if not isinstance(manifest, dict):
        raise CurationError(f"{url}/{MANIFEST} is not a JSON object; rerun lgca run with --resume to rewrite it")
    return OutputDir(url, fs, root, manifest, files, complete)


def _part_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    names = [p for p in fs.ls(root, detail=False) if PART_PATTERN.match(p.rstrip("/").rsplit("/", 1)[-1])]
    return sorted(names)


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class RowFilter:
    """Which rows an export (or report) takes; empty fields take everything."""

    min_score: float | None = None  # keep rows whose image-level score is >= this (failed rows have none)
    max_score: float | None = None  # keep rows whose image-level score is <= this: the unsure ones, for review
    labels: tuple[str, ...] = ()  # keep rows whose image-level label is one of these
    statuses: tuple[str, ...] = ()  # keep rows with one of these statuses

    def check(self, classes: Sequence[str]) -> None:
        """Raise CurationError naming the fix for a status or label the output cannot have."""
        unknown = [s for s in self.statuses if s not in STATUSES]
        if unknown:
            raise CurationError(f"status {', '.join(unknown)} is not one of {', '.join(STATUSES)}; fix --status")
        if classes:
            missing = [label for label in self.labels if label not in classes]
            if missing:
                shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
                raise CurationError(f"label {', '.join(repr(m) for m in missing)} is not in this run's vocabulary ({shown}); fix --labels")
        for name, value in (("--min-score", self.min_score), ("--max-score", self.max_score)):
            if value is not None and not math.isfinite(value):
                raise CurationError(f"{name} must be a finite number, got {value}")

    def expression(self) -> ds.Expression | None:
        """The filter as a pyarrow dataset expression, or None to take every row."""
        parts = []
        if self.statuses:
            parts.append(ds.field("status").isin(list(self.statuses)))
        if self.labels:
            parts.append(ds.field("label").isin(list(self.labels)))
        if self.min_score is not None:
            parts.append(ds.field("score") >= self.min_score)
        if self.max_score is not None:
            parts.append(ds.field("score") <= self.max_score)
        expression = None
        for part in parts:
            expression = part if expression is None else expression & part
        return expression


def default_filter(
    fmt: str,
    min_score: float | None = None,
    labels: Sequence[str] = (),
    statuses: Sequence[str] = (),
    max_score: float | None = None,
) -> RowFilter:
    """The filter of an export: as given, with statuses defaulting to ok for the formats that carry predictions.

    Args:
        fmt: the export format (one of FORMATS).
        min_score: keep rows scoring at least this.
        labels: keep rows with one of these labels; empty keeps all.
        statuses: keep rows with one of these statuses; empty means ok for labelstudio, coco and
            fiftyone, every status for csv.
        max_score: keep rows scoring at most this.

    Returns:
        The filter.
    """
    chosen = tuple(statuses) or ((OK,) if fmt in PREDICTION_FORMATS else ())
    return RowFilter(min_score=min_score, max_score=max_score, labels=tuple(labels), statuses=chosen)


# ---------------------------------------------------------------- one row per format


def labelstudio_task(row: Mapping[str, Any], passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """One Label Studio task with the row's prediction (choices for the label, rectanglelabels for the boxes).

    Follows Label Studio's import format for pre-annotations: `data` holds the image URL under "image"
    (plus key, status and pass-through columns, usable in filters), `predictions` one prediction whose
    `result` regions name the control tags of `labelstudio_config` (from_name "label" and "box",
    to_name "image"). A row without a prediction gets an empty `predictions` list.

    Args:
        row: an output row as a dict (columns of `pipeline.schema.output_schema`).
        passthrough: manifest columns to copy into `data`.

    Returns:
        The task dict, ready for json.dumps.
    """
    data: dict[str, Any] = {LS_IMAGE: row["path"], "key": row["key"], "status": row["status"]}
    if row.get("error_message"):
        data["error_message"] = row["error_message"]
    for name in passthrough:
        if name not in data:
            data[name] = _jsonable(row.get(name))
    task: dict[str, Any] = {"data": data, "predictions": []}
    if row.get("label") is None:
        return task
    score = _number(row.get("score"), _SCORE_DECIMALS)
    result: list[dict[str, Any]] = [
        {
            "id": "label",
            "type": "choices",
            "from_name": LS_CHOICES,
            "to_name": LS_IMAGE,
            "value": {"choices": [row["label"]]},
            "score": score,
        }
    ]
    width, height = row.get("width"), row.get("height")
    for index, box in enumerate(row.get("boxes") or ()):
        x, y, w, h = (_number(v, _PERCENT_DECIMALS) for v in xyxy_to_percent(_corners(box)))
        region: dict[str, Any] = {
            "id": f"box{index}",
            "type": "rectanglelabels",
            "from_name": LS_BOXES,
            "to_name": LS_IMAGE,
            "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [box["label"]]},
            "score": _number(box.get("score"), _SCORE_DECIMALS),
            "meta": {"text": [f"level {box['level']}, parent {box['parent']}, saliency {_number(box.get('saliency'), 4)}"]},
        }
        if width and height:
            region["original_width"], region["original_height"] = int(width), int(height)
        result.append(region)
    task["predictions"].append({"model_version": _model_version(row), "score": score, "result": result})
    return task


def labelstudio_config(classes: Sequence[str]) -> str:
    """The Label Studio labeling config (XML) whose tag names match `labelstudio_task`'s regions."""
    choices = "\n".join(f'    <Choice value="{_xml(c)}"/>' for c in classes)
    labels = "\n".join(f'    <Label value="{_xml(c)}"/>' for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>\n'
        f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInLine="true">\n{choices}\n  </Choices>\n'
        f'  <RectangleLabels name="{LS_BOXES}" toName="{LS_IMAGE}">\n{labels}\n  </RectangleLabels>\n'
        "</View>\n"
    )


def coco_image(row: Mapping[str, Any], image_id: int, categories: Mapping[str, int], passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """The COCO `images` entry of a row; the image-level prediction goes in its `attributes`.

    Args:
        row: an output row as a dict.
        image_id: this image's id (unique in the file).
        categories: label -> category id.
        passthrough: manifest columns to copy into `attributes`.
    """
    attributes: dict[str, Any] = {
        "key": row["key"],
        "status": row["status"],
        "label": row.get("label"),
        "category_id": categories.get(row["label"]) if row.get("label") is not None else None,
        "score": _number(row.get("score"), _SCORE_DECIMALS),
        "margin": _number(row.get("margin"), _SCORE_DECIMALS),
        "topk_labels": row.get("topk_labels"),
        "topk_scores": _numbers(row.get("topk_scores"), _SCORE_DECIMALS),
        "error_message": row.get("error_message"),
        "method": row.get("method"),
        "model": row.get("model"),
        "pretrained": row.get("pretrained"),
    }
    for name in passthrough:
        attributes.setdefault(name, _jsonable(row.get(name)))
    return {"id": image_id, "file_name": row["path"], "width": row.get("width"), "height": row.get("height"), "attributes": attributes}


def coco_annotations(row: Mapping[str, Any], image_id: int, first_id: int, categories: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO detection annotations for a row's salient boxes, with ids first_id, first_id + 1, ...

    Each has `bbox` (absolute x, y, w, h), `area`, `iscrowd` 0, `score` (the box's own class score) and
    `attributes` {level, parent_id (annotation id of the box it grew from, or null), saliency}.
    A row without width/height (no successful decode) has no annotations.
    """
    width, height = row.get("width"), row.get("height")
    boxes = row.get("boxes") or ()
    if not boxes or not width or not height:
        return []
    annotations = []
    for index, box in enumerate(boxes):
        x, y, w, h = (_number(v, _PIXEL_DECIMALS) for v in xyxy_to_coco(_corners(box), width, height))
        parent = box.get("parent")
        annotations.append(
            {
                "id": first_id + index,
                "image_id": image_id,
                "category_id": categories[box["label"]],
                "bbox": [x, y, w, h],
                "area": _number(w * h, _PIXEL_DECIMALS),
                "iscrowd": 0,
                "score": _number(box.get("score"), _SCORE_DECIMALS),
                "attributes": {
                    "level": box.get("level"),
                    "parent_id": first_id + parent if parent is not None and 0 <= parent < len(boxes) else None,
                    "saliency": _number(box.get("saliency"), _SCORE_DECIMALS),
                },
            }
        )
    return annotations


def fiftyone_detections(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A row's boxes in FiftyOneImageDetectionDataset form: label, relative bounding_box, confidence, attributes."""
    return [
        {
            "label": box["label"],
            "bounding_box": [_number(v, _RELATIVE_DECIMALS) for v in xyxy_to_relative_xywh(_corners(box))],
            "confidence": _number(box.get("score"), _SCORE_DECIMALS),
            "attributes": {
                "level": box.get("level"),
                "parent": box.get("parent"),
                "saliency": _number(box.get("saliency"), _SCORE_DECIMALS),
            },
        }
        for box in row.get("boxes") or ()
    ]


def fiftyone_classification(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A row's label in FiftyOneImageClassificationDataset form, or None (unlabeled) for a failed row."""
    if row.get("label") is None:
        return None
    return {
        "label": row["label"],
        "confidence": _number(row.get("score"), _SCORE_DECIMALS),
        "attributes": {"margin": _number(row.get("margin"), _SCORE_DECIMALS)},
    }


def csv_record(row: Mapping[str, Any], passthrough: Sequence[str] = ()) -> list[Any]:
    """One CSV line's values, in CSV_COLUMNS order then `passthrough`; lists become JSON text."""
    topk = None
    if row.get("topk_labels") is not None:
        topk = json.dumps(
            [
                {"label": label, "score": _number(score, _SCORE_DECIMALS)}
                for label, score in zip(row["topk_labels"], row.get("topk_scores") or ())
            ]
        )
    boxes = None
    if row.get("boxes") is not None:
        boxes = json.dumps(
            [{k: (_number(v, _RELATIVE_DECIMALS) if isinstance(v, float) else v) for k, v in box.items()} for box in row["boxes"]]
        )
    values = {
        **row,
        "topk": topk,
        "boxes": boxes,
        "score": _number(row.get("score"), _SCORE_DECIMALS),
        "margin": _number(row.get("margin"), _SCORE_DECIMALS),
    }
    return [_csv_cell(values.get(name)) for name in CSV_COLUMNS] + [_csv_cell(row.get(name)) for name in passthrough]


# ---------------------------------------------------------------- whole exports


@dataclass(frozen=True)
class ExportSummary:
    """What one export wrote."""

    format: str
    rows: int  # rows exported (after filters)
    boxes: int  # boxes exported
    files: tuple[str, ...]  # files written

    def line(self) -> str:
        return f"lgca export: {self.rows} rows, {self.boxes} boxes as {self.format} -> {', '.join(self.files)}"


def export(
    output: OutputDir,
    fmt: str,
    out: str,
    row_filter: RowFilter,
    path_prefixes: Sequence[tuple[str, str]] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> ExportSummary:
    """Write the filtered rows of `output` as one curation format.

    Args:
        output: the opened output directory.
        fmt: one of FORMATS.
        out: the file to write (labelstudio: JSON, plus `<stem>.label_config.xml` beside it; coco: JSON;
            csv: CSV); for fiftyone a directory that receives data.json, labels.json and
            classifications.json. Local or fsspec URI; written under a temporary name, then moved.
        row_filter: which rows to take.
        path_prefixes: (old, new) pairs; an image path starting with `old` is rewritten to start with
            `new` (e.g. to Label Studio's /data/local-files/?d= URLs). The first match wins.
        storage_options: fsspec options for a remote `out`.

    Returns:
        Counts and files written.

    Raises:
        CurationError: unknown format, or a filter naming a status or label the output cannot have.
    """
    if fmt not in FORMATS:
        raise CurationError(f"format {fmt!r} is not one of {', '.join(FORMATS)}; fix --format")
    row_filter.check(output.classes)
    passthrough = output.passthrough_columns()
    columns = output.dataset().schema.names
    rows = _rows(output, columns, row_filter.expression(), path_prefixes)
    fs, path = filesystem_for(out, storage_options or {})
    path = path.rstrip("/")
    counter = _Counter()
    if fmt == "fiftyone":
        written = _write_fiftyone(fs, path, counter.count(rows))
        files = tuple(_display(out, name) for name in written)
    else:
        writer = {"labelstudio": _write_labelstudio, "coco": _write_coco, "csv": _write_csv}[fmt]
        with _atomic_text(fs, path) as handle:
            writer(handle, counter.count(rows), output, passthrough)
        files = (out,)
        if fmt == "labelstudio":
            config_path = _sibling(path, ".label_config.xml")
            with _atomic_text(fs, config_path) as handle:
                handle.write(labelstudio_config(_categories_from(output.classes, counter.labels)))
            files += (_sibling(out, ".label_config.xml"),)
    return ExportSummary(fmt, counter.rows, counter.boxes, files)


class _Counter:
    """Counts rows, boxes and labels as they stream past a writer."""

    def __init__(self) -> None:
        self.rows = 0
        self.boxes = 0
        self.labels: dict[str, None] = {}  # ordered set of labels seen (box labels included)

    def count(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            self.rows += 1
            boxes = row.get("boxes") or ()
            self.boxes += len(boxes)
            if row.get("label") is not None:
                self.labels.setdefault(row["label"])
            for box in boxes:
                self.labels.setdefault(box["label"])
            yield row


def _rows(
    output: OutputDir, columns: Sequence[str], expression: ds.Expression | None, path_prefixes: Sequence[tuple[str, str]]
) -> Iterator[dict[str, Any]]:
    for batch in output.batches(columns, expression):
        for row in batch.to_pylist():
            if path_prefixes:
                row["path"] = rewrite_path(row["path"], path_prefixes)
            yield row


def rewrite_path(path: str, path_prefixes: Sequence[tuple[str, str]]) -> str:
    """`path` with the first matching (old, new) prefix replaced; unchanged when none matches."""
    for old, new in path_prefixes:
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def _write_labelstudio(handle: IO[str], rows: Iterable[dict[str, Any]], output: OutputDir, passthrough: Sequence[str]) -> None:
    # A JSON list of tasks, written one task at a time so 100k rows never sit in memory as dicts.
    handle.write("[")
    for index, row in enumerate(rows):
        handle.write(",\n" if index else "\n")
        handle.write(json.dumps(labelstudio_task(row, passthrough), ensure_ascii=False, allow_nan=False))
    handle.write("\n]\n")


def _write_coco(handle: IO[str], rows: Iterable[dict[str, Any]], output: OutputDir, passthrough: Sequence[str]) -> None:
    # Images stream into the file while annotations spool to a temporary file; categories come first,
    # from the vocabulary, with any label outside it (there should be none) appended at the end.
    categories = {label: index + 1 for index, label in enumerate(output.classes)}
    manifest = output.manifest
    info = {
        "description": f"lgca-label predictions of {output.url}",
        "version": manifest.get("format"),
        "date_created": manifest.get("ended_at"),
        "lgca": {key: manifest.get(key) for key in ("run_id", "code_version", "method", "model")}
        | {"vocabulary_sha256": (manifest.get("vocabulary") or {}).get("sha256")},
    }
    next_annotation = 1
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        handle.write('{"info": ' + json.dumps(info) + ', "licenses": [],\n"images": [')
        for image_id, row in enumerate(rows, start=1):
            for label in [row.get("label")] + [b["label"] for b in row.get("boxes") or ()]:
                if label is not None and label not in categories:
                    categories[label] = len(categories) + 1
            handle.write(",\n" if image_id > 1 else "\n")
            handle.write(json.dumps(coco_image(row, image_id, categories, passthrough), ensure_ascii=False, allow_nan=False))
            for annotation in coco_annotations(row, image_id, next_annotation, categories):
                spool.write((",\n" if next_annotation > 1 else "\n") + json.dumps(annotation, allow_nan=False))
                next_annotation += 1
        handle.write('\n],\n"annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, handle)
        handle.write('\n],\n"categories": ')
        handle.write(json.dumps([{"id": i, "name": name, "supercategory": ""} for name, i in categories.items()], ensure_ascii=False))
        handle.write("}\n")


def _write_csv(handle: IO[str], rows: Iterable[dict[str, Any]], output: OutputDir, passthrough: Sequence[str]) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(list(CSV_COLUMNS) + list(passthrough))
    for row in rows:
        writer.writerow(csv_record(row, passthrough))


def _write_fiftyone(fs: fsspec.AbstractFileSystem, directory: str, rows: Iterable[dict[str, Any]]) -> list[str]:
    """FiftyOneImageDetectionDataset labels.json and FiftyOneImageClassificationDataset classifications.json
    sharing one data.json manifest (uuid -> image path), so both import against the same samples."""
    fs.makedirs(directory, exist_ok=True)
    paths = {name: f"{directory}/{name}" for name in FIFTYONE_FILES}
    with (
        _atomic_text(fs, paths["data.json"]) as data,
        _atomic_text(fs, paths["labels.json"]) as labels,
        _atomic_text(fs, paths["classifications.json"]) as classes,
    ):
        data.write("{")
        labels.write('{"labels": {')
        classes.write('{"labels": {')
        for index, row in enumerate(rows):
            sep = ",\n" if index else "\n"
            name = json.dumps(fiftyone_uuid(row["key"]))
            data.write(f"{sep}{name}: {json.dumps(row['path'], ensure_ascii=False)}")
            labels.write(f"{sep}{name}: {json.dumps(fiftyone_detections(row), ensure_ascii=False, allow_nan=False)}")
            classes.write(f"{sep}{name}: {json.dumps(fiftyone_classification(row), ensure_ascii=False, allow_nan=False)}")
        data.write("\n}\n")
        labels.write("\n}}\n")
        classes.write("\n}}\n")
    return list(FIFTYONE_FILES)


def fiftyone_uuid(key: str) -> str:
    """A sample id for FiftyOne's data manifest: stable per key, with no dot (FiftyOne strips "extensions")."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------- helpers


class _atomic_text:
    """A text file written under a temporary name beside `path`, moved into place only on success."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        parent = posixpath.dirname(path)
        self.staged = f"{parent + '/' if parent else ''}.{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.partial"

    def __enter__(self) -> IO[str]:
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        self.binary = self.fs.open(self.staged, "wb")
        self.text = io.TextIOWrapper(self.binary, encoding="utf-8", newline="")
        return self.text

    def __exit__(self, kind: Any, *rest: Any) -> None:
        self.text.close()  # closes the binary handle too
        if kind is None:
            self.fs.mv(self.staged, self.path)
        elif self.fs.exists(self.staged):
            self.fs.rm(self.staged)


def _sibling(path: str, suffix: str) -> str:
    stem = path[: -len(".json")] if path.lower().endswith(".json") else path
    return stem + suffix


def _display(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _categories_from(classes: Sequence[str], seen: Mapping[str, None]) -> list[str]:
    return list(classes) + [label for label in seen if label not in classes]


def _model_version(row: Mapping[str, Any]) -> str:
    return f"{row.get('model')}:{row.get('pretrained')}:{row.get('method')}"


def _corners(box: Mapping[str, Any]) -> Box4:
    return (box["x0"], box["y0"], box["x1"], box["y1"])


def _number(value: Any, decimals: int) -> float | None:
    """A float rounded for JSON, or None for a missing or non-finite value (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return round(value, decimals) if math.isfinite(value) else None


def _numbers(values: Sequence[Any] | None, decimals: int) -> list[float | None] | None:
    return None if values is None else [_number(v, decimals) for v in values]


def _jsonable(value: Any) -> Any:
    """Pass-through values as JSON: numbers, strings, booleans and lists as they are, anything else as text."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
