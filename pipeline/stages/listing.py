"""Listing inputs into (key, path) rows, by units one task can list, through each input's format: folder levels
that fan out, globs and files (`files`), manifest row groups and byte ranges (`manifests`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.files import FileFormat, distinct_units
from pipeline.stages.image_bytes import ImageBytesFormat
from pipeline.stages.manifests import CSV_UNIT_BYTES, ManifestFormat, ManifestHeader
from pipeline.stages.plan import raise_on_duplicates, unify_schemas
from pipeline.stages.sources import IMAGE_EXTENSIONS, InputSpec
from pipeline.stages.storage import SourceError
from pipeline.stages.units import MAX_SKIPPED_EXAMPLES, Listing, ListingUnit, UnitListing
from pipeline.stages.webdataset import WebDatasetFormat

log = logging.getLogger(__name__)


class InputFormat(Protocol):
    """One kind of input: how its first units are found, the listing rows' schema when known before listing, and
    how one unit is listed (images as rows, sub-units still to list, other files counted). A format is one class;
    `FORMATS` maps each INPUT kind to it."""

    kinds: tuple[str, ...]

    def units(self, spec: InputSpec, index: int, storage_options: Mapping[str, Any], header: Any = None) -> list[ListingUnit]: ...

    def schema(self, spec: InputSpec, storage_options: Mapping[str, Any], header: Any = None) -> pa.Schema | None: ...

    def list_unit(self, unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing: ...


def formats(manifest_unit_rows: int = 1_000_000, csv_unit_bytes: int = CSV_UNIT_BYTES) -> dict[str, InputFormat]:
    """Each INPUT kind's format."""
    every: tuple[InputFormat, ...] = (
        FileFormat(),
        ManifestFormat(manifest_unit_rows, csv_unit_bytes),
        ImageBytesFormat(),
        WebDatasetFormat(),
    )
    return {kind: format_ for format_ in every for kind in format_.kinds}


FORMATS = formats()


def listing_units(
    specs: Sequence[InputSpec],
    storage_options: Mapping[str, Any],
    manifest_unit_rows: int = 1_000_000,
    csv_unit_bytes: int = CSV_UNIT_BYTES,
    headers: Mapping[str, ManifestHeader] | None = None,
) -> list[ListingUnit]:
    """The first units to list: one per folder input (it fans out into sub-folders), glob and file, Parquet
    manifests cut by row groups into units of about `manifest_unit_rows` rows, and uncompressed CSV manifests
    into byte ranges of `csv_unit_bytes` (a compressed one is one unit).

    Only Parquet footers (none where `headers` holds them already) and file sizes are read here, never rows or
    file names: O(inputs + row groups).

    Raises:
        SourceError: a manifest is unreadable or has no rows.
    """
    by_kind = formats(manifest_unit_rows, csv_unit_bytes)
    return [
        unit
        for index, spec in enumerate(specs)
        for unit in by_kind[spec.kind].units(spec, index, storage_options, (headers or {}).get(spec.uri))
    ]


def known_schema(
    specs: Sequence[InputSpec], storage_options: Mapping[str, Any], headers: Mapping[str, ManifestHeader] | None = None
) -> pa.Schema | None:
    """The listing rows' schema before anything is listed, or None where only reading the rows tells it.

    Folders, globs and files give key and path; a Parquet manifest adds its other columns, typed by its
    footer. A CSV manifest's types are inferred from its rows, so with one the schema waits for the listing.
    """
    schemas = [FORMATS[spec.kind].schema(spec, storage_options, (headers or {}).get(spec.uri)) for spec in specs]
    if any(schema is None for schema in schemas):
        return None
    return unify_schemas([FileFormat().schema(specs[0], storage_options), *(s for s in schemas if s is not None)])  # the plan's rule


