"""The files format: folders (listed a level at a time, fanning out into sub-folders), globs and single files,
one image per file. Keys are paths relative to the input's root; only the project's own markers are skipped."""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipeline.stages.sources import IMAGE_EXTENSIONS, InputSpec, glob_root
from pipeline.stages.storage import SourceError, filesystem_for, full_uri
from pipeline.stages.units import MAX_SKIPPED_EXAMPLES, ListingUnit, UnitListing

log = logging.getLogger(__name__)


# The project's own markers (an output directory's bookkeeping): the only names a listing skips, so that
# photos named _DSC0001.JPG or kept under _archive/ or .thumbnails/ are still labelled.
OUTPUT_MARKERS = ("_SUCCESS", "_manifest.json", "_staging", "_plan", "_lease.json", "_lease.lock")


FAN_OUT_DEPTH = 3  # folder levels listed one at a time (each sub-folder its own listing task) before a subtree is walked whole


class FileFormat:
    """Folders, globs and single image files: the `directory`, `glob` and `file` inputs."""

    kinds: tuple[str, ...] = ("directory", "glob", "file")

    def units(self, spec: InputSpec, index: int, storage_options: Mapping[str, Any], header: Any = None) -> list[ListingUnit]:
        """One unit per input: a folder fans out into a unit per sub-folder as it is listed."""
        if spec.kind != "directory":
            return [ListingUnit(spec, input_index=index)]
        fs, path = filesystem_for(spec.uri, storage_options)
        path = path.rstrip("/") or path
        fs.invalidate_cache(path)  # a long-lived process may list a prefix again after it changed
        return [ListingUnit(spec, root=path, prefix=path, input_index=index)]

    def schema(self, spec: InputSpec, storage_options: Mapping[str, Any], header: Any = None) -> pa.Schema:
        return pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string())])

    def list_unit(self, unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
        """A unit's images as (key, path) rows, its sub-folders, and the other files it holds (counted, a few named).

        Every file that looks like an image gets a row, under symlinked folders too (a folder that is its own
        ancestor is entered once); only the project's own markers (OUTPUT_MARKERS) are skipped. A folder that
        cannot be listed fails the unit loudly rather than hiding its images.
        """
        spec = unit.spec
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
