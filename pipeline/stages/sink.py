"""Parquet output, committed by the workers: staged pieces, one atomic `part-<shard>.parquet` per shard, `_SUCCESS`.

Rows never pass through the driver. A worker stages each scored batch as pieces under `_staging/<shard>/`
(named `.piece`, so no `**/*.parquet` glob ever sees them); once a shard's pieces cover all its rows, a
commit task merges them, keeping one row per `_row` index (a retried batch may have staged the same rows
twice), and publishes `part-<shard>.parquet` in one PUT or one rename. Writing a shard again replaces the
same file with the same rows: exactly-once holds by construction, and resume lists part files, never keys.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError
from pipeline.faults import fault_point
from pipeline.schema import OK
from pipeline.stages.lease import require_owner
from pipeline.stages.plan import PLAN_DIR, ROW_COLUMN, put_atomically

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
STAGING = "_staging"  # leading underscore: pyarrow, pandas, DuckDB and Polars directory readers skip it
SHARD_COLUMN = "_shard"  # a row's shard id, between reading a shard and staging its rows
SHARD_ROWS_COLUMN = "_shard_rows"  # on an archive's shard's last batch: its number of rows (counted as it is read)
MEMBERS_FILE = "members.json"  # staged beside a tar's pieces: its members per kind, for the part file's footer
MEMBERS_KEY = b"lgca.members"  # Parquet footer metadata of a tar's part file: `webdataset.TarTally`, as JSON
PART_PATTERN = re.compile(r"^part-([0-9A-Za-z_-]+)\.parquet$")
COUNTS_KEY = b"lgca.counts"  # Parquet footer metadata of a part file: rows per status, as JSON
METHODS_KEY = b"lgca.methods"  # and its ok rows per scoring method (under the cascade: descriptors or lgca), as JSON


class OutputError(ConfigError):
    """The output location cannot be used as asked; the message names the fix."""


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


@dataclass(frozen=True)
class Output:
    """An output directory prepared for a run: the filesystem, its root, and how it was opened."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any], mode: str) -> Output:
        """Prepare `url` for writing.

        Args:
            mode: "new" (the output must hold no results), "resume" (continue it) or "overwrite" (empty it).

        Raises:
            OutputError: results exist and neither resume nor overwrite was asked; the location is not writable.
        """
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        root = root.rstrip("/")
        output = cls(fs, root, url)
        existing = output.committed()
        has_results = bool(existing) or any(fs.exists(f"{root}/{name}") for name in (SUCCESS, MANIFEST, PLAN_DIR))
        if has_results and mode == "new":
            raise OutputError(f"output {url} already holds results; pass --resume to finish it or --overwrite to start over")
        _check_writable(fs, root, url)
        return output

    def clear(self, keep_manifest: bool = False) -> None:
        """Remove every result and all bookkeeping but the lease (--overwrite); `keep_manifest` keeps the record of attempts.

        `_SUCCESS` and `_manifest.json` go first: a kill part-way leaves an output that says it is incomplete, never
        `_SUCCESS` over missing part files (on S3, deleting thousands of parts takes minutes).
        """
        markers = (SUCCESS,) if keep_manifest else (SUCCESS, MANIFEST)
        for name in markers:
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}")
        fault_point("clearing")
        for path in [f"{self.root}/{part_name(shard)}" for shard in self.committed()] + [f"{self.root}/{n}" for n in (STAGING, PLAN_DIR)]:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def begin(self) -> None:
        """Start an attempt: `_SUCCESS` goes (this run may add files; it returns when the run ends), and so do the
        pieces an earlier attempt staged (this job holds the lease: no other writer can be staging)."""
        for name in (SUCCESS, STAGING):
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}", recursive=True)

    def committed(self) -> set[str]:
        """Ids of the shards with a committed part file (one listing of the output folder)."""
        self.fs.invalidate_cache(self.root)  # object stores cache listings; this one must see files committed just now
        if not self.fs.exists(self.root):
            return set()
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return {match.group(1) for name in names if (match := PART_PATTERN.match(name))}

    def previous_manifest(self) -> dict[str, Any] | None:
        path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            try:
                return json.load(handle)
            except ValueError:
                return None  # rewritten at the end of this run

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        put_atomically(self.fs, f"{self.root}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())

    def finish(self, manifest: Mapping[str, Any], still_ours: Callable[[], None] = lambda: None) -> None:
        """Write `_manifest.json`, then `_SUCCESS` last, and drop what staging is left; `still_ours` runs before each
        of the three and raises to stop (the job's lease: a driver that stalls in between writes no more)."""
        still_ours()
        self.write_manifest(manifest)
        fault_point("before_success")
        still_ours()
        put_atomically(self.fs, f"{self.root}/{SUCCESS}", b"")
        still_ours()
        if self.fs.exists(f"{self.root}/{STAGING}"):
            self.fs.rm(f"{self.root}/{STAGING}", recursive=True)


# ---------------------------------------------------------------- worker side


def staging_folder(root: str, shard_id: str, run_id: str = "") -> str:
    """Where one run stages a shard's pieces: `_staging/<run>/<shard>`, so a commit reads only its own run's
    pieces (never those of a stalled earlier owner of the output, still finishing its tasks)."""
    return f"{root}/{STAGING}/{run_id}/{shard_id}" if run_id else f"{root}/{STAGING}/{shard_id}"


def stage_pieces(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table, run_id: str = "") -> pa.Table:
    """Stage scored rows as one piece per shard present in `table`; returns (shard, rows, total) per piece, `total`
    being an archive's shard's number of rows where this piece holds its last batch (SHARD_ROWS_COLUMN), else null.

    The rows keep SHARD_COLUMN and ROW_COLUMN, so the commit can tell a row staged twice.
    """
    shards = table.column(SHARD_COLUMN).to_numpy(zero_copy_only=False)
    staged_shards, staged_rows, totals = [], [], []
    for shard in dict.fromkeys(shards.tolist()):
        piece = table.filter(pa.array(shards == shard))
        total = pc.max(piece.column(SHARD_ROWS_COLUMN)).as_py() if SHARD_ROWS_COLUMN in piece.column_names else None
        totals.append(total)
        path = f"{staging_folder(root, shard, run_id)}/{uuid.uuid4().hex}.piece"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        buffer = pa.BufferOutputStream()
        pq.write_table(piece, buffer)
        put_atomically(fs, path, buffer.getvalue().to_pybytes())
        staged_shards.append(shard)
        staged_rows.append(piece.num_rows)
    return pa.table(
        {"shard": pa.array(staged_shards, pa.string()), "rows": pa.array(staged_rows, pa.int64()), "total": pa.array(totals, pa.int64())}
    )


def commit_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard_id: str,
    rows: int,
    schema: pa.Schema,
    run_id: str = "",
    owner: str | None = None,
) -> dict[str, int] | None:
    """Merge a shard's staged pieces into `part-<shard>.parquet`, atomically; None while rows are still missing.

    Args:
        rows: the shard's number of images (from the plan; a tar's, from its last batch as it was read).
        schema: the output schema (passthrough columns included).
        run_id: the run whose pieces to merge.
        owner: the lease owner of that run: the file is published only while the output's lease still names it.

    Returns:
        Rows per status of the committed file.

    Raises:
        LeaseError: the output's lease names another job (this one stalled and was taken over).
    """
    folder = staging_folder(root, shard_id, run_id)
    fs.invalidate_cache(folder)
    listed = fs.ls(folder, detail=False) if fs.exists(folder) else []
    pieces = [p for p in listed if p.endswith(".piece")]
    members = [p for p in listed if p.endswith(MEMBERS_FILE)]
    tables = []
    for path in sorted(pieces):
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        if fs.exists(f"{root}/{part_name(shard_id)}"):  # a retried commit whose first try had published
            return committed_counts(fs, root, [shard_id])
        return None
    table = pa.concat_tables(tables, promote_options="default")
    order = table.column(ROW_COLUMN).to_numpy()
    indices, first = np.unique(order, return_index=True)  # a batch staged twice (a retried task) counts once
    if len(indices) != rows or (rows and (indices[0] != 0 or indices[-1] != rows - 1)):
        return None
    table = table.take(pa.array(first)).select(schema.names).cast(schema)
    counts = _status_counts(table)
    buffer = pa.BufferOutputStream()
    metadata = {
        **(schema.metadata or {}),
        COUNTS_KEY: json.dumps(counts, sort_keys=True).encode(),
        METHODS_KEY: json.dumps(_method_counts(table), sort_keys=True).encode(),
    }
    if members:  # a tar's members per kind, and what was left out of its rows and why
        with fs.open(members[0], "rb") as handle:
            metadata[MEMBERS_KEY] = handle.read()
    pq.write_table(table.replace_schema_metadata(metadata), buffer, compression="zstd")
    fault_point("committing")
    if owner is not None:
        require_owner(fs, root, owner)
    put_atomically(fs, f"{root}/{part_name(shard_id)}", buffer.getvalue().to_pybytes())
    fs.rm(folder, recursive=True)
    return counts


