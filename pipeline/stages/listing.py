"""Listing inputs into (key, path) rows, by units one task can list: folder levels that fan out, globs, files, manifest row groups."""

from __future__ import annotations

import hashlib
import io
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
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.credentials import mask_credentials
from pipeline.schema import OUTPUT_COLUMNS
from pipeline.stages.plan import unify_schemas
from pipeline.stages.sources import (
    IMAGE_EXTENSIONS,
    LOCAL_PROTOCOLS,
    InputSpec,
    SourceError,
    filesystem_for,
    full_uri,
    glob_root,
    is_local,
)

# Columns the pipeline writes, and a row's place in its shard: a manifest column of one of these names is refused.
RESERVED_COLUMNS = (*(name for name in OUTPUT_COLUMNS if name not in ("key", "path")), "_row", "_shard")
# The project's own markers (an output directory's bookkeeping): the only names a listing skips, so that
# photos named _DSC0001.JPG or kept under _archive/ or .thumbnails/ are still labelled.
OUTPUT_MARKERS = ("_SUCCESS", "_manifest.json", "_staging", "_plan", "_lease.json", "_lease.lock")
CSV_UNIT_BYTES = 64 * 2**20  # uncompressed CSV manifests are listed in byte ranges of this size (about 10^6 rows), one task each
FAN_OUT_DEPTH = 3  # folder levels listed one at a time (each sub-folder its own listing task) before a subtree is walked whole
MAX_SKIPPED_EXAMPLES = 20
_MAX_DUPLICATE_EXAMPLES = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListingUnit:
    """A piece of an input that one task lists: a folder level, a glob, a file, or row groups of a manifest."""

    spec: InputSpec
    root: str = ""  # folders: the input root that keys are relative to (filesystem path, no protocol)
    prefix: str = ""  # folders: the level this unit lists (filesystem path)
    depth: int = 0  # folders: levels below the root; at FAN_OUT_DEPTH the subtree is walked whole
    ancestors: tuple[tuple[int, int], ...] = ()  # local folders: (device, inode) of the folders above, against symlink loops
    folder: tuple[int, int] | None = None  # local folders: (device, inode) of this unit's own folder, listed once per job
    row_groups: tuple[int, ...] | None = None  # Parquet manifests: the row groups of this unit; None: the whole file
    byte_range: tuple[int, int] | None = None  # CSV manifests: the lines starting in [start, end); None: the whole file
    input_index: int = 0  # the input's place among the job's inputs

    @property
    def id(self) -> str:
        """Stable within a plan, and independent of where the input lives: the same tree on local disk and on
        S3 gives the same unit ids, so the same shards (keys are relative too)."""
        relative = self.prefix[len(self.root) :] if self.prefix.startswith(self.root) else self.prefix
        text = f"{self.input_index}|{self.spec.kind}|{relative}|{self.row_groups}" + (f"|{self.byte_range}" if self.byte_range else "")
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class UnitListing:
    """What listing one unit found: its images, the folders still to list, and the files skipped."""

    table: pa.Table  # key, path and a manifest's other columns
    more: list[ListingUnit] = field(default_factory=list)  # sub-folders, each for its own task
    skipped: list[str] = field(default_factory=list)  # the first few skipped files, full URIs
    skipped_count: int = 0
    # a CSV byte range whose text leaves a quote open: a record crosses an edge, so the file's ranges cannot be
    # trusted (their edges may fall inside quoted fields) and the file is listed whole instead
    splits_record: bool = False


class _RecordAcrossRanges(Exception):
    """A CSV byte range holds an odd number of quote characters: a quoted field runs across one of its edges."""


@dataclass(frozen=True)
class Listing:
    """Every image found, one row each, plus the non-image files seen on the way."""

    table: pa.Table  # key (string), path (string, full URI; plain absolute path locally), manifest pass-through columns
    skipped: list[str] = field(default_factory=list)  # the first few skipped files, full URIs
    skipped_count: int = 0  # all skipped files


