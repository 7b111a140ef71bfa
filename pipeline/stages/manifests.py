"""Manifests: Parquet and CSV files that list images (a `path` column, an optional `key`, other columns passed
through), listed by row groups or byte ranges, one task each; checked fast, versioned for --resume."""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.credentials import mask_credentials
from pipeline.schema import EMBEDDING_COLUMN, OUTPUT_COLUMNS
from pipeline.stages.image_bytes import ImageColumn, find_image_column
from pipeline.stages.sources import InputSpec
from pipeline.stages.storage import LOCAL_PROTOCOLS, SourceError, filesystem_for, full_uri, is_local
from pipeline.stages.units import ListingUnit, UnitListing

# Columns the pipeline writes, and a row's place in its shard: a manifest column of one of these names is refused.
RESERVED_COLUMNS = (*(name for name in OUTPUT_COLUMNS if name not in ("key", "path")), EMBEDDING_COLUMN, "_row", "_shard", "_shard_rows")


CSV_UNIT_BYTES = 64 * 2**20  # uncompressed CSV manifests are listed in byte ranges of this size (about 10^6 rows), one task each


class RecordAcrossRanges(Exception):
    """A CSV byte range holds an odd number of quote characters: a quoted field runs across one of its edges."""


class ManifestFormat:
    """Parquet and CSV manifests: the `manifest` inputs. Units are row groups (Parquet) or byte ranges (CSV)."""

    kinds: tuple[str, ...] = ("manifest",)

    def __init__(self, unit_rows: int = 1_000_000, csv_unit_bytes: int = CSV_UNIT_BYTES) -> None:
        self.unit_rows, self.csv_unit_bytes = unit_rows, csv_unit_bytes

    def units(
        self, spec: InputSpec, index: int, storage_options: Mapping[str, Any], header: ManifestHeader | None = None
    ) -> list[ListingUnit]:
        """Parquet cut by row groups into units of about `unit_rows` rows (only its footer read, none where `header`
        holds it); an uncompressed CSV into byte ranges of `csv_unit_bytes`; a compressed one is one unit."""
        fs, path = filesystem_for(spec.uri, storage_options)
        if path.lower().endswith(".parquet"):
            return [replace(unit, input_index=index) for unit in manifest_units(spec, fs, path, self.unit_rows, header)]
        if path.lower().endswith(".csv"):
            size = fs.size(path)
            ranges = [(start, min(size, start + self.csv_unit_bytes)) for start in range(0, size, self.csv_unit_bytes)]
            # Lines not ended by "\n" (old Mac "\r" files) leave no edge to cut at: such a file is one unit.
            if len(ranges) > 1 and b"\n" in fs.cat_file(path, start=0, end=min(size, 1 << 16)):
                return [ListingUnit(spec, byte_range=r, input_index=index) for r in ranges]
        return [ListingUnit(spec, input_index=index)]

    def schema(self, spec: InputSpec, storage_options: Mapping[str, Any], header: ManifestHeader | None = None) -> pa.Schema | None:
        """key, path and a Parquet manifest's other columns, typed by its footer; None for CSV (its rows tell)."""
        fs, path = filesystem_for(spec.uri, storage_options)
        if not path.lower().endswith(".parquet"):
            return None
        if header is not None and header.schema is not None:
            schema = header.schema  # the footer the driver read once (`read_manifest_header`)
        else:
            with fs.open(path, "rb") as handle:
                schema = pq.read_schema(handle)
        return pa.schema(
            [pa.field("key", pa.string()), pa.field("path", pa.string()), *(f for f in schema if f.name not in ("key", "path"))]
        )

    def list_unit(self, unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
        try:
            return UnitListing(list_manifest(unit.spec, storage_options, unit.row_groups, unit.byte_range))
        except RecordAcrossRanges:
            return UnitListing(pa.table({"key": pa.array([], pa.string()), "path": pa.array([], pa.string())}), splits_record=True)


@dataclass(frozen=True)
class ManifestHeader:
    """A manifest as the driver reads it once: its columns and, for Parquet, the footer's types and row groups."""

    names: tuple[str, ...]
    version: dict[str, Any]  # `manifest_version`: recorded in the plan, compared on --resume
    schema: pa.Schema | None = None  # Parquet: typed by its footer; CSV: None (its types come from its rows)
    row_group_rows: tuple[int, ...] = ()  # Parquet: rows per row group
    image_column: ImageColumn | None = None  # a Parquet file holding the images themselves (`stages.image_bytes`)


def read_manifest_header(spec: InputSpec, storage_options: Mapping[str, Any], image_column: str | None = None) -> ManifestHeader:
    """Fail fast on a manifest whose header is unusable, reading its header (CSV) or footer (Parquet) only.

    A Parquet file without a `path` column whose images are in it (`image_column`, or a column detected by
    `image_bytes.find_image_column`) is an image-bytes input: its header says which column.

    Raises:
        SourceError: the manifest cannot be read, lacks a `path` column, repeats a column name, or uses an
            output column's name.
    """
    fs, path = filesystem_for(spec.uri, storage_options)
    schema, row_group_rows = None, ()
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                metadata, schema = parquet.metadata, parquet.schema_arrow  # schema_arrow: as pq.read_schema types it
            names = schema.names
            row_group_rows = tuple(metadata.row_group(index).num_rows for index in range(metadata.num_row_groups))
        else:
            with fs.open(path, "rb", compression="infer") as handle:
                names = pa_csv.open_csv(handle).schema.names
    except FileNotFoundError as error:
        raise SourceError(f"manifest {spec.uri} does not exist; check the path") from error
    except (pa.ArrowInvalid, EOFError, UnicodeDecodeError, OSError) as error:
        raise SourceError(f"manifest {spec.uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from error
    image = find_image_column(schema, image_column) if schema is not None and (image_column or "path" not in names) else None
    _check_columns(spec, names, image_input=image is not None)
    return ManifestHeader(tuple(names), manifest_version(spec, storage_options), schema, row_group_rows, image)


def manifest_units(
    spec: InputSpec, fs: fsspec.AbstractFileSystem, path: str, unit_rows: int, header: ManifestHeader | None = None
) -> list[ListingUnit]:
    """A Parquet manifest cut by row groups into units of about `unit_rows` rows (its footer read once, or `header`)."""
    if header is None or header.schema is None:
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
        except FileNotFoundError as error:
            raise SourceError(f"manifest {spec.uri} does not exist; check the path") from error
        except (pa.ArrowInvalid, OSError) as error:
            raise SourceError(f"manifest {spec.uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from error
        group_rows = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
    else:
        group_rows = list(header.row_group_rows)
    if sum(group_rows) == 0:
        raise SourceError(f"manifest {spec.uri} has no rows; add images or drop the input")
    units: list[ListingUnit] = []
    group: list[int] = []
    rows = 0
    for index, count in enumerate(group_rows):
        group.append(index)
        rows += count
        if rows >= unit_rows:
            units.append(ListingUnit(spec, row_groups=tuple(group)))
            group, rows = [], 0
    if group:
        units.append(ListingUnit(spec, row_groups=tuple(group)))
    return units


def read_manifest_table(
    spec: InputSpec,
    fs: fsspec.AbstractFileSystem,
    path: str,
    row_groups: tuple[int, ...] | None,
    byte_range: tuple[int, int] | None = None,
) -> pa.Table:
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                if row_groups is None:
                    return pq.read_table(handle)
                return pq.ParquetFile(handle).read_row_groups(list(row_groups))
        # path and key stay strings even when they look numeric ("001" must not become 1). An empty field is
        # null in every column, so a byte range whose rows leave a column empty agrees with the others.
        convert = pa_csv.ConvertOptions(column_types={"path": pa.string(), "key": pa.string()}, strings_can_be_null=True)
        if byte_range is not None:
            # Each range alone cannot tell a column's type (one range's "001" is a number, another's "a1" text),
            # so a manifest read in ranges keeps its columns as text: never a value rewritten by a guess.
            lines = _csv_lines(fs, path, byte_range)
            # Quotes come in pairs in every whole record (a quote inside a quoted field is doubled): an odd count
            # means a quoted field, line breaks and all, runs across an edge, and every edge after it is suspect.
            if (lines.count(b'"') - lines.split(b"\n", 1)[0].count(b'"')) % 2:
                raise RecordAcrossRanges()
            names = pa_csv.open_csv(io.BytesIO(lines.split(b"\n", 1)[0] + b"\n")).schema.names
            text = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True)
            return pa_csv.read_csv(io.BytesIO(lines), convert_options=text)
        with fs.open(path, "rb", compression="infer") as handle:  # a quoted field may hold line breaks
            return pa_csv.read_csv(handle, parse_options=pa_csv.ParseOptions(newlines_in_values=True), convert_options=convert)
    except FileNotFoundError as error:
        raise SourceError(f"manifest {spec.uri} does not exist; check the path") from error
    except (pa.ArrowInvalid, EOFError, UnicodeDecodeError) as error:
        raise SourceError(f"manifest {spec.uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from error


def _csv_lines(fs: fsspec.AbstractFileSystem, path: str, byte_range: tuple[int, int]) -> bytes:
    """The header line of a CSV file and every line that starts in `byte_range`: neighbouring ranges share no line.

    A line starting before `start` belongs to the range before; a line starting before `end` is read to its
    end. A quoted field holding a line break can be cut by a range's edge: the range's quotes then do not pair
    up, and the file is listed whole instead (`UnitListing.splits_record`), never guessed.
    """
    start, end = byte_range
    with fs.open(path, "rb") as handle:
        header = handle.readline()
        if start > len(header):
            handle.seek(start - 1)
            handle.readline()  # the rest of a line that started in the range before (just "\n" if one ends there)
        begin = handle.tell()
        if begin >= end:
            return header
        body = handle.read(end - begin)
        if body and not body.endswith(b"\n"):
            body += handle.readline()  # the last line starting in the range, to its end
    return header + body


def _string_column(table: pa.Table, name: str, spec: InputSpec, part: str = "") -> pa.ChunkedArray:
    column = table.column(name)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or (name == "key" and pa.types.is_integer(kind))):
        raise SourceError(f"manifest {spec.uri}: column {name!r} holds {column.type}, not text; write it as strings")
    column = column.cast(pa.string())
    empty = pc.or_kleene(pc.is_null(column), pc.equal(column, "")).combine_chunks().fill_null(True)
    if pc.any(empty).as_py():
        rows = pc.indices_nonzero(empty)[:5].to_pylist()
        raise SourceError(f"manifest {spec.uri}: column {name!r} is empty in rows {rows} (0-based{part}); fill or remove those rows")
    return column


def _resolve_manifest_path(raw: str, fs: fsspec.AbstractFileSystem, manifest_dir: str, local: bool) -> str:
    protocol, rest = fsspec.core.split_protocol(raw)
    if protocol is not None:
        return rest if protocol in LOCAL_PROTOCOLS else raw  # file:///x -> /x; other URIs as written
    if local:
        return os.path.normpath(os.path.join(manifest_dir, os.path.expanduser(raw)))
    # Remote: relative to the manifest's folder; a leading "/" means "/bucket/key" on the same store.
    return full_uri(fs, posixpath.normpath(posixpath.join(manifest_dir, raw)).lstrip("/"))


def manifest_version(spec: InputSpec, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies this version of a manifest file without reading it: its size and its ETag or modification time.

    A plan records it, so a resume can say that the manifest changed since (its new rows are not labelled).
    """
    fs, path = filesystem_for(spec.uri, storage_options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    changed = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return {"size": info.get("size"), "version": str(changed) if changed is not None else None}


def _check_columns(spec: InputSpec, names: Sequence[str], image_input: bool = False) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"manifest {spec.uri} repeats column name(s) {', '.join(repeated)}; give each column its own name")
    if image_input:
        return  # the images are in it; its columns that the output uses pass through renamed (`image_bytes`)
    if "path" not in names:
        raise SourceError(
            f"manifest {spec.uri} has no 'path' column (found: {', '.join(names) or 'none'}); "
            "add a column 'path' with one image path or URI per row"
        )
    reserved = [name for name in names if name in RESERVED_COLUMNS]
    if reserved:
        raise SourceError(f"manifest {spec.uri} has column(s) {', '.join(reserved)}, which the output already uses; rename them")


def list_manifest(
    spec: InputSpec,
    storage_options: Mapping[str, Any],
    row_groups: tuple[int, ...] | None = None,
    byte_range: tuple[int, int] | None = None,
) -> pa.Table:
    fs, path = filesystem_for(spec.uri, storage_options)
    table = read_manifest_table(spec, fs, path, row_groups, byte_range)
    _check_columns(spec, table.column_names)
    if table.num_rows == 0 and row_groups is None and byte_range is None:
        raise SourceError(f"manifest {spec.uri} has no rows; add images or drop the input")
    # Row numbers in messages count from the start of the part this unit read.
    part = (
        f", in row groups {list(row_groups)}"
        if row_groups
        else f", in the lines starting in bytes {byte_range[0]}-{byte_range[1]}"
        if byte_range
        else ""
    )
    paths = _string_column(table, "path", spec, part).combine_chunks()
    # Credentials in a row's URL are masked here, before the plan stores it: the row then fails to read, saying why.
    raw_paths = _rewritten(paths, pc.match_substring_regex(paths, "[@?]"), mask_credentials)
    keys = _string_column(table, "key", spec, part) if "key" in table.column_names else raw_paths
    local = is_local(spec.uri)
    manifest_dir = os.path.dirname(path) if local else posixpath.dirname(path)
    # Most rows are final as written (another store's URL; an absolute local path in normal form in a local
    # manifest): found with vectorised matches, so only the others go through Python, one at a time.
    final = pc.and_(pc.match_substring_regex(raw_paths, _URL), pc.invert(pc.match_substring_regex(raw_paths, _LOCAL_URL)))
    if local:
        final = pc.or_(final, pc.and_(pc.starts_with(raw_paths, "/"), pc.invert(pc.match_substring_regex(raw_paths, _NOT_NORMAL))))
    resolved = _rewritten(raw_paths, pc.invert(final), lambda raw: _resolve_manifest_path(raw, fs, manifest_dir, local))
    extra = [name for name in table.column_names if name not in ("key", "path")]
    columns = {"key": keys, "path": resolved}
    columns.update({name: table.column(name) for name in extra})
    return pa.table(columns).sort_by("key")


_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://"


_LOCAL_URL = r"^(file|local)://"


_NOT_NORMAL = r"//|/\.\.?(/|$)|/$"  # what os.path.normpath would change in an absolute path


def _rewritten(values: pa.Array, where: pa.Array, rewrite: Any) -> pa.Array:
    """`values` with `rewrite(value)` in the rows `where` is true, the other rows untouched (and never made Python strings)."""
    chosen = values.filter(where)
    if len(chosen) == 0:
        return values
    return pc.replace_with_mask(values, where, pa.array([rewrite(value) for value in chosen.to_pylist()], pa.string()))
