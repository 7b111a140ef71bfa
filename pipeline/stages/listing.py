"""Listing inputs into (key, path) rows, by units one task can list: folder levels that fan out, globs, files, manifest row groups."""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.stages.manifests import CSV_UNIT_BYTES, ManifestHeader, RecordAcrossRanges, list_manifest, manifest_units
from pipeline.stages.plan import raise_on_duplicates, unify_schemas
from pipeline.stages.sources import IMAGE_EXTENSIONS, InputSpec, glob_root
from pipeline.stages.storage import SourceError, filesystem_for, full_uri
from pipeline.stages.units import Listing, ListingUnit, UnitListing

# The project's own markers (an output directory's bookkeeping): the only names a listing skips, so that
# photos named _DSC0001.JPG or kept under _archive/ or .thumbnails/ are still labelled.
OUTPUT_MARKERS = ("_SUCCESS", "_manifest.json", "_staging", "_plan", "_lease.json", "_lease.lock")
FAN_OUT_DEPTH = 3  # folder levels listed one at a time (each sub-folder its own listing task) before a subtree is walked whole
MAX_SKIPPED_EXAMPLES = 20

log = logging.getLogger(__name__)


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
    units: list[ListingUnit] = []
    for index, spec in enumerate(specs):
        fs, path = filesystem_for(spec.uri, storage_options)
        if spec.kind == "directory":
            path = path.rstrip("/") or path
            fs.invalidate_cache(path)  # a long-lived process may list a prefix again after it changed
            units.append(ListingUnit(spec, root=path, prefix=path, input_index=index))
        elif spec.kind == "manifest" and path.lower().endswith(".parquet"):
            header = (headers or {}).get(spec.uri)
            units.extend(replace(unit, input_index=index) for unit in manifest_units(spec, fs, path, manifest_unit_rows, header))
        elif spec.kind == "manifest" and path.lower().endswith(".csv"):
            size = fs.size(path)
            ranges = [(start, min(size, start + csv_unit_bytes)) for start in range(0, size, csv_unit_bytes)]
            # Lines not ended by "\n" (old Mac "\r" files) leave no edge to cut at: such a file is one unit.
            if len(ranges) > 1 and b"\n" in fs.cat_file(path, start=0, end=min(size, 1 << 16)):
                units.extend(ListingUnit(spec, byte_range=r, input_index=index) for r in ranges)
            else:
                units.append(ListingUnit(spec, input_index=index))
        else:
            units.append(ListingUnit(spec, input_index=index))
    return units


def known_schema(
    specs: Sequence[InputSpec], storage_options: Mapping[str, Any], headers: Mapping[str, ManifestHeader] | None = None
) -> pa.Schema | None:
    """The listing rows' schema before anything is listed, or None where only reading the rows tells it.

    Folders, globs and files give key and path; a Parquet manifest adds its other columns, typed by its
    footer. A CSV manifest's types are inferred from its rows, so with one the schema waits for the listing.
    """
    schemas = [pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string())])]
    for spec in specs:
        if spec.kind != "manifest":
            continue
        fs, path = filesystem_for(spec.uri, storage_options)
        if not path.lower().endswith(".parquet"):
            return None
        header = (headers or {}).get(spec.uri)
        if header is not None and header.schema is not None:
            schema = header.schema  # the footer the driver read once (`manifests.read_manifest_header`)
        else:
            with fs.open(path, "rb") as handle:
                schema = pq.read_schema(handle)
        schemas.append(pa.schema([field_ for field_ in schema if field_.name not in ("key", "path")]))
    return unify_schemas(schemas)  # the plan's own rule, so the two agree