def listing_units(
    specs: Sequence[InputSpec],
    storage_options: Mapping[str, Any],
    manifest_unit_rows: int = 1_000_000,
    csv_unit_bytes: int = CSV_UNIT_BYTES,
) -> list[ListingUnit]:
    """The first units to list: one per folder input (it fans out into sub-folders), glob and file, Parquet
    manifests cut by row groups into units of about `manifest_unit_rows` rows, and uncompressed CSV manifests
    into byte ranges of `csv_unit_bytes` (a compressed one is one unit).

    Only Parquet footers and file sizes are read here, never rows or file names: O(inputs + row groups).

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
            units.extend(replace(unit, input_index=index) for unit in _manifest_units(spec, fs, path, manifest_unit_rows))
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


def known_schema(specs: Sequence[InputSpec], storage_options: Mapping[str, Any]) -> pa.Schema | None:
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
            return UnitListing(_list_manifest(spec, storage_options, unit.row_groups, unit.byte_range))
        except _RecordAcrossRanges:
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


def _manifest_units(spec: InputSpec, fs: fsspec.AbstractFileSystem, path: str, unit_rows: int) -> list[ListingUnit]:
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except FileNotFoundError as error:
        raise SourceError(f"manifest {spec.uri} does not exist; check the path") from error
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceError(f"manifest {spec.uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from error
    if metadata.num_rows == 0:
        raise SourceError(f"manifest {spec.uri} has no rows; add images or drop the input")
    units: list[ListingUnit] = []
    group: list[int] = []
    rows = 0
    for index in range(metadata.num_row_groups):
        group.append(index)
        rows += metadata.row_group(index).num_rows
        if rows >= unit_rows:
            units.append(ListingUnit(spec, row_groups=tuple(group)))
            group, rows = [], 0
    if group:
        units.append(ListingUnit(spec, row_groups=tuple(group)))
    return units


def _read_manifest_table(
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
                raise _RecordAcrossRanges()
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


def check_manifest_columns(spec: InputSpec, storage_options: Mapping[str, Any]) -> None:
    """Fail fast on a manifest whose header is unusable, reading its header (CSV) or footer (Parquet) only.

    Raises:
        SourceError: the manifest cannot be read, lacks a `path` column, repeats a column name, or uses an
            output column's name.
    """
    fs, path = filesystem_for(spec.uri, storage_options)
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                names = pq.read_schema(handle).names
        else:
            with fs.open(path, "rb", compression="infer") as handle:
                names = pa_csv.open_csv(handle).schema.names
    except FileNotFoundError as error:
        raise SourceError(f"manifest {spec.uri} does not exist; check the path") from error
    except (pa.ArrowInvalid, EOFError, UnicodeDecodeError) as error:
        raise SourceError(f"manifest {spec.uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from error
    _check_columns(spec, names)


def manifest_version(spec: InputSpec, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies this version of a manifest file without reading it: its size and its ETag or modification time.

    A plan records it, so a resume can say that the manifest changed since (its new rows are not labelled).
    """
    fs, path = filesystem_for(spec.uri, storage_options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    changed = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return {"size": info.get("size"), "version": str(changed) if changed is not None else None}


def _check_columns(spec: InputSpec, names: Sequence[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"manifest {spec.uri} repeats column name(s) {', '.join(repeated)}; give each column its own name")
    if "path" not in names:
        raise SourceError(
            f"manifest {spec.uri} has no 'path' column (found: {', '.join(names) or 'none'}); "
            "add a column 'path' with one image path or URI per row"
        )
    reserved = [name for name in names if name in RESERVED_COLUMNS]
    if reserved:
        raise SourceError(f"manifest {spec.uri} has column(s) {', '.join(reserved)}, which the output already uses; rename them")


def _list_manifest(
    spec: InputSpec,
    storage_options: Mapping[str, Any],
    row_groups: tuple[int, ...] | None = None,
    byte_range: tuple[int, int] | None = None,
) -> pa.Table:
    fs, path = filesystem_for(spec.uri, storage_options)
    table = _read_manifest_table(spec, fs, path, row_groups, byte_range)
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


def _raise_on_duplicate_keys(keys: pa.ChunkedArray) -> None:
    # keys are sorted, so duplicates are neighbours.
    keys = keys.combine_chunks()
    if len(keys) < 2:
        return
    same = pc.equal(keys[1:], keys[:-1])
    if not pc.any(same).as_py():
        return
    duplicates = sorted(set(keys[1:].filter(same).to_pylist()))
    shown = ", ".join(duplicates[:_MAX_DUPLICATE_EXAMPLES]) + (", ..." if len(duplicates) > _MAX_DUPLICATE_EXAMPLES else "")
    raise SourceError(
        f"{len(duplicates)} key(s) appear more than once across the inputs ({shown}); keys must be unique so each "
        "output row maps to one image: list the inputs in a manifest with a unique 'key' column, or drop overlapping inputs"
    )
