"""The WebDataset format: tar shards of samples, `{key}.jpg` beside `{key}.txt` and `{key}.json` (img2dataset's
`--output_format webdataset`, the `webdataset` package's TarWriter).

A tar is one shard of the plan, listed as a file and never member by member: its samples are counted only
when it is read, a member at a time in tar's stream mode (a gzip'd tar too), each image bounded by
`--max-bytes`. A sample's key is WebDataset's `__key__`: the member's path up to the first dot of its name.
The first image member of a sample (any extension the decoder takes) is labelled; its `.txt` rides along as
`caption`, its `.json` as `metadata`. What cannot be read becomes a row, never a silence: a truncated or
corrupt tar gives the samples before the fault and one `read_error` row naming the byte offset.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa

from pipeline.stages.sources import IMAGE_EXTENSIONS, TAR_EXTENSIONS, InputSpec
from pipeline.stages.storage import SourceError, filesystem_for, full_uri
from pipeline.stages.units import MAX_SKIPPED_EXAMPLES, ListingUnit, UnitListing

FORMAT = "webdataset"
# The columns a tar's sample brings: its WebDataset key, its tar, its caption (.txt) and metadata (.json)
COLUMNS = pa.schema([("sample_key", pa.string()), ("tar", pa.string()), ("caption", pa.string()), ("metadata", pa.string())])
_IMAGE_SUFFIXES = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
UNKNOWN_ROWS = -1  # a tar's samples are counted when it is read


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def tar_source(uri: str, estimate: int | None = None) -> tuple[str, int]:
    """A tar as a plan's source: its shard's samples are counted when read (`UNKNOWN_ROWS`)."""
    return json.dumps(
        {"format": FORMAT, "uri": uri, **({"estimate": estimate} if estimate is not None else {})}, sort_keys=True
    ), UNKNOWN_ROWS


class WebDatasetFormat:
    """Tar shards: a tar, a list or brace range of them, a glob ending in .tar, or img2dataset's output folder.

    A folder's or glob's tars are listed in one task (names only); img2dataset's sidecar files beside each tar
    (`NNNNN.parquet`, `NNNNN_stats.json`) are counted as what they are, never read as inputs.
    """

    kinds: tuple[str, ...] = ("webdataset",)

    def units(self, spec: InputSpec, index: int, storage_options: Mapping[str, Any], header: Any = None) -> list[ListingUnit]:
        return [ListingUnit(spec, input_index=index)]

    def schema(self, spec: InputSpec, storage_options: Mapping[str, Any], header: Any = None) -> pa.Schema:
        return pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *COLUMNS])

    def list_unit(self, unit: ListingUnit, storage_options: Mapping[str, Any]) -> UnitListing:
        if is_named_tar(unit.spec):  # nothing to list: `run.listing_tasks` makes its shard on the driver
            return UnitListing(_empty_listing(), sources=[tar_source(unit.spec.uri)])
        fs, path = filesystem_for(unit.spec.uri, storage_options)
        path = path.rstrip("/")
        names = sorted(fs.glob(path) if any(c in path for c in "*?[") else fs.ls(path, detail=False))
        tars = [name for name in names if is_tar(name)]
        others = [name for name in names if not is_tar(name)]
        skipped = [f"{full_uri(fs, name)} ({_sidecar_of(name, tars) or 'not a tar'})" for name in others]
        if not tars:
            raise SourceError(f"input {unit.spec.uri} holds no tar shards (.tar, .tar.gz, .tgz); check the path")
        first = stats_estimate(fs, tars[0])  # one request: img2dataset's count of the first tar, for progress
        return UnitListing(
            _empty_listing(),
            skipped=skipped[:MAX_SKIPPED_EXAMPLES],
            skipped_count=len(skipped),
            sources=[tar_source(full_uri(fs, t)) for t in tars],
            estimate=first * len(tars) if first is not None else 0,
        )


def is_named_tar(spec: InputSpec) -> bool:
    """A tar named as an input (one of a list or brace range): its shard needs no listing task and no request;
    a tar that is not there is a `read_error` row when its shard is read."""
    return spec.kind == "webdataset" and is_tar(spec.uri) and not any(c in spec.uri for c in "*?[")


def looks_like_img2dataset(fs: Any, folder: str) -> bool:
    """Whether a folder is img2dataset's webdataset output: its first shard, `00000.tar`, is there (one request)."""
    return bool(fs.exists(f"{folder.rstrip('/')}/00000.tar"))