def committed_counts(fs: fsspec.AbstractFileSystem, root: str, shard_ids: Iterable[str]) -> dict[str, int]:
    """Rows per status over the given committed shards, from their footers (no rows are read)."""
    total: dict[str, int] = {}
    for shard_id in shard_ids:
        add_counts(total, _footer_counts(fs, root, shard_id))
    return total


def committed_methods(fs: fsspec.AbstractFileSystem, root: str, shard_ids: Iterable[str]) -> dict[str, int]:
    """Ok rows per scoring method over the given committed shards, from their footers (no rows are read)."""
    total: dict[str, int] = {}
    for shard_id in shard_ids:
        add_counts(total, _footer_counts(fs, root, shard_id, METHODS_KEY))
    return total


def committed_members(fs: fsspec.AbstractFileSystem, root: str, shard_ids: Iterable[str]) -> dict[str, int]:
    """A tar's members per kind and what was left out, over the given committed shards, as `kind: n` and
    `left out: reason: n`, from their footers."""
    total: dict[str, int] = {}
    for shard_id in shard_ids:
        with fs.open(f"{root}/{part_name(shard_id)}", "rb") as handle:
            record = json.loads((pq.read_schema(handle).metadata or {}).get(MEMBERS_KEY, b"{}"))
        add_counts(total, record.get("members", {}))
        add_counts(total, {f"left out: {reason}": n for reason, n in record.get("left_out", {}).items()})
    return total


