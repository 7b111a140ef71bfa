"""The persisted plan of a job: its inputs cut into shards of listing rows, what decides the rows, and the checks on it.

Layout under the output (a leading underscore keeps every `**/*.parquet` reader away from it):

    _plan/plan.json                  written last: the plan exists once this does
    _plan/shards/<shard>.shard       Parquet: key, path and manifest columns of at most `shard_size` images
    _plan/keys/<unit>.keys           Parquet: the keys of one listing unit by hash bucket, for the duplicate check

No plan file ends in `.parquet`, so no `**/*.parquet` glob over the output reads them as results. A shard is the unit of work and of commit: `part-<shard>.parquet` holds its rows. Nothing here holds more
than one shard or one bucket of keys in memory.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
PLAN_FORMAT = "lgca-label-plan/1"
KEY_BUCKETS = 256  # hash buckets of the duplicate check; each check task takes a range of them
KEYS_PER_CHECK = 5_000_000  # keys one duplicate-check task holds at most (about 0.5 GB of strings)
ROW_COLUMN = "_row"  # a row's index within its shard: the identity that makes commits exactly-once
_MAX_DUPLICATE_EXAMPLES = 5


class PlanError(ConfigError):
    """The plan cannot be used as asked (a changed configuration on --resume, duplicate keys); the message names the fix."""


@dataclass(frozen=True)
class Shard:
    """One shard of the plan: a stable id and its number of images; for an archive's shard, where its samples are.

    A shard listed row by row (folders, manifests) has its listing rows in `_plan/shards/<id>.shard`. A shard of an
    archive (a tar; a range of a Parquet file's rows holding image bytes) is never listed member by member:
    `source` says where its samples are (JSON, `stages.webdataset`, `stages.image_bytes`), and they are read from
    there when the shard is labelled. A tar's `rows` is -1: its samples are counted as it is read.
    """

    id: str
    rows: int
    source: str = ""


@dataclass(frozen=True)
class Plan:
    """A job's plan, as written to `_plan/plan.json`."""

    fingerprint: dict[str, Any]  # what decides the rows: a resume with another one is refused
    shards: tuple[Shard, ...]
    schema: pa.Schema  # of the listing rows: key, path, manifest columns
    skipped_count: int = 0  # non-image files seen while listing
    skipped: tuple[str, ...] = ()  # the first few of them
    listing_seconds: float = 0.0
    created_at: str = ""
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest URI -> `manifests.manifest_version` when listed
    estimated_images: int = 0  # what the uncounted shards (tars) likely hold, from img2dataset's statistics; 0: unknown

    @property
    def images(self) -> int:
        """Images in the shards whose size is known (all but archives' tars, counted as they are read)."""
        return sum(shard.rows for shard in self.shards if shard.rows >= 0)

    @property
    def uncounted(self) -> int:
        """Shards whose images are counted only as they are read (WebDataset tars)."""
        return sum(1 for shard in self.shards if shard.rows < 0)

    def to_json(self) -> str:
        document = {
            "format": PLAN_FORMAT,
            "created_at": self.created_at,
            "fingerprint": self.fingerprint,
            "images": self.images,
            "listing_seconds": round(self.listing_seconds, 3),
            "skipped_count": self.skipped_count,
            "skipped": list(self.skipped),
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
            "shards": [[shard.id, shard.rows, *([shard.source] if shard.source else [])] for shard in self.shards],
            "manifests": self.manifests,
            **({"estimated_images": self.estimated_images} if self.estimated_images else {}),
        }
        return json.dumps(document, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Plan:
        """Raises PlanError: not a plan this version writes."""
        try:
            document = json.loads(text)
            if document.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {document.get('format')!r}, expected {PLAN_FORMAT}")
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(document["schema"])))
            return cls(
                fingerprint=document["fingerprint"],
                shards=tuple(Shard(str(entry[0]), int(entry[1]), str(entry[2]) if len(entry) > 2 else "") for entry in document["shards"]),
                schema=schema,
                skipped_count=int(document.get("skipped_count", 0)),
                skipped=tuple(document.get("skipped", ())),
                listing_seconds=float(document.get("listing_seconds", 0.0)),
                created_at=str(document.get("created_at", "")),
                manifests=dict(document.get("manifests") or {}),
                estimated_images=int(document.get("estimated_images") or 0),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise PlanError(f"{where} is not a plan this version can use ({error}); start over with --overwrite") from None


def fingerprint(
    inputs: Sequence[str],
    vocabulary_digest: str,
    scoring: Mapping[str, Any],
    model: Mapping[str, Any],
    max_pixels: int,
    shard_size: int,
    embeddings: bool = False,
) -> dict[str, Any]:
    """What decides the rows of a job (and how they are cut into files), as one comparable record.

    Args:
        inputs: the INPUT arguments as given.
        vocabulary_digest: `Vocabulary.digest()`: classes, descriptions, templates and prompt.
        scoring: `ScoringConfig.to_dict()`: method, its parameters and the seed.
        model: the model's identity: architecture, weights source, and the weights' sha256 when known.
        max_pixels: the decompression-bomb limit, which decides which rows fail.
        shard_size: images per shard; the plan's shards keep it on resume.
        embeddings: whether rows hold the `embedding` column (recorded only when they do, so plans made
            before the option resume as they are).
    """
    record: dict[str, Any] = {
        "inputs": list(inputs),
        "vocabulary_sha256": vocabulary_digest,
        "scoring": dict(scoring),
        "model": dict(model),
        "max_pixels": max_pixels,
        "shard_size": shard_size,
    }
    if embeddings:
        record["embeddings"] = True
    return record


def changes(planned: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """What differs between a plan's fingerprint and the one a resumed job asks for, one phrase each.

    The shard size is left out: a resume keeps the plan's shards whatever --rows-per-file says.
    """
    out: list[str] = []
    for name in sorted(set(planned) | set(asked)):
        if name == "shard_size":
            continue
        old, new = planned.get(name), asked.get(name)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out.extend(
                f"{name}.{item}: {old.get(item)!r} -> {new.get(item)!r}"
                for item in sorted(set(old) | set(new))
                if old.get(item) != new.get(item)
            )
        elif old != new:
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


def check_resumable(plan: Plan, asked: Mapping[str, Any], output: str) -> None:
    """Refuse to resume `plan` with a configuration that would give other rows.

    Raises:
        PlanError: naming every changed setting, and the two ways on.
    """
    changed = changes(plan.fingerprint, asked)
    if changed:
        raise PlanError(
            f"--resume of {output} asks for other rows than its plan: {'; '.join(changed)}. "
            "Resume with the original settings, or start over with --overwrite (or use another --output)"
        )


# ---------------------------------------------------------------- files


def plan_path(root: str) -> str:
    return f"{root}/{PLAN_DIR}/{PLAN_FILE}"


def shard_path(root: str, shard_id: str) -> str:
    return f"{root}/{PLAN_DIR}/shards/{shard_id}.shard"


def keys_path(root: str, unit_id: str) -> str:
    return f"{root}/{PLAN_DIR}/keys/{unit_id}.keys"


def read_plan(fs: fsspec.AbstractFileSystem, root: str, where: str) -> Plan | None:
    """The plan under `root`, or None when none was completed there."""
    path = plan_path(root)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as handle:
        return Plan.from_json(handle.read(), where)


def write_plan(fs: fsspec.AbstractFileSystem, root: str, plan: Plan) -> None:
    """Write `_plan/plan.json` in one PUT (object stores) or by rename (local): readers see all of it or none."""
    put_atomically(fs, plan_path(root), plan.to_json().encode("utf-8"))


def put_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Whole or absent: a temporary sibling renamed locally; one PUT on an object store (atomic there)."""
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    folder = path.rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.tmp-{uuid.uuid4().hex}"  # a dot name: no reader or glob of results sees it
    with fs.open(temporary, "wb") as handle:
        handle.write(data)
    fs.mv(temporary, path)


def write_shards(fs: fsspec.AbstractFileSystem, root: str, unit_id: str, table: pa.Table, shard_size: int) -> list[Shard]:
    """Cut one unit's listing rows (sorted by key) into shard files `<unit>-<index>`; returns the shards written."""
    shards: list[Shard] = []
    for index, start in enumerate(range(0, table.num_rows, shard_size)):
        shard = Shard(f"{unit_id}-{index:05d}", min(shard_size, table.num_rows - start))
        _write_parquet(fs, shard_path(root, shard.id), table.slice(start, shard_size))
        shards.append(shard)
    return shards


def read_shard(fs: fsspec.AbstractFileSystem, root: str, shard_id: str, schema: pa.Schema) -> pa.Table:
    """A shard's listing rows in the plan's schema (columns a folder input lacks are null), with ROW_COLUMN."""
    with fs.open(shard_path(root, shard_id), "rb") as handle:
        table = pq.read_table(handle)
    columns = [
        table.column(name).cast(field.type) if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(schema.names, schema)
    ]
    table = pa.Table.from_arrays(columns, schema=schema)
    return table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int32()))


