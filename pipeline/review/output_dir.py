"""Reading an `lgca run` output directory: its manifest and Parquet part files, streamed in batches, and the row filters over them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.review.formats import PREDICTION_FORMATS
from pipeline.schema import EMBEDDING_COLUMN, OK, OUTPUT_COLUMNS, STATUSES, output_schema
from pipeline.stages.sink import MANIFEST, PART_PATTERN, SUCCESS
from pipeline.stages.storage import filesystem_for

BATCH_ROWS = 8192  # rows per Arrow batch while streaming a directory: bounded memory, few Python round trips


class CurationError(ConfigError):
    """An output directory or an export request cannot be used as given; the message names the fix."""


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
        return [name for name in self.dataset().schema.names if name not in (*OUTPUT_COLUMNS, EMBEDDING_COLUMN)]

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
