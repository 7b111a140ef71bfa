"""Parquet output: deterministic file names, atomic commits, resume bookkeeping, `_manifest.json`, `_SUCCESS`."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError
from pipeline.faults import fault_point

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
STAGING = "_staging"  # leading underscore: pyarrow, pandas, DuckDB and Polars globs skip it
PART_PATTERN = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")


class OutputError(ConfigError):
    """The output location cannot be used as asked; the message names the fix."""


class OutputSink:
    """Writes one run's rows into committed Parquet files under one output directory.

    A file becomes visible under its final name only once complete (written under `_staging/`, then
    moved), so a reader or a resumed job never sees half a file. Each run (first or resumed) is an
    attempt; its files are `part-<attempt>-<index>.parquet`.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        attempt: int,
        rows_per_file: int,
        schema: pa.Schema,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.attempt = attempt
        self.rows_per_file = rows_per_file
        self.schema = schema
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._index = 0
        self.files_written: list[str] = []
        self.rows_written = 0

    # ---- opening

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any],
        mode: str,
        rows_per_file: int,
        schema: pa.Schema,
    ) -> OutputSink:
        """Prepare `url` for writing.

        Args:
            mode: "new" (the output must hold no results), "resume" (continue it) or "overwrite" (empty it).

        Raises:
            OutputError: results exist and neither resume nor overwrite was asked; the location is not writable.
        """
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        root = root.rstrip("/")
        existing = _part_files(fs, root)
        has_results = bool(existing) or fs.exists(f"{root}/{SUCCESS}") or fs.exists(f"{root}/{MANIFEST}")
        if has_results and mode == "new":
            raise OutputError(f"output {url} already holds results; pass --resume to finish it or --overwrite to start over")
        if mode == "overwrite" and fs.exists(root):
            for path in existing + [f"{root}/{SUCCESS}", f"{root}/{MANIFEST}", f"{root}/{STAGING}"]:
                if fs.exists(path):
                    fs.rm(path, recursive=True)
            existing = []
        _check_writable(fs, root, url)
        if fs.exists(f"{root}/{SUCCESS}"):
            fs.rm(f"{root}/{SUCCESS}")  # this run may add files; the marker returns when it finishes
        if fs.exists(f"{root}/{STAGING}"):
            fs.rm(f"{root}/{STAGING}", recursive=True)  # leftovers of a crashed run were never committed
        attempts = [int(PART_PATTERN.match(p.rsplit("/", 1)[-1]).group(1)) for p in existing]
        return cls(fs, root, url, max(attempts, default=0) + 1, rows_per_file, schema)

    # ---- reading back

    def committed_files(self) -> list[str]:
        return _part_files(self.fs, self.root)

    def committed_keys(self) -> pa.ChunkedArray:
        """Keys of every committed row (the `key` column alone is read)."""
        arrays = []
        for path in self.committed_files():
            with self.fs.open(path, "rb") as handle:
                arrays.append(pq.read_table(handle, columns=["key"]).column("key"))
        if not arrays:
            return pa.chunked_array([], type=pa.string())
        return pa.chunked_array([chunk for array in arrays for chunk in array.chunks], type=pa.string())

    def previous_manifest(self) -> dict[str, Any] | None:
        path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            return json.load(handle)

    # ---- writing

    def write(self, table: pa.Table) -> None:
        """Buffer rows; commit a file whenever `rows_per_file` rows are waiting."""
        if table.num_rows == 0:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_file:
            combined = pa.concat_tables(self._pending)
            self._commit(combined.slice(0, self.rows_per_file))
            rest = combined.slice(self.rows_per_file)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def flush(self) -> None:
        if self._pending_rows:
            self._commit(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def finish(self, manifest: Mapping[str, Any]) -> None:
        """Commit what is buffered, then `_manifest.json`, then `_SUCCESS` last."""
        self.flush()
        self._put_atomically(f"{self.root}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        fault_point("before_success")
        self._put_atomically(f"{self.root}/{SUCCESS}", b"")
        if self.fs.exists(f"{self.root}/{STAGING}"):
            self.fs.rm(f"{self.root}/{STAGING}", recursive=True)

    def _commit(self, table: pa.Table) -> None:
        name = f"part-{self.attempt:05d}-{self._index:06d}.parquet"
        staged = f"{self.root}/{STAGING}/{uuid.uuid4().hex}-{name}"
        self.fs.makedirs(f"{self.root}/{STAGING}", exist_ok=True)
        with self.fs.open(staged, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        fault_point("staged")
        self.fs.mv(staged, f"{self.root}/{name}")
        self._index += 1
        self.files_written.append(name)
        self.rows_written += table.num_rows

    def _put_atomically(self, path: str, data: bytes) -> None:
        staged = f"{self.root}/{STAGING}/{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.root}/{STAGING}", exist_ok=True)
        with self.fs.open(staged, "wb") as handle:
            handle.write(data)
        self.fs.mv(staged, path)


def not_yet_done(keys: pa.Array | pa.ChunkedArray, done: pa.ChunkedArray) -> pa.Array:
    """Boolean mask of `keys` that have no committed row."""
    if len(done) == 0:
        return pa.array([True] * len(keys))
    return pc.invert(pc.is_in(keys, value_set=done.combine_chunks()))


def _part_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    fs.invalidate_cache(root)  # object stores cache listings; this one must see files committed just now
    if not fs.exists(root):
        return []
    names = [p for p in fs.ls(root, detail=False) if PART_PATTERN.match(p.rstrip("/").rsplit("/", 1)[-1])]
    return sorted(names)


def _check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    probe = f"{root}/{STAGING}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(f"{root}/{STAGING}", exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"probe")
        fs.rm(probe)
    except (OSError, PermissionError) as error:
        raise OutputError(f"cannot write to output {url}: {error}; choose a writable --output") from None