def list_unit(unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
    """List one unit: its images as (key, path, manifest columns) rows, sorted by key, and its sub-folders.

    Every file that looks like an image gets a row, under symlinked folders too (a folder that is its own
    ancestor is entered once); only the project's own markers (OUTPUT_MARKERS) are skipped. A folder that
    cannot be listed fails the unit loudly rather than hiding its images.

    Raises:
        SourceError: a folder cannot be listed, a glob matches nothing, a manifest is unusable.
    """
    spec = unit.spec
    if spec.kind == "manifest":
        try:
            return UnitListing(list_manifest(spec, storage_options, unit.row_groups, unit.byte_range))
        except RecordAcrossRanges:
            return UnitListing(pa.table({"key": pa.array([], pa.string()), "path": pa.array([], pa.string())}), splits_record=True)
    fs, path = filesystem_for(spec.uri, storage_options)
    path = path.rstrip("/") or path
    more: list[ListingUnit] = []
    if spec.kind == "file":
        root, found = posixpath.dirname(path), [path]
    elif spec.kind == "glob":
        root, found = glob_root(path), _glob_files(spec, fs, path)
    elif isinstance(fs, LocalFileSystem):
        root, (found, more) = unit.root, _walk_local(unit)
    else:
        root, (found, more) = unit.root, _walk_remote(unit, fs)
    keys: list[str] = []
    paths: list[str] = []
    skipped: list[str] = []
    for file_path in sorted(set(found)):
        if not _is_utf8(file_path):  # Arrow strings (and every consumer of the output) need UTF-8: a counted skip
            skipped.append(f"{_shown_name(file_path)} (name is not UTF-8: rename it, e.g. convmv -f latin1 -t utf8)")
            continue
        key = posixpath.basename(file_path) if spec.kind == "file" else _relative_key(file_path, root)
        if spec.kind == "file" or _is_image_key(key):
            keys.append(key)
            paths.append(full_uri(fs, file_path))
        else:
            skipped.append(full_uri(fs, file_path))
    table = pa.table({"key": pa.array(keys, pa.string()), "path": pa.array(paths, pa.string())})
    return UnitListing(table, more, skipped[:MAX_SKIPPED_EXAMPLES], len(skipped))


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

    def add(self, images: int, skipped: Sequence[str], skipped_count: int) -> None:
        self.images += images
        self.skipped.extend(skipped[: MAX_SKIPPED_EXAMPLES - len(self.skipped)])
        self.skipped_count += skipped_count

    def check(self, spec: InputSpec) -> None:
        """Raises SourceError when the input `spec` held no images."""
        if self.images or spec.kind == "manifest":
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


def _is_utf8(name: str) -> bool:
    """Whether a listed name is valid UTF-8 (a name that is not arrives with surrogate escapes, PEP 383)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown_name(name: str) -> str:
    """A name that is not UTF-8, printable and unambiguous: its undecodable bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _relative_key(path: str, root: str) -> str:
    if path == root:
        return posixpath.basename(path)  # a directory input that turned out to be a single object
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1 :]
    return posixpath.relpath(path, root or "/")


def _is_image_key(key: str) -> bool:
    if any(part in OUTPUT_MARKERS for part in key.split("/")):
        return False
    return key.lower().endswith(IMAGE_EXTENSIONS)


