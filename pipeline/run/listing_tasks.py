"""Building a job's plan on the cluster: listing units in parallel tasks, shards written by them, keys checked in buckets.

The driver holds listing units (folders still to list, manifest row-group ranges) and shard records, never
rows or file names: every task writes its own shards and returns their ids and sizes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import pyarrow as pa

from pipeline.config import ConfigError
from pipeline.stages.files import distinct_units
from pipeline.stages.image_bytes import archive_shard_id, cut_sources
from pipeline.stages.listing import FORMATS, MAX_SKIPPED_EXAMPLES, UnitTally, list_unit, listing_units
from pipeline.stages.manifests import ManifestHeader
from pipeline.stages.plan import (
    Plan,
    PlanError,
    Shard,
    duplicate_check_ranges,
    duplicate_keys,
    keys_path,
    raise_on_duplicates,
    shard_path,
    unify_schemas,
    write_keys,
    write_plan,
    write_shards,
)
from pipeline.stages.sources import InputSpec
from pipeline.stages.units import ListingUnit
from pipeline.stages.webdataset import COLUMNS as WEBDATASET_COLUMNS
from pipeline.stages.webdataset import is_named_tar, tar_source

log = logging.getLogger(__name__)

LISTING_TASKS_IN_FLIGHT = 64  # concurrent listing calls: enough to hide object-store latency, few enough to stay polite
LISTING_TASK_CPUS = 0.25  # listing waits on the store, not the CPU


@dataclass(frozen=True)
class ListedUnit:
    """What one listing task reports back: shard records, not rows."""

    unit_id: str
    input_uri: str
    shards: list[Shard]
    schema: pa.Schema
    more: list[ListingUnit]
    skipped: list[str] = field(default_factory=list)
    skipped_count: int = 0
    keys_written: bool = False
    splits_record: bool = False  # a CSV byte range whose quotes do not pair up (`UnitListing.splits_record`)
    estimate: int = 0  # images its tars likely hold (`UnitListing.estimate`)


def build_plan(
    specs: Sequence[InputSpec],
    output: str,
    storage_options: Mapping[str, Any],
    shard_size: int,
    fingerprint: Mapping[str, Any],
    created_at: str,
    on_progress: Any = None,
    manifests: Mapping[str, ManifestHeader] | None = None,
    on_shards: Callable[[list[Shard]], None] | None = None,
    schema: pa.Schema | None = None,
) -> Plan:
    """List every input on the cluster, cut it into shards under `<output>/_plan/`, check keys, write plan.json.

    Args:
        on_progress: called with (units listed, images found) as listing goes on.
        manifests: each manifest as the job read it before listing (`manifests.read_manifest_header`): its
            footer is not read again, and its version is recorded in the plan.
        on_shards: called with each listing task's shards as soon as they are written (labelling may start).
        schema: the listing schema known before listing (`listing.known_schema`); the plan keeps it.

    Raises:
        SourceError: an input holds no images, a folder cannot be listed, a manifest is unusable.
        PlanError: two rows share a key; manifests disagree on a column's type.
    """
    import ray

    started = time.time()
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    check_keys = len(specs) > 1 or any(spec.kind == "manifest" for spec in specs)  # one folder, glob or file has unique keys
    pending = listing_units(specs, storage_options, headers=manifests)
    named_tars = [unit for unit in pending if is_named_tar(unit.spec)]  # 10^5 of them: shards made here, no task each
    webdataset_schema = pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *WEBDATASET_COLUMNS])
    pending = [unit for unit in pending if not is_named_tar(unit.spec)]
    list_task = ray.remote(num_cpus=LISTING_TASK_CPUS, max_retries=3)(_list_unit_task)
    in_flight: dict[Any, ListingUnit] = {}
    shards: list[Shard] = []
    schemas: list[pa.Schema] = []
    tallies: dict[str, UnitTally] = {}
    key_units: list[str] = []
    folders: set[tuple[int, int]] = set()  # local folders listed (device, inode): each once, whatever links reach it
    # CSV manifests listed in byte ranges: a file's ranges are held until all are listed, then taken, or, if one
    # split a quoted record, dropped (their shards deleted) and the file listed whole
    ranges_left: dict[str, int] = {}
    for unit in pending:
        if unit.byte_range is not None:
            ranges_left[unit.spec.uri] = ranges_left.get(unit.spec.uri, 0) + 1
    held: dict[str, list[ListedUnit]] = {}
    whole: set[str] = set()
    listed = 0

    estimate = 0

    def take(result: ListedUnit) -> None:
        nonlocal listed, estimate
        estimate += result.estimate
        pending.extend(distinct_units(result.more, folders))
        shards.extend(result.shards)
        if on_shards is not None and result.shards:
            on_shards(result.shards)
        schemas.append(result.schema)
        images = sum(shard.rows for shard in result.shards if shard.rows >= 0)
        archives = sum(1 for shard in result.shards if shard.rows < 0)
        tallies.setdefault(result.input_uri, UnitTally()).add(images, result.skipped, result.skipped_count, archives)
        if result.keys_written:
            key_units.append(result.unit_id)
        listed += 1
        if on_progress is not None:
            on_progress(listed, sum(t.images for t in tallies.values()))

    for unit in named_tars:
        source, rows = tar_source(unit.spec.uri)
        take(ListedUnit(unit.id, unit.spec.uri, [Shard(archive_shard_id(source, unit.id, 0), rows, source)], webdataset_schema, []))
    while pending or in_flight:
        while pending and len(in_flight) < LISTING_TASKS_IN_FLIGHT:
            unit = pending.pop()
            in_flight[list_task.remote(unit, output, dict(storage_options), shard_size, check_keys)] = unit
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            unit = in_flight.pop(ref)
            result: ListedUnit = unwrap(ray, ref)
            if unit.byte_range is None:
                take(result)
                continue
            uri = unit.spec.uri
            if uri in whole:
                _drop(fs, root, [result])
                continue
            if result.splits_record:
                log.warning("manifest %s has a quoted field with a line break across a byte range's edge: listing it whole", uri)
                whole.add(uri)
                _drop(fs, root, held.pop(uri, []))
                pending.append(replace(unit, byte_range=None))
                continue
            held.setdefault(uri, []).append(result)
            ranges_left[uri] -= 1
            if ranges_left[uri] == 0:
                for each in held.pop(uri):
                    take(each)
    for spec in specs:
        tallies.get(spec.uri, UnitTally()).check(spec)
    images = sum(shard.rows for shard in shards if shard.rows >= 0)
    if check_keys and images:
        check_task = ray.remote(num_cpus=LISTING_TASK_CPUS, max_retries=3)(_duplicates_task)
        paths = [keys_path(root, unit_id) for unit_id in key_units]
        found = [
            unwrap(ray, ref) for ref in [check_task.remote(output, dict(storage_options), paths, r) for r in duplicate_check_ranges(images)]
        ]
        examples = sorted(name for _, names in found for name in names)
        raise_on_duplicates(sum(count for count, _ in found), examples)
    _refuse_archives_of_one_name(shards)
    skipped = [name for tally in tallies.values() for name in tally.skipped][:MAX_SKIPPED_EXAMPLES]
    plan = Plan(
        fingerprint=dict(fingerprint),
        shards=tuple(sorted(shards, key=lambda shard: shard.id)),
        schema=schema if schema is not None else unify_schemas(schemas),
        skipped_count=sum(tally.skipped_count for tally in tallies.values()),
        skipped=tuple(skipped),
        listing_seconds=time.time() - started,
        created_at=created_at,
        manifests={uri: dict(header.version) for uri, header in (manifests or {}).items()},
        estimated_images=estimate,
    )
    write_plan(fs, root, plan)
    return plan


def _refuse_archives_of_one_name(shards: Sequence[Shard]) -> None:
    """Archives' rows are keyed by the archive's name (`00000.tar/<key>`): two archives of one name in different
    places would repeat keys, so they are refused, naming them (inputs, not rows, can be told apart)."""
    places: dict[str, set[str]] = {}
    for shard in shards:
        if shard.source:
            uri = json.loads(shard.source)["uri"]
            places.setdefault(uri.rstrip("/").rsplit("/", 1)[-1], set()).add(uri)
    repeated = sorted((name, sorted(uris)) for name, uris in places.items() if len(uris) > 1)
    if repeated:
        name, uris = repeated[0]
        raise PlanError(
            f"{len(repeated)} archive name(s) appear in more than one place (e.g. {name}: {', '.join(uris[:2])}); rows are "
            "keyed by the archive's name, so label each collection with its own job (another --output)"
        )


def _drop(fs: fsspec.AbstractFileSystem, root: str, results: Sequence[ListedUnit]) -> None:
    """Delete the shard and key files that listing tasks wrote for units whose listing is discarded."""
    for result in results:
        for shard in result.shards:
            fs.rm(shard_path(root, shard.id))
        if result.keys_written:
            fs.rm(keys_path(root, result.unit_id))


def _list_unit_task(unit: ListingUnit, output: str, storage_options: dict[str, Any], shard_size: int, check_keys: bool) -> ListedUnit:
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    listed = list_unit(unit, storage_options)
    table = listed.table.sort_by("key")
    schema = table.schema
    if listed.sources:  # an archive's samples stay where they are: shards say where, and nothing is written
        schema = FORMATS[unit.spec.kind].schema(unit.spec, storage_options) or schema  # its columns, though none is listed
        shards = [
            Shard(archive_shard_id(source, unit.id, index), rows, source)
            for index, (source, rows) in enumerate(cut_sources(listed.sources, shard_size))
        ]
        check_keys = False
    else:
        shards = write_shards(fs, root, unit.id, table, shard_size)
    if check_keys and table.num_rows:
        write_keys(fs, root, unit.id, table.column("key"))
    return ListedUnit(
        unit_id=unit.id,
        input_uri=unit.spec.uri,
        shards=shards,
        schema=schema,
        more=listed.more,
        skipped=listed.skipped,
        skipped_count=listed.skipped_count,
        keys_written=check_keys and table.num_rows > 0,
        splits_record=listed.splits_record,
        estimate=listed.estimate,
    )


def _duplicates_task(output: str, storage_options: dict[str, Any], paths: list[str], buckets: range) -> tuple[int, list[str]]:
    fs, _ = fsspec.core.url_to_fs(output, **storage_options)
    return duplicate_keys(fs, paths, buckets)


def unwrap(ray: Any, ref: Any) -> Any:
    """The task's result; a configuration error raised in a task is raised here as itself (exit 2, its message)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


