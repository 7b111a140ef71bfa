"""Labelled images for `lgca eval`: class-per-folder trees and manifests, the --limit subset, class checks."""

from __future__ import annotations

import difflib
import itertools
import os
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.evaluation.errors import EvaluationError, shown_names
from pipeline.stages.listing import list_inputs
from pipeline.stages.sources import check_inputs, parse_input
from pipeline.stages.storage import filesystem_for

_LOCAL_PROTOCOLS = (None, "file", "local")


@dataclass(frozen=True)
class LabelledImages:
    """Images with their true class names, sorted by key."""

    keys: tuple[str, ...]
    paths: tuple[str, ...]  # full URIs; plain absolute paths locally
    labels: tuple[str, ...]  # true class name of each image
    skipped: tuple[str, ...] = ()  # the first few non-image files seen in a folder tree
    skipped_count: int = 0  # all of them
    groups: tuple[str, ...] = ()  # a manifest's `group` of each image (e.g. an object scale); empty without one

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.paths) == len(self.labels):
            raise ValueError(f"{len(self.keys)} keys, {len(self.paths)} paths and {len(self.labels)} labels")
        if self.groups and len(self.groups) != len(self.keys):
            raise ValueError(f"{len(self.groups)} groups for {len(self.keys)} images")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes that have images, sorted."""
        return tuple(sorted(set(self.labels)))


def list_labelled(data: str, storage_options: Mapping[str, Any]) -> LabelledImages:
    """List labelled images: a class-per-folder tree or a manifest with `path` and `label` columns.

    A tree is the ImageFolder layout, DATA/<class>/<image> (deeper folders belong to their top class),
    on local disk or s3://. A manifest is a .parquet, .csv or .csv.gz file; relative paths are taken
    from the manifest's folder, an optional `key` column names the images (default: the path), and an
    optional `group` column splits the metrics (accuracy per object scale, camera, source, ...).

    Args:
        data: the folder or manifest, local or a URI.
        storage_options: fsspec options for remote data.

    Returns:
        The images, sorted by key.

    Raises:
        EvaluationError: `data` is neither a folder nor a manifest; a tree holds images outside class
            folders; a manifest lacks `path` or `label`, has empty or non-text values, or repeats a key.
        SourceError: the folder is missing, unreadable or holds no images.
    """
    spec = parse_input(data)
    if spec.kind == "manifest":
        return _labelled_manifest(spec.uri, storage_options)
    if spec.kind != "directory":
        raise EvaluationError(
            f"--data {data} is a {spec.kind}; pass a class-per-folder directory (DATA/<class>/<image>) "
            "or a .parquet/.csv manifest with path and label columns"
        )
    check_inputs([spec], storage_options)
    listing = list_inputs([spec], storage_options)
    keys = listing.table.column("key").to_pylist()
    loose = [key for key in keys if "/" not in key]
    if loose:
        raise EvaluationError(
            f"{data} holds {len(loose)} image(s) outside class folders ({shown_names(loose)}); "
            f"put every image in {data.rstrip('/')}/<class>/ or list them in a manifest with a label column"
        )
    return LabelledImages(
        keys=tuple(keys),
        paths=tuple(listing.table.column("path").to_pylist()),
        labels=tuple(key.split("/", 1)[0] for key in keys),
        skipped=tuple(listing.skipped),
        skipped_count=listing.skipped_count,
    )


def limit_images(images: LabelledImages, limit: int | None) -> LabelledImages:
    """At most `limit` images, taken round-robin over the classes in key order so every class is represented.

    Args:
        images: the labelled images.
        limit: the most images kept; None keeps all.

    Returns:
        The kept images, still sorted by key.

    Raises:
        EvaluationError: `limit` < 1.
    """
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {limit}")
    if limit is None or limit >= len(images):
        return images
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(images.labels):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[name] for name in sorted(by_class)]
    rounds = itertools.chain.from_iterable(itertools.zip_longest(*queues))
    chosen = sorted(itertools.islice((index for index in rounds if index is not None), limit))
    return LabelledImages(
        keys=tuple(images.keys[i] for i in chosen),
        paths=tuple(images.paths[i] for i in chosen),
        labels=tuple(images.labels[i] for i in chosen),
        skipped=images.skipped,
        skipped_count=images.skipped_count,
        groups=tuple(images.groups[i] for i in chosen) if images.groups else (),
    )


@dataclass(frozen=True)
class ClassCheck:
    """How the classes of the data and of the vocabulary differ."""

    absent: tuple[str, ...]  # data classes the vocabulary lacks: their images cannot be scored
    unused: tuple[str, ...]  # vocabulary classes without images: they still compete as distractors


def check_classes(data_classes: Sequence[str], vocabulary_classes: Sequence[str]) -> ClassCheck:
    """Compare class names exactly (case and spaces count), keeping each side's order."""
    known, present = set(vocabulary_classes), set(data_classes)
    return ClassCheck(
        absent=tuple(name for name in data_classes if name not in known),
        unused=tuple(name for name in vocabulary_classes if name not in present),
    )


