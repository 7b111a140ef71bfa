"""What listing works in: the units one task lists, and what listing them found. Data only, shared by the
listing of folders, globs and files (`listing`) and of manifests (`manifests`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.stages.sources import InputSpec

MAX_SKIPPED_EXAMPLES = 20  # skipped files a listing names; all are counted


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
    # an archive's unit: shards as (source, rows), read from the archive when labelled, never listed member by member
    sources: list[tuple[str, int]] = field(default_factory=list)
    estimate: int = 0  # images its uncounted sources likely hold (img2dataset's statistics), for progress only


@dataclass(frozen=True)
class Listing:
    """Every image found, one row each, plus the non-image files seen on the way."""

    table: pa.Table  # key (string), path (string, full URI; plain absolute path locally), manifest pass-through columns
    skipped: list[str] = field(default_factory=list)  # the first few skipped files, full URIs
    skipped_count: int = 0  # all skipped files