def _sidecar_of(name: str, tars: list[str]) -> str:
    stem = name.rsplit("/", 1)[-1]
    for suffix, what in (("_stats.json", "img2dataset's statistics"), (".parquet", "img2dataset's sidecar table")):
        if stem.endswith(suffix) and any(t.rsplit("/", 1)[-1].startswith(stem[: -len(suffix)] + ".") for t in tars):
            return f"{what} of {stem[: -len(suffix)]}.tar"
    return ""


def stats_estimate(fs: Any, path: str) -> int | None:
    """img2dataset's count of the samples it wrote in a tar (`NNNNN_stats.json` beside `NNNNN.tar`), if there."""
    stem = path[: -len(next(e for e in TAR_EXTENSIONS if path.lower().endswith(e)))]
    try:
        with fs.open(f"{stem}_stats.json", "rb") as handle:
            return int(json.load(handle)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Sample:
    """One WebDataset sample: its key, its image member (name and bytes, or why none), caption and metadata."""

    key: str
    image: str = ""  # the image member's name
    data: bytes | Exception | None = None
    caption: str | None = None
    metadata: str | None = None
    offset: int = 0  # byte offset of its first member's header


@dataclass
class TarTally:
    """What a tar held besides its labelled images: members per kind, and what was left out and why."""

    members: Counter[str] = field(default_factory=Counter)  # every member by kind (its extension)
    left_out: Counter[str] = field(default_factory=Counter)  # extra images, samples without an image, ...

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"members": dict(self.members), "left_out": dict(self.left_out)}


END_OF_ARCHIVE = 1024  # the two zero blocks every complete tar ends with
TEXT_LIMIT = 1 << 20  # a caption or metadata member larger than this is left out (and counted): rows stay small


def samples(handle: IO[bytes], tar_name: str, max_bytes: int | None, tally: TarTally, size: int | None = None) -> Iterator[Sample]:
    """The samples of a tar stream, in order; a fault ends them with a Sample whose data is the error.

    A tar cut at a member's edge reads as a shorter complete one; with the tar's `size` (uncompressed tars) the
    missing end-of-archive blocks tell it apart, and it ends with an error Sample too.

    Members of one sample must be adjacent (WebDataset's rule): a key met again after another key's members is
    a sample of its own whose data says so, under the key `<key>#<n>`.
    """
    seen: Counter[str] = Counter()
    current: Sample | None = None
    offset = 0
    try:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                offset = member.offset
                if not member.isfile():
                    continue
                key, kind = _split(member.name)
                tally.members[kind or "(no extension)"] += 1
                if current is None or key != current.key.split("#", 1)[0]:
                    if current is not None:
                        yield from _finish(current, tally)
                    seen[key] += 1
                    current = Sample(key if seen[key] == 1 else f"{key}#{seen[key]}", offset=member.offset)
                    if seen[key] > 1:
                        current.data = ValueError(
                            f"members of sample {key} are not adjacent in {tar_name} (met again at byte {member.offset}); "
                            "WebDataset needs a sample's members side by side: rewrite the tar sorted by name"
                        )
                _take(current, member, kind, archive, max_bytes, tally)
            if current is not None:
                yield from _finish(current, tally)
            end = archive.offset
        if size is not None and end + END_OF_ARCHIVE > size and size > 0:
            message = (
                f"{tar_name} is truncated at byte {end}: it ends without the end-of-archive blocks, so samples after it may be missing"
            )
            yield Sample(f"#error@{end}", data=OSError(message), offset=end)
    except Exception as error:  # whatever the store or the bytes raise mid-tar: a row, never a failed job
        if current is not None and not isinstance(current.data, Exception) and current.image and current.data is not None:
            yield current
        at = getattr(handle, "tell", lambda: offset)()
        empty = "the tar is empty (0 bytes)" if at == 0 and offset == 0 and "empty" in str(error).lower() else None
        message = (
            empty or f"{tar_name} is truncated or corrupt at byte {at} ({type(error).__name__}: {error}); the samples before it were read"
        )
        yield Sample(f"#error@{at}", data=OSError(message), offset=at)