def require_scorable(check: ClassCheck, vocabulary_classes: Sequence[str]) -> None:
    """Raise if any data class is missing from the vocabulary, naming them (with close matches as hints).

    Raises:
        EvaluationError: some data classes are absent from the vocabulary.
    """
    if not check.absent:
        return
    hints = []
    for name in check.absent[:5]:
        close = difflib.get_close_matches(name, list(vocabulary_classes), n=1, cutoff=0.6)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}?")
    hint = f" Close vocabulary names: {', '.join(hints)}." if hints else ""
    raise EvaluationError(
        f"{len(check.absent)} class(es) of the data are not in the vocabulary, so their images cannot be scored: "
        f"{shown_names(check.absent)}.{hint} Class folder names (or manifest labels) must equal the class names of "
        "--labels exactly; rename them, add the classes to the labels file, or use a manifest (docs/EVALUATION.md)"
    )


def unused_classes_warning(check: ClassCheck) -> str | None:
    """The warning line for vocabulary classes without images, or None."""
    if not check.unused:
        return None
    return f"{len(check.unused)} vocabulary class(es) have no images; they still compete as distractors: {shown_names(check.unused)}"


def _labelled_manifest(uri: str, storage_options: Mapping[str, Any]) -> LabelledImages:
    fs, path = filesystem_for(uri, storage_options)
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
        else:
            # "001" or "7" stay text: a class may be named by a number
            text = {name: pa.string() for name in ("path", "label", "key", "group")}
            with fs.open(path, "rb", compression="infer") as handle:
                table = pa_csv.read_csv(handle, convert_options=pa_csv.ConvertOptions(column_types=text))
    except FileNotFoundError:
        raise EvaluationError(f"manifest {uri} does not exist; check the path") from None
    except (pa.ArrowInvalid, EOFError, UnicodeDecodeError) as error:
        raise EvaluationError(f"manifest {uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from None
    missing = [name for name in ("path", "label") if name not in table.column_names]
    if missing:
        raise EvaluationError(
            f"manifest {uri} lacks column(s) {', '.join(missing)} (found: {', '.join(table.column_names) or 'none'}); "
            "an evaluation manifest has one row per image with its path and its class name in label"
        )
    if table.num_rows == 0:
        raise EvaluationError(f"manifest {uri} has no rows")
    raw_paths = _text_column(table, "path", uri)
    labels = [label.strip() for label in _text_column(table, "label", uri)]
    keys = _text_column(table, "key", uri) if "key" in table.column_names else raw_paths
    groups = _text_column(table, "group", uri) if "group" in table.column_names else []
    local = fsspec.core.split_protocol(uri)[0] in _LOCAL_PROTOCOLS
    folder = os.path.dirname(path) if local else posixpath.dirname(path)
    paths = [_resolve(raw, fs, folder, local) for raw in raw_paths]
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if repeated:
        raise EvaluationError(f"manifest {uri} repeats key(s) {shown_names(repeated)}; give each image one row")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return LabelledImages(
        keys=tuple(keys[i] for i in order),
        paths=tuple(paths[i] for i in order),
        labels=tuple(labels[i] for i in order),
        groups=tuple(groups[i] for i in order) if groups else (),
    )


def _text_column(table: pa.Table, name: str, uri: str) -> list[str]:
    column = table.column(name)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        what = "class names as text (the names of --labels), not indices" if name == "label" else "text"
        raise EvaluationError(f"manifest {uri}: column {name!r} holds {column.type}; write {what}")
    values = column.cast(pa.string()).to_pylist()
    empty = [row for row, value in enumerate(values) if value is None or not value.strip()]
    if empty:
        raise EvaluationError(f"manifest {uri}: column {name!r} is empty in rows {empty[:5]} (0-based); fill or remove them")
    return values


def _resolve(raw: str, fs: fsspec.AbstractFileSystem, folder: str, local: bool) -> str:
    """A manifest path as a full path or URI: absolute ones as written, relative ones from the manifest's folder."""
    protocol, rest = fsspec.core.split_protocol(raw)
    if protocol is not None:
        return rest if protocol in _LOCAL_PROTOCOLS else raw
    if local:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(raw)))
    return fs.unstrip_protocol(posixpath.normpath(posixpath.join(folder, raw)).lstrip("/"))


__all__ = [
    "ClassCheck",
    "LabelledImages",
    "check_classes",
    "limit_images",
    "list_labelled",
    "require_scorable",
    "unused_classes_warning",
]