def failed_rows(fs: fsspec.AbstractFileSystem, root: str, shard_ids: Iterable[str]) -> dict[str, int]:
    """Failed rows (any status but ok) per committed shard that has some, from the footers."""
    failed = {}
    for shard_id in shard_ids:
        count = sum(n for status, n in _footer_counts(fs, root, shard_id).items() if status != OK)
        if count:
            failed[shard_id] = count
    return failed


def keep_succeeded_rows(fs: fsspec.AbstractFileSystem, root: str, shard_id: str, run_id: str = "") -> np.ndarray:
    """Stage a committed shard's ok rows as a piece, for a commit that replaces its failed rows; their positions.

    Returns:
        The positions (ROW_COLUMN values) of the shard's failed rows, the ones to label again.
    """
    with fs.open(f"{root}/{part_name(shard_id)}", "rb") as handle:
        table = pq.read_table(handle)
    table = table.replace_schema_metadata(None)
    succeeded = pc.equal(table.column("status"), OK)
    positions = pa.array(range(table.num_rows), pa.int32())  # a part file holds its shard's rows in order
    table = table.append_column(SHARD_COLUMN, pa.array([shard_id] * table.num_rows, pa.string())).append_column(ROW_COLUMN, positions)
    kept = table.filter(succeeded)
    if kept.num_rows:
        path = f"{staging_folder(root, shard_id, run_id)}/kept.piece"  # a fixed name: a retried reader writes the same piece again
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        buffer = pa.BufferOutputStream()
        pq.write_table(kept, buffer)
        put_atomically(fs, path, buffer.getvalue().to_pybytes())
    return positions.filter(pc.invert(succeeded)).to_numpy()


def _footer_counts(fs: fsspec.AbstractFileSystem, root: str, shard_id: str, key: bytes = COUNTS_KEY) -> dict[str, int]:
    with fs.open(f"{root}/{part_name(shard_id)}", "rb") as handle:
        metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
    return {name: int(count) for name, count in json.loads(metadata.get(key, b"{}")).items()}


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    for status, count in counts.items():
        total[status] = total.get(status, 0) + count


def _status_counts(table: pa.Table) -> dict[str, int]:
    return _value_counts(table.column("status"))


def _method_counts(table: pa.Table) -> dict[str, int]:
    return _value_counts(table.filter(pc.equal(table.column("status"), OK)).column("method"))


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(column)
    return {str(value): int(count) for value, count in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())}


def _check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    probe = f"{root}/{STAGING}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(f"{root}/{STAGING}", exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"probe")
        fs.rm(probe)
    except (OSError, PermissionError) as error:
        raise OutputError(f"cannot write to output {url}: {error}; choose a writable --output") from None


__all__: Sequence[str] = (
    "COUNTS_KEY",
    "MANIFEST",
    "Output",
    "OutputError",
    "PART_PATTERN",
    "SHARD_COLUMN",
    "STAGING",
    "SUCCESS",
    "add_counts",
    "commit_shard",
    "committed_counts",
    "part_name",
    "stage_pieces",
    "staging_folder",
)