def list_unit(unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
    """List one unit with its input's format: its images as (key, path, manifest columns) rows, sorted by key,
    and its sub-folders.

    Raises:
        SourceError: a folder cannot be listed, a glob matches nothing, a manifest is unusable.
    """
    return FORMATS[unit.spec.kind].list_unit(unit, storage_options)


def list_inputs(specs: Sequence[InputSpec], storage_options: Mapping[str, Any], csv_unit_bytes: int = CSV_UNIT_BYTES) -> Listing:
    """List every image of every input as a (key, path) row, sorted by key, in this process.

    The labelling job lists the same units in parallel tasks (`listing_units`, `list_unit`); this is the
    in-process form for evaluation and small inputs. Keys are the path relative to the input root
    (directories; for globs the part before the first wildcard component), the file name (single files),
    or a manifest's `key` column, else its `path` value as written. The same tree gives the same keys on
    local disk and on S3. Non-image files found in directories and globs are counted in `skipped`;
    single-file inputs and manifest rows are never skipped (they were asked for by name; decoding reports
    what is not an image).

    Args:
        specs: parsed inputs.
        storage_options: fsspec options for remote inputs.

    Returns:
        The listing: a table with columns key, path (full URI; plain absolute path locally) and the
        manifests' other columns, and the skipped files.

    Raises:
        SourceError: no inputs; a directory or glob holds no images; a folder cannot be listed; a manifest
            is unreadable, lacks a `path` column, has empty paths or keys, or has a column named like an
            output column; inputs disagree on a column's type; two rows share a key.
    """
    if not specs:
        raise SourceError("no inputs given; pass one or more directories, globs, files, s3:// prefixes or manifests")
    pending = listing_units(specs, storage_options, csv_unit_bytes=csv_unit_bytes)
    listed_units: list[tuple[ListingUnit, UnitListing]] = []
    folders: set[tuple[int, int]] = set()
    whole: set[str] = set()  # CSV manifests whose ranges split a record: listed whole instead
    while pending:
        unit = pending.pop()
        if unit.byte_range is not None and unit.spec.uri in whole:
            continue
        listed = list_unit(unit, storage_options)
        if listed.splits_record:
            whole.add(unit.spec.uri)
            pending.append(replace(unit, byte_range=None))
            continue
        pending.extend(distinct_units(listed.more, folders))
        listed_units.append((unit, listed))
    tables: list[pa.Table] = []
    found: dict[str, UnitTally] = {}
    for unit, listed in listed_units:
        if unit.byte_range is not None and unit.spec.uri in whole:
            continue  # a range of a file listed whole
        tables.append(listed.table)
        found.setdefault(unit.spec.uri, UnitTally()).add(listed.table.num_rows, listed.skipped, listed.skipped_count)
    for spec in specs:
        found.get(spec.uri, UnitTally()).check(spec)
    table = concat_listings(tables).sort_by("key")
    _raise_on_duplicate_keys(table.column("key"))
    skipped = [name for tally in found.values() for name in tally.skipped][:MAX_SKIPPED_EXAMPLES]
    return Listing(table=table, skipped=skipped, skipped_count=sum(tally.skipped_count for tally in found.values()))


@dataclass
class UnitTally:
    """Images and skipped files found so far for one input, over its units: an input without images is an error."""

    images: int = 0
    skipped: list[str] = field(default_factory=list)
    skipped_count: int = 0

    archives: int = 0  # archives' shards: their images are counted as they are read

    def add(self, images: int, skipped: Sequence[str], skipped_count: int, archives: int = 0) -> None:
        self.images += images
        self.archives += archives
        self.skipped.extend(skipped[: MAX_SKIPPED_EXAMPLES - len(self.skipped)])
        self.skipped_count += skipped_count

    def check(self, spec: InputSpec) -> None:
        """Raises SourceError when the input `spec` held no images."""
        if self.images or self.archives or spec.kind == "manifest":
            return
        examples = f" ({self.skipped_count} other files, e.g. {', '.join(self.skipped[:3])})" if self.skipped_count else ""
        raise SourceError(
            f"input {spec.uri} holds no images{examples}; check the path, and that names end in one of {', '.join(IMAGE_EXTENSIONS)}"
        )


def concat_listings(tables: Sequence[pa.Table]) -> pa.Table:
    """One table of listing rows; folder inputs lack the manifests' columns, which "default" promotion fills with nulls.

    Raises:
        SourceError: two manifests give one column different types.
    """
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as error:
        raise SourceError(f"inputs disagree on a column's type ({error}); give the manifests matching column types") from error


def _raise_on_duplicate_keys(keys: pa.ChunkedArray) -> None:
    # keys are sorted, so duplicates are neighbours.
    keys = keys.combine_chunks()
    if len(keys) < 2:
        return
    same = pc.equal(keys[1:], keys[:-1])
    if not pc.any(same).as_py():
        return
    duplicates = sorted(set(keys[1:].filter(same).to_pylist()))
    raise_on_duplicates(len(duplicates), duplicates)