def _glob_files(spec: InputSpec, fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    fs.invalidate_cache(glob_root(path))
    found: list[str] = []
    for match, info in sorted(fs.glob(path, detail=True).items()):
        # A pattern that matches folders means everything below them.
        found.extend(fs.find(match, withdirs=False) if info.get("type") == "directory" else [match])
    if not found:
        raise SourceError(f"glob {spec.uri} matched no files; check the pattern")
    return [name for name in found if not name.endswith("/")]


def _walk_local(unit: ListingUnit) -> tuple[list[str], list[ListingUnit]]:
    """Files at and below `unit.prefix`, following symlinked folders; the next levels as units while fanning out.

    Each real folder is listed once: a symlink to a folder inside the input is not followed (the folder is listed
    at its real place, under its real path's keys), and a folder outside it reached by several links is listed
    through the first (`distinct_units` does the same across units). A DAG of links cannot multiply rows.
    """
    files: list[str] = []
    more: list[ListingUnit] = []
    root_real = os.path.realpath(unit.root or unit.prefix)
    entered: set[tuple[int, int]] = set()
    stack = [(unit.prefix, unit.depth, unit.ancestors)]
    while stack:
        folder, depth, ancestors = stack.pop()
        try:
            here = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise SourceError(
                f"cannot list folder {folder} of input {unit.spec.uri} ({error.strerror or error}); its images would be "
                "missing from the output: fix its permissions, or list the inputs in a manifest"
            ) from None
        chain = (*ancestors, (here.st_dev, here.st_ino))
        entered.add((here.st_dev, here.st_ino))
        for entry in entries:
            if entry.name in OUTPUT_MARKERS:
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(entry.path)  # a broken link named like an image still gets its row (a read error)
                continue
            try:
                target = entry.stat()
            except OSError as error:  # e.g. a path longer than the system allows (PATH_MAX)
                raise SourceError(
                    f"cannot list folder {entry.path} of input {unit.spec.uri} ({error.strerror or error}); its images would "
                    "be missing from the output: shorten the path (move the folder up), or list the inputs in a manifest"
                ) from None
            identity = (target.st_dev, target.st_ino)
            if identity in chain or not stat.S_ISDIR(target.st_mode):
                log.warning("not entering %s again: it links to a folder above it", entry.path)
                continue
            if entry.is_symlink() and _inside(os.path.realpath(entry.path), root_real):
                continue  # listed at its real place in this input
            if identity in entered:
                continue  # reached through another link already
            entered.add(identity)
            if depth + 1 < FAN_OUT_DEPTH:
                more.append(replace(unit, prefix=entry.path, depth=depth + 1, ancestors=chain, folder=identity))
            else:
                stack.append((entry.path, depth + 1, chain))
    return files, more


def distinct_units(units: Sequence[ListingUnit], seen: set[tuple[int, int]]) -> list[ListingUnit]:
    """The units whose local folder has not been listed in this job yet (`seen`, updated); units of other kinds
    pass. Two links to one folder outside the input then list it once, through the first to arrive."""
    out = []
    for unit in units:
        if unit.folder is not None:
            if unit.folder in seen:
                continue
            seen.add(unit.folder)
        out.append(unit)
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _walk_remote(unit: ListingUnit, fs: fsspec.AbstractFileSystem) -> tuple[list[str], list[ListingUnit]]:
    """Objects at `unit.prefix` (one delimiter listing) and below; sub-prefixes become units while fanning out."""
    try:
        entries = fs.ls(unit.prefix, detail=True, refresh=True) if unit.depth < FAN_OUT_DEPTH else None
        if entries is None:
            return [name for name in fs.find(unit.prefix, withdirs=False) if not name.endswith("/")], []
    except FileNotFoundError:
        return [], []
    except Exception as error:
        raise SourceError(
            f"cannot list {fs.unstrip_protocol(unit.prefix)} ({type(error).__name__}: {error}); its objects would be missing"
        ) from None
    files: list[str] = []
    more: list[ListingUnit] = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name == unit.prefix and entry.get("type") == "directory":
            # an empty path segment (`p//b.jpg`): the store shows it as a sub-prefix named like this one; its
            # objects are listed whole, by key, and keep the empty segment in their keys (`/b.jpg`)
            files.extend(_under_empty_segment(fs, unit.prefix))
            continue
        if name == unit.prefix or posixpath.basename(name) in OUTPUT_MARKERS:
            continue  # the prefix's own folder-marker object, or an output's bookkeeping
        if entry.get("type") == "directory":
            more.append(replace(unit, prefix=name, depth=unit.depth + 1))
        elif not entry["name"].endswith("/"):
            files.append(name)
    return files, more


def _under_empty_segment(fs: fsspec.AbstractFileSystem, prefix: str) -> list[str]:
    """The objects whose keys continue `prefix` with an empty path segment (`prefix//...`), at any depth."""
    try:
        found = fs.find(prefix, withdirs=False)
    except Exception as error:
        raise SourceError(
            f"cannot list {fs.unstrip_protocol(prefix)}// ({type(error).__name__}: {error}); its objects would be missing"
        ) from None
    return [name for name in found if name.startswith(prefix.rstrip("/") + "//") and not name.endswith("/")]


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