def bucket_of(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The hash bucket in [0, KEY_BUCKETS) of each key; equal keys share a bucket, in every process.

    Vectorised over the keys' UTF-8 bytes (a polynomial hash, then a 64-bit finaliser): 10^6 keys take
    tens of milliseconds, where a Python loop over them took most of a second.
    """
    array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    array = array.cast(pa.large_string())  # 64-bit offsets
    if len(array) == 0:
        return pa.array([], pa.uint16())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        powers = np.cumprod(np.concatenate([[1], np.full(int(lengths.max()), _HASH_BASE)]).astype(np.uint64))  # 1, B, B^2, ...
        hashes = lengths.astype(np.uint64)
        # Keys grouped by length: each slice of a group is one (keys x length) array of bytes, hashed in one
        # product. Real key sets have few distinct lengths; slices bound the memory for long keys.
        order = np.argsort(lengths, kind="stable")
        edges = np.flatnonzero(np.diff(lengths[order])) + 1
        for group in np.split(order, edges):
            length = int(lengths[group[0]])
            step = max(1, _HASH_BYTES_PER_STEP // max(1, length))
            for rows in (group[i : i + step] for i in range(0, len(group) if length else 0, step)):
                block = data[starts[rows, None] + np.arange(length)].astype(np.uint64)
                hashes[rows] += (block * powers[:length]).sum(axis=1, dtype=np.uint64)
        hashes = _mix(hashes)
    return pa.array((hashes % np.uint64(KEY_BUCKETS)).astype(np.uint16), pa.uint16())


_HASH_BASE = 1_099_511_628_211  # FNV's 64-bit prime, as the polynomial's base
_HASH_BYTES_PER_STEP = 1 << 22  # key bytes hashed in one product: about 100 MB of temporaries, whatever the key length


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches the low bits the bucket is taken from."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def write_keys(fs: fsspec.AbstractFileSystem, root: str, unit_id: str, keys: pa.Array | pa.ChunkedArray) -> None:
    """A unit's keys sorted by bucket, one row group per bucket, so a check task reads only its buckets."""
    table = pa.table({"bucket": bucket_of(keys), "key": keys}).sort_by("bucket")
    path = keys_path(root, unit_id)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle, pq.ParquetWriter(handle, table.schema) as writer:
        buckets = table.column("bucket").to_numpy()
        starts = [0, *[i for i in range(1, len(buckets)) if buckets[i] != buckets[i - 1]], len(buckets)]
        for start, end in zip(starts[:-1], starts[1:]):
            writer.write_table(table.slice(start, end - start))


def duplicate_keys(fs: fsspec.AbstractFileSystem, paths: Iterable[str], buckets: range) -> tuple[int, list[str]]:
    """Keys that occur more than once among the key files `paths`, looking only at `buckets`.

    Returns:
        (how many distinct keys repeat, the first few of them).
    """
    low, high = buckets.start, buckets.stop - 1
    parts: list[pa.Array] = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["key"], filters=[("bucket", ">=", low), ("bucket", "<=", high)])
        parts.extend(table.column("key").chunks)
    if not parts:
        return 0, []
    counted = pc.value_counts(pa.chunked_array(parts, pa.string()))
    repeated = counted.filter(pc.greater(counted.field("counts"), 1)).field("values")
    return len(repeated), sorted(repeated.to_pylist())[:_MAX_DUPLICATE_EXAMPLES]