class ListingStopped(Exception):
    """Raised inside a listing that `ShardFeed.stop` ends."""


class ShardFeed:
    """A plan listed in a background thread, its shards handed out as the listing writes them.

    Labelling can start on the first shards while the listing goes on. The listing's errors (a folder that
    cannot be listed, keys repeated across inputs, found only once every key is listed) reach the labelling
    through `check()` and `plan()`.
    """

    def __init__(self, build: Callable[..., Plan]) -> None:
        self._lock = threading.Condition()
        self._stopping = False
        self._new: list[Shard] = []
        self._listed_images = 0
        self._listed_shards = 0
        self._plan: Plan | None = None
        self._error: BaseException | None = None
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, args=(build,), name="lgca-listing", daemon=True)
        self._thread.start()

    def _run(self, build: Callable[..., Plan]) -> None:
        try:
            plan = build(on_shards=self._add)
        except BaseException as error:  # handed to the labelling thread, which raises it
            with self._lock:
                self._error = error
                self._lock.notify_all()
            return
        with self._lock:
            self._plan = plan
            self._lock.notify_all()

    def _add(self, shards: list[Shard]) -> None:
        with self._lock:
            if self._stopping:  # the labelling failed: end the listing here, before it writes a plan
                raise ListingStopped("the job stopped while listing")
            self._new.extend(shards)
            self._listed_images += sum(shard.rows for shard in shards if shard.rows >= 0)
            self._listed_shards += len(shards)
            self._lock.notify_all()

    @property
    def listing(self) -> bool:
        """The listing still runs."""
        with self._lock:
            return self._plan is None and self._error is None

    def listed(self) -> tuple[int, int]:
        """Images and shards listed so far."""
        with self._lock:
            return self._listed_images, self._listed_shards

    def take(self, head_start_s: float) -> list[Shard]:
        """The shards listed since the last call, once there are some; [] once the listing has ended and all are taken.

        Waits for the listing to end, or to have run `head_start_s` with at least one shard listed: a listing
        of a few seconds is labelled in one go, a long one as it goes.

        Raises:
            the listing's error, if it failed.
        """
        with self._lock:
            while True:
                if self._error is not None:
                    raise self._error
                ended = self._plan is not None
                head_start_over = time.time() - self.started >= head_start_s
                if ended or (head_start_over and self._new):
                    taken, self._new = self._new, []
                    return taken
                # woken by each listed unit; at most a second, so the head start's end is noticed too
                self._lock.wait(timeout=1.0 if head_start_over else min(1.0, max(0.05, self.started + head_start_s - time.time())))

    def check(self) -> None:
        """Raise the listing's error, if it failed (called while labelling goes on)."""
        with self._lock:
            if self._error is not None:
                raise self._error

    def stop(self, timeout_s: float = 60.0) -> None:
        """End a listing still going (after a labelling failure): it stops at its next listed unit, writing no
        plan; wait up to `timeout_s` so nothing is written once the job has let go of the output."""
        with self._lock:
            self._stopping = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning("the listing did not stop within %.0f s of the job failing", timeout_s)

    def plan(self) -> Plan:
        """The whole plan, once the listing ends (plan.json written).

        Raises:
            the listing's error, if it failed.
        """
        self._thread.join()
        self.check()
        assert self._plan is not None
        return self._plan