def _take(sample: Sample, member: tarfile.TarInfo, kind: str, archive: tarfile.TarFile, max_bytes: int | None, tally: TarTally) -> None:
    suffix = kind.rsplit(".", 1)[-1].lower()
    if suffix in _IMAGE_SUFFIXES and kind.lower() == suffix:  # `x.jpg`, not `x.jpg.gz`
        if sample.image:
            tally.left_out["extra image in a sample"] += 1
            return
        sample.image = member.name
        if isinstance(sample.data, Exception):
            return  # a non-adjacent fragment: its row says so
        if max_bytes is not None and member.size > max_bytes:
            sample.data = OSError(f"member {member.name} is {member.size} bytes, over the --max-bytes limit of {max_bytes}")
            return
        extracted = archive.extractfile(member)
        sample.data = extracted.read() if extracted is not None else OSError(f"member {member.name} has no data")
    elif kind in ("txt", "json") and member.size > TEXT_LIMIT:
        tally.left_out[f"{kind} over 1 MiB"] += 1
    elif kind == "txt":
        extracted = archive.extractfile(member)
        sample.caption = extracted.read().decode("utf-8", "replace") if extracted is not None else None
    elif kind == "json":
        extracted = archive.extractfile(member)
        sample.metadata = extracted.read().decode("utf-8", "replace") if extracted is not None else None


def _finish(sample: Sample, tally: TarTally) -> Iterator[Sample]:
    if sample.image or isinstance(sample.data, Exception):
        yield sample
    else:
        tally.left_out["sample without an image"] += 1


def _split(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member: the path up to the first dot of its last component."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension


def read_tar_batches(
    source_text: str, schema: pa.Schema, storage_options: Mapping[str, Any], batch_size: int, max_bytes: int | None, tally: TarTally
) -> Iterator[tuple[pa.Table, list[bytes | Exception]]]:
    """A tar's samples, a batch at a time: listing rows in the plan's `schema` and each image's bytes (or error)."""
    source = json.loads(source_text)
    uri = source["uri"]
    fs, path = filesystem_for(uri, storage_options)
    tar_name = posixpath.basename(path)
    batch: list[Sample] = []
    found = 0
    try:
        size = None if path.lower().endswith((".gz", ".tgz")) else fs.size(path)  # a gzip stream checks its own end
        handle = fs.open(path, "rb")
    except OSError as error:  # a tar named in a list or brace range, gone or unreadable: its row says so
        yield _rows([Sample("#unreadable", data=OSError(f"cannot read tar {uri}: {type(error).__name__}: {error}"))], uri, tar_name, schema)
        return
    with handle:
        for sample in samples(handle, tar_name, max_bytes, tally, size):
            batch.append(sample)
            found += 1
            if len(batch) == batch_size:
                yield _rows(batch, uri, tar_name, schema)
                batch = []
    if not found:  # a tar must give a row, or its shard would never be whole: say what it held instead
        held = ", ".join(f"{count} {kind}" for kind, count in sorted(tally.members.items())) or "no members"
        batch.append(Sample("#no-images", data=OSError(f"{tar_name} holds no image sample ({held})")))
    if batch:
        yield _rows(batch, uri, tar_name, schema)


def _rows(batch: list[Sample], uri: str, tar_name: str, schema: pa.Schema) -> tuple[pa.Table, list[bytes | Exception]]:
    values: dict[str, list[Any]] = {
        "key": [f"{tar_name}/{s.key}" for s in batch],
        "path": [f"{uri}#{s.image}" if s.image else uri for s in batch],
        "sample_key": [s.key.split("#", 1)[0] if not s.key.startswith("#") else None for s in batch],
        "tar": [uri] * len(batch),
        "caption": [s.caption for s in batch],
        "metadata": [s.metadata for s in batch],
    }
    columns = [pa.array(values[f.name], f.type) if f.name in values else pa.nulls(len(batch), f.type) for f in schema]
    contents: list[bytes | Exception] = [s.data if isinstance(s.data, (bytes, Exception)) else OSError("no image") for s in batch]
    return pa.Table.from_arrays(columns, schema=schema), contents


def _empty_listing() -> pa.Table:
    return pa.table({"key": pa.array([], pa.string()), "path": pa.array([], pa.string())})
