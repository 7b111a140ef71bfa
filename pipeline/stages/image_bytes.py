"""The image-bytes format: Parquet files that hold the images themselves (img2dataset's `--output_format parquet`
with a `jpg`, `png` or `webp` binary column; Hugging Face datasets' `image` struct of bytes and path).

The plan lists row ranges, never rows: a shard is a range of a file's rows, known from the footer, and its
samples are read when it is labelled, a batch at a time (`read_batches`), so no image is read twice and no row
group is held whole. The other columns pass through to the output; the bytes do not.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import EMBEDDING_COLUMN, OUTPUT_COLUMNS
from pipeline.stages.sources import InputSpec
from pipeline.stages.storage import SourceError, filesystem_for
from pipeline.stages.units import ListingUnit, UnitListing

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")  # detected in this order (img2dataset's, then Hugging Face's)
KEY_COLUMN = "key"  # img2dataset's sample key; without one, a row's key is `<file name>/<row index>`
RENAMED_PREFIX = "source_"  # a column whose name the output uses (img2dataset's status, width, ...) passes through so
UNIT_ROWS = 1_000_000  # rows of a file listed as one unit (whole row groups)


@dataclass(frozen=True)
class ImageColumn:
    """Where a Parquet file keeps its images: a binary column, or a struct with a binary `bytes` field."""

    name: str
    struct: bool  # Hugging Face's Image feature: {bytes, path}


def find_image_column(schema: pa.Schema, asked: str | None = None) -> ImageColumn | None:
    """The image column of a Parquet schema: `asked`, else the first of IMAGE_COLUMNS that holds bytes.

    Raises:
        SourceError: `asked` is not a column of bytes (or of a struct with `bytes`).
    """
    for name in [asked] if asked else IMAGE_COLUMNS:
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return ImageColumn(name, struct=False)
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return ImageColumn(name, struct=True)
        if asked:
            raise SourceError(f"--image-column {asked} is {kind}, not image bytes (binary, or a struct with a `bytes` field)")
    if asked:
        raise SourceError(f"--image-column {asked}: no such column (found: {', '.join(schema.names)})")
    return None


class ImageBytesFormat:
    """Parquet files of image bytes: the `image_bytes` inputs (a manifest path whose file has an image column)."""

    kinds: tuple[str, ...] = ("image_bytes",)

    def units(self, spec: InputSpec, index: int, storage_options: Mapping[str, Any], header: Any = None) -> list[ListingUnit]:
        """Whole row groups of about UNIT_ROWS rows each, from the footer the driver read (`header`)."""
        group_rows = list(header.row_group_rows) if header is not None else _row_group_rows(spec, storage_options)
        units, group, rows = [], [], 0
        for number, count in enumerate(group_rows):
            group.append(number)
            rows += count
            if rows >= UNIT_ROWS:
                units.append(ListingUnit(spec, row_groups=tuple(group), input_index=index))
                group, rows = [], 0
        if group:
            units.append(ListingUnit(spec, row_groups=tuple(group), input_index=index))
        if not sum(group_rows):
            raise SourceError(f"{spec.uri} has no rows; add images or drop the input")
        return units

    def schema(self, spec: InputSpec, storage_options: Mapping[str, Any], header: Any = None) -> pa.Schema:
        """key, path, then every column but the images' (img2dataset's `key` becomes the row's key)."""
        schema = header.schema if header is not None and header.schema is not None else _read_schema(spec, storage_options)
        image = header.image_column if header is not None else find_image_column(schema, spec.image_column)
        passthrough = [f.with_name(passthrough_name(f.name)) for f in schema if f.name not in (image.name if image else "", KEY_COLUMN)]
        return pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *passthrough])

    def list_unit(self, unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
        """The unit's row range as one source; nothing is read but the footer."""
        fs, path = filesystem_for(unit.spec.uri, storage_options)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            metadata, schema = parquet.metadata, parquet.schema_arrow
        image = find_image_column(schema, unit.spec.image_column)
        if image is None:
            raise SourceError(f"{unit.spec.uri} holds no image column ({', '.join(IMAGE_COLUMNS)}); pass --image-column")
        starts = [0]
        for number in range(metadata.num_row_groups):
            starts.append(starts[-1] + metadata.row_group(number).num_rows)
        groups = unit.row_groups or tuple(range(metadata.num_row_groups))
        start, stop = starts[groups[0]], starts[groups[-1] + 1]
        source = {"uri": unit.spec.uri, "start": start, "stop": stop, "image": image.name, "struct": image.struct}
        return UnitListing(_empty_listing(), sources=[(json.dumps(source, sort_keys=True), stop - start)])


def passthrough_name(name: str) -> str:
    """The output name of a column of the archive: itself, or prefixed where the output already has that name."""
    return f"{RENAMED_PREFIX}{name}" if name in (*OUTPUT_COLUMNS, EMBEDDING_COLUMN, "path", "_row", "_shard", "_shard_rows") else name


def archive_shard_id(source_text: str, unit_id: str, index: int) -> str:
    """An archive's shard id, naming its part file: the archive's name first, so `part-00042-<unit>-00000.parquet`
    says which tar or Parquet file it came from; the unit id keeps equal names of other folders apart."""
    stem = posixpath.basename(json.loads(source_text)["uri"].rstrip("/")).split(".", 1)[0]
    return f"{re.sub(r'[^0-9A-Za-z_-]', '_', stem)[:48]}-{unit_id[:8]}-{index:05d}"


def cut_sources(sources: Sequence[tuple[str, int]], shard_size: int) -> list[tuple[str, int]]:
    """Sources of at most `shard_size` rows: a row range cut into consecutive ranges."""
    out = []
    for text, rows in sources:
        source = json.loads(text)
        if "start" not in source:  # a tar: one shard, its samples counted when read
            out.append((text, rows))
            continue
        for start in range(source["start"], source["stop"], shard_size):
            stop = min(source["stop"], start + shard_size)
            out.append((json.dumps({**source, "start": start, "stop": stop}, sort_keys=True), stop - start))
    return out


def read_batches(
    source_text: str, schema: pa.Schema, storage_options: Mapping[str, Any], batch_size: int, max_bytes: int | None
) -> Iterator[tuple[pa.Table, list[bytes | Exception]]]:
    """A source's rows in order, a batch at a time: listing rows in the plan's `schema` (key, path, pass-through
    columns) and each row's image bytes, or the error that stands for them (null bytes, over `max_bytes`)."""
    source = json.loads(source_text)
    uri, start, stop, image = source["uri"], source["start"], source["stop"], source["image"]
    fs, path = filesystem_for(uri, storage_options)
    name = posixpath.basename(path)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        offsets = [0]
        for number in range(parquet.metadata.num_row_groups):
            offsets.append(offsets[-1] + parquet.metadata.row_group(number).num_rows)
        groups = [g for g in range(parquet.metadata.num_row_groups) if offsets[g] < stop and offsets[g + 1] > start]
        position = offsets[groups[0]] if groups else start
        names = {passthrough_name(n): n for n in parquet.schema_arrow.names}  # output name -> the archive's
        wanted = [names[n] for n in schema.names if n in names and n not in ("key", "path")]
        columns = [image, *([KEY_COLUMN] if KEY_COLUMN in parquet.schema_arrow.names else []), *wanted]
        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=list(dict.fromkeys(columns))):
            first, position = position, position + batch.num_rows
            if first >= stop:
                break  # past the range: the rest of the row group is another shard's
            low, high = max(start, first) - first, min(stop, position) - first
            if high <= low:
                continue
            batch = batch.slice(low, high - low)
            rows = range(first + low, first + high)
            keys = batch.column(KEY_COLUMN).cast(pa.string()).to_pylist() if KEY_COLUMN in batch.schema.names else [None] * len(rows)
            keys = [key if key else f"{name}/{row:09d}" for key, row in zip(keys, rows)]
            listing = {"key": pa.array(keys, pa.string()), "path": pa.array([f"{uri}#row={row}" for row in rows], pa.string())}
            for field in schema:
                if field.name not in listing:
                    original = names.get(field.name)
                    present = original is not None and original in batch.schema.names
                    listing[field.name] = (batch.column(original) if present else pa.nulls(batch.num_rows, field.type)).cast(field.type)
            yield pa.table(listing, schema=schema), _contents(batch.column(image), image, max_bytes)


def _contents(column: pa.Array, image: str, max_bytes: int | None) -> list[bytes | Exception]:
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    out: list[bytes | Exception] = []
    for value in column:
        data = value.as_py()
        if data is None:
            out.append(LookupError(f"no image bytes: column {image} is null in this row (img2dataset keeps a failed download so)"))
        elif max_bytes is not None and len(data) > max_bytes:
            out.append(OSError(f"the image is {len(data)} bytes, over the --max-bytes limit of {max_bytes}"))
        else:
            out.append(data)
    return out


def _row_group_rows(spec: InputSpec, storage_options: Mapping[str, Any]) -> list[int]:
    fs, path = filesystem_for(spec.uri, storage_options)
    with fs.open(path, "rb") as handle:
        metadata = pq.ParquetFile(handle).metadata
    return [metadata.row_group(number).num_rows for number in range(metadata.num_row_groups)]


def _read_schema(spec: InputSpec, storage_options: Mapping[str, Any]) -> pa.Schema:
    fs, path = filesystem_for(spec.uri, storage_options)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow


def _empty_listing() -> pa.Table:
    return pa.table({"key": pa.array([], pa.string()), "path": pa.array([], pa.string())})
