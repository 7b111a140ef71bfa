"""`lgca export`: the filtered rows of an output directory written as one curation format, each file staged and moved into place."""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

import fsspec
import pyarrow.dataset as ds

from pipeline.review.coco import write_coco
from pipeline.review.csv_export import write_csv
from pipeline.review.fiftyone import FIFTYONE_FILES, write_fiftyone
from pipeline.review.formats import FORMATS
from pipeline.review.labelstudio import labelstudio_config, write_labelstudio
from pipeline.review.output_dir import CurationError, OutputDir, RowFilter
from pipeline.stages.storage import filesystem_for


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
    fs, path = filesystem_for(out, storage_options or {})
    path = path.rstrip("/")
    counter = _Counter()
    rows = counter.count(_rows(output, columns, row_filter.expression(), path_prefixes, as_url=fmt == "labelstudio"))
    if fmt == "fiftyone":
        fs.makedirs(path, exist_ok=True)
        data_path, labels_path, classifications_path = (f"{path}/{name}" for name in FIFTYONE_FILES)
        with (
            _atomic_text(fs, data_path) as data,
            _atomic_text(fs, labels_path) as labels,
            _atomic_text(fs, classifications_path) as classifications,
        ):
            write_fiftyone(rows, data, labels, classifications)
        files = tuple(_display(out, name) for name in FIFTYONE_FILES)
    else:
        with _atomic_text(fs, path) as handle:
            if fmt == "labelstudio":
                write_labelstudio(handle, rows, passthrough)
            elif fmt == "coco":
                write_coco(handle, rows, output, passthrough)
            else:
                write_csv(handle, rows, passthrough)
        files = (out,)
        if fmt == "labelstudio":
            config_path = _sibling(path, ".label_config.xml")
            with _atomic_text(fs, config_path) as handle:
                handle.write(labelstudio_config(_categories_from(output.classes, counter.labels)))
            files += (_sibling(out, ".label_config.xml"),)
    return ExportSummary(fmt, counter.rows, counter.boxes, files)


def rewrite_path(path: str, path_prefixes: Sequence[tuple[str, str]], as_url: bool = False) -> str:
    """`path` with the first matching (old, new) prefix replaced; unchanged when none matches.

    Args:
        path: an image path or URI.
        path_prefixes: (old, new) pairs, tried in order.
        as_url: the result is a URL (Label Studio fetches it): the part after `new` is percent-encoded, so a
            file named `my photo #1.jpg` is not cut at `#` or `%`, and `&` or `+` do not end a query value.

    Returns:
        The rewritten path.
    """
    for old, new in path_prefixes:
        if path.startswith(old):
            rest = path[len(old) :]
            return new + (quote(rest, safe="/") if as_url else rest)
    return path


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
    output: OutputDir,
    columns: Sequence[str],
    expression: ds.Expression | None,
    path_prefixes: Sequence[tuple[str, str]],
    as_url: bool = False,
) -> Iterator[dict[str, Any]]:
    for batch in output.batches(columns, expression):
        for row in batch.to_pylist():
            if path_prefixes:
                row["path"] = rewrite_path(row["path"], path_prefixes, as_url)
            yield row


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