def duplicate_check_ranges(images: int) -> list[range]:
    """Bucket ranges for the duplicate-check tasks: enough tasks that none holds over KEYS_PER_CHECK keys."""
    tasks = min(KEY_BUCKETS, max(1, -(-images // KEYS_PER_CHECK)))
    edges = [round(i * KEY_BUCKETS / tasks) for i in range(tasks + 1)]
    return [range(low, high) for low, high in zip(edges[:-1], edges[1:])]


def raise_on_duplicates(count: int, examples: Sequence[str]) -> None:
    """Raises PlanError when `count` keys repeat across the inputs."""
    if not count:
        return
    shown = ", ".join(examples[:_MAX_DUPLICATE_EXAMPLES]) + (", ..." if count > _MAX_DUPLICATE_EXAMPLES else "")
    raise PlanError(
        f"{count} key(s) appear more than once across the inputs ({shown}); keys must be unique so each "
        "output row maps to one image: list the inputs in a manifest with a unique 'key' column, or drop overlapping inputs"
    )


def unify_schemas(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """The plan's listing schema: key and path first, then every manifest column, one type each for the whole output.

    A column null in one part of the inputs takes the type the others give it, integers widen to floats, and
    columns whose types widen to nothing common (a number in one manifest, text in another; or in two byte
    ranges of one CSV) become text. Every part file of the output then agrees.
    """
    schemas = list(schemas)
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fields: dict[str, pa.Field] = {}
        for schema in schemas:
            for field_ in schema:
                known = fields.get(field_.name)
                if known is None:
                    fields[field_.name] = field_
                    continue
                try:
                    fields[field_.name] = pa.unify_schemas([pa.schema([known]), pa.schema([field_])], promote_options="permissive")[0]
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    fields[field_.name] = pa.field(field_.name, pa.string())
        unified = pa.schema(list(fields.values()))
    rest = [f for f in unified if f.name not in ("key", "path")]
    return pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *rest])


def changed_manifests(plan: Plan, current: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One phrase per manifest whose size or version differs from when the plan listed it."""
    out = []
    for uri, now in current.items():
        then = plan.manifests.get(uri)
        if then is not None and dict(then) != dict(now):
            out.append(f"{uri} (size {then.get('size')} -> {now.get('size')})")
    return out


@dataclass
class PlanSummary:
    """What `lgca plan` prints."""

    output: str
    images: int
    shards: int
    skipped_count: int
    passes_per_image: int  # encoder passes of one image: 1 + N + K*T for lgca
    listing_seconds: float
    reused: bool = False
    examples: list[str] = field(default_factory=list)
    cascade_margin: float | None = None  # the confidence cascade's threshold: passes_per_image is then the most
    uncounted: int = 0  # tars among the shards: their images are counted as they are read

    def line(self) -> str:
        skipped = f", {self.skipped_count} non-image files skipped" if self.skipped_count else ""
        how = "reused" if self.reused else f"listed in {self.listing_seconds:.1f} s"
        if self.cascade_margin is not None:
            cost = (
                f"between {self.images:,} and {self.images * self.passes_per_image:,} encoder passes (cascade at margin "
                f"{self.cascade_margin:g}: 1 per image, {self.passes_per_image} for each image it escalates)"
            )
        else:
            cost = f"about {self.images * self.passes_per_image:,} encoder passes ({self.passes_per_image} per image)"
        if self.uncounted:
            known = f"{self.images} images in {self.shards - self.uncounted} shards, and {self.uncounted} tars counted as they are read"
            return f"lgca: plan of {self.output}: {known} ({how}){skipped}; {cost} for the counted images"
        return f"lgca: plan of {self.output}: {self.images} images in {self.shards} shards ({how}){skipped}; {cost}"


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    put_atomically(fs, path, sink.getvalue().to_pybytes())


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
