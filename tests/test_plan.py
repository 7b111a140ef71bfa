"""The plan, shard commits and the output lease as stages: no Ray, real files (local and moto S3)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.schema import OK, output_schema
from pipeline.stages import files, listing, manifests, storage
from pipeline.stages.lease import LEASE, Lease, LeaseError
from pipeline.stages.lease_record import LeaseRecord
from pipeline.stages.listing import list_inputs, list_unit
from pipeline.stages.plan import (
    KEY_BUCKETS,
    ROW_COLUMN,
    Plan,
    PlanError,
    Shard,
    changed_manifests,
    changes,
    check_resumable,
    duplicate_check_ranges,
    duplicate_keys,
    fingerprint,
    keys_path,
    raise_on_duplicates,
    read_plan,
    read_shard,
    unify_schemas,
    write_keys,
    write_plan,
    write_shards,
)
from pipeline.stages.sink import SHARD_COLUMN, Output, OutputError, commit_shard, committed_counts, part_name, stage_pieces
from pipeline.stages.sources import parse_input
from pipeline.stages.storage import SourceError
from pipeline.stages.units import ListingUnit


def _fingerprint(**changed) -> dict:
    base = {
        "inputs": ["s3://b/images"],
        "vocabulary_digest": "v1",
        "scoring": {"method": "lgca", "crops": 60, "seed": 0},
        "model": {"name": "ViT-B-32", "weights_sha256": "aa"},
        "max_pixels": 10,
        "shard_size": 100,
    }
    base.update(changed)
    return fingerprint(**base)


def _listing(keys: list[str], extra: dict | None = None) -> pa.Table:
    columns = {"key": pa.array(keys, pa.string()), "path": pa.array([f"/images/{k}" for k in keys], pa.string())}
    columns.update(extra or {})
    return pa.table(columns)


# ---------------------------------------------------------------- the plan


def test_plan_round_trips_and_a_changed_configuration_is_named():
    plan = Plan(_fingerprint(), (Shard("u1-00000", 3), Shard("u1-00001", 2)), _listing([]).schema, 4, ("a.txt",), 1.5, "now")
    again = Plan.from_json(plan.to_json(), "here")
    assert again == plan and again.images == 5
    check_resumable(again, _fingerprint(shard_size=7), "out/")  # another shard size keeps the plan's shards
    with pytest.raises(PlanError) as error:
        check_resumable(again, _fingerprint(vocabulary_digest="v2", scoring={"method": "wca", "crops": 60, "seed": 0}), "out/")
    message = str(error.value)
    assert "vocabulary_sha256: 'v1' -> 'v2'" in message and "scoring.method: 'lgca' -> 'wca'" in message and "--overwrite" in message
    assert "crops" not in message  # only what changed
    assert changes(_fingerprint(), _fingerprint(model={"name": "ViT-B-32", "weights_sha256": "bb"})) == [
        "model.weights_sha256: 'aa' -> 'bb'"
    ]


def test_a_foreign_plan_is_refused_with_the_fix():
    with pytest.raises(PlanError, match="--overwrite"):
        Plan.from_json(json.dumps({"format": "something/9"}), "out/_plan/plan.json")


def test_shards_are_bounded_and_read_back_in_the_plan_schema_with_row_indices(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    table = _listing([f"k{i:02d}" for i in range(7)])
    shards = write_shards(fs, root, "unit", table, shard_size=3)
    assert [(s.id, s.rows) for s in shards] == [("unit-00000", 3), ("unit-00001", 3), ("unit-00002", 1)]
    # the plan's schema holds a manifest column this folder input lacks: it reads back as nulls
    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("source", pa.int64())])
    second = read_shard(fs, root, "unit-00001", schema)
    assert second.column("key").to_pylist() == ["k03", "k04", "k05"]
    assert second.column("source").to_pylist() == [None] * 3 and second.column(ROW_COLUMN).to_pylist() == [0, 1, 2]
    write_plan(fs, root, Plan(_fingerprint(), tuple(shards), schema))
    assert read_plan(fs, root, "x").shards == tuple(shards)
    # nothing the plan writes is a result to a reader globbing the output
    assert not glob.glob(f"{root}/**/*.parquet", recursive=True)


def test_manifest_columns_get_one_type_for_the_whole_output(tmp_path):
    # A column empty in one manifest takes the others' type; integers and floats widen to floats; each shard
    # reads back in that type, so every part file of the output agrees (pandas, DuckDB, Polars read them all).
    empty = _listing(["a"], {"note": pa.nulls(1), "weight": pa.array([1], pa.int64())})
    filled = _listing(["b"], {"note": pa.array([7], pa.int64()), "weight": pa.array([0.5], pa.float64())})
    schema = unify_schemas([empty.schema, filled.schema])
    assert schema.field("note").type == pa.int64() and schema.field("weight").type == pa.float64()
    fs = fsspec.filesystem("file")
    write_shards(fs, str(tmp_path), "empty", empty, shard_size=10)
    table = read_shard(fs, str(tmp_path), "empty-00000", schema)
    assert table.schema.field("note").type == pa.int64() and table.column("weight").to_pylist() == [1.0]
    # A number in one manifest and text in another: text, which every value casts to.
    mixed = unify_schemas([filled.schema, _listing(["c"], {"note": pa.array(["seven"])}).schema])
    assert mixed.field("note").type == pa.string()
    write_shards(fs, str(tmp_path), "filled", filled, shard_size=10)
    assert read_shard(fs, str(tmp_path), "filled-00000", mixed).column("note").to_pylist() == ["7"]


CSV_TEXT = (
    "path,key,note,weight\r\n"
    '/images/a.jpg,a,"one, with a comma",1\r\n'
    "/images/b.jpg,b,,2\r\n"
    '/images/c.jpg,c,"quoted ""twice""",3.5\n'
    "/images/d.jpg,d,plain,4\n"
    + "".join(f"/images/e{i:03d}.jpg,e{i:03d},row {i},{i}\n" for i in range(60))
    + "/images/z.jpg,z,last line without a newline,9"
)


@pytest.mark.parametrize("unit_bytes", [1, 7, 40, 64, 333, 10**6])
def test_a_csv_manifest_in_byte_ranges_lists_every_row_once(tmp_path, unit_bytes):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(CSV_TEXT.encode())
    spec = parse_input(str(manifest))
    whole = manifests.list_manifest(spec, {})
    units = listing.listing_units([spec], {}, csv_unit_bytes=unit_bytes)
    assert len(units) == (1 if unit_bytes >= len(CSV_TEXT) else -(-len(CSV_TEXT) // unit_bytes))
    assert len({unit.id for unit in units}) == len(units)
    parts = [list_unit(unit, {}).table for unit in units]
    schema = unify_schemas([part.schema for part in parts])
    joined = pa.concat_tables([part.select(schema.names).cast(schema) for part in parts if part.num_rows]).sort_by("key")
    assert joined.column("key").to_pylist() == whole.column("key").to_pylist()  # every row once, none cut
    assert joined.column("note").to_pylist() == whole.column("note").to_pylist()
    if len(units) > 1:  # in ranges, every column stays text as written: no range guesses a type for the others
        assert schema.field("weight").type == pa.string()
        assert joined.column("weight").to_pylist() == [line.rsplit(",", 1)[1] for line in sorted(CSV_TEXT.splitlines()[1:], key=_csv_key)]
    else:
        assert joined.column("weight").to_pylist() == whole.column("weight").to_pylist()


QUOTED_BREAKS = (
    "path,key,note\n"
    + "".join(f"/images/r{i:03d}.jpg,r{i:03d},plain {i}\n" for i in range(20))
    + '/images/q.jpg,q,"a note that runs\n/images/phantom.jpg,phantom,over\nthree lines"\n'
    + "".join(f"/images/s{i:03d}.jpg,s{i:03d},plain {i}\n" for i in range(20))
)


@pytest.mark.parametrize("unit_bytes", [16, 40, 97, 300, 10**6])
def test_a_quoted_line_break_across_a_range_edge_is_never_guessed(tmp_path, unit_bytes):
    """A quoted field holding line breaks, cut by a range's edge, once planned phantom rows (a continuation line
    naming `phantom.jpg`) and a truncated note; now the file is listed whole, exactly as a single read."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(QUOTED_BREAKS.encode())
    spec = parse_input(str(manifest))
    units = listing.listing_units([spec], {}, csv_unit_bytes=unit_bytes)
    first, last = QUOTED_BREAKS.index('"'), QUOTED_BREAKS.rindex('"')
    if any(first < unit.byte_range[0] <= last for unit in units if unit.byte_range):  # an edge inside the field
        assert any(list_unit(unit, {}).splits_record for unit in units)  # so some range's quotes do not pair up
    listed = list_inputs([spec], {}, csv_unit_bytes=unit_bytes).table
    keys = listed.column("key").to_pylist()
    assert len(keys) == 41 and "phantom" not in keys
    notes = dict(zip(keys, listed.column("note").to_pylist()))
    assert notes["q"] == "a note that runs\n/images/phantom.jpg,phantom,over\nthree lines"


def _csv_key(line: str) -> str:
    return line.split(",")[1]


def test_a_csv_without_line_feeds_is_one_unit(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(CSV_TEXT.replace("\r\n", "\r").replace("\n", "\r").encode())
    assert [unit.byte_range for unit in listing.listing_units([parse_input(str(manifest))], {}, csv_unit_bytes=40)] == [None]


def test_a_plan_records_its_manifests_and_names_the_ones_changed_since():
    plan = Plan(_fingerprint(), (), _listing([]).schema, manifests={"s3://b/m.csv": {"size": 10, "version": "e1"}})
    again = Plan.from_json(plan.to_json(), "here")
    assert again.manifests == plan.manifests
    assert changed_manifests(again, {"s3://b/m.csv": {"size": 10, "version": "e1"}}) == []
    assert changed_manifests(again, {"s3://b/m.csv": {"size": 14, "version": "e2"}}) == ["s3://b/m.csv (size 10 -> 14)"]


@pytest.mark.parametrize("place", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_duplicate_keys_are_found_across_units_by_bucket_without_one_process_holding_all_keys(place, tmp_path, request):
    if place == "s3":
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        fs, root = fsspec.filesystem("s3", **s3_server.storage_options), bucket.removeprefix("s3://")
    else:
        fs, root = fsspec.filesystem("file"), str(tmp_path)
    write_keys(fs, root, "one", pa.array([f"img-{i}" for i in range(500)]))
    write_keys(fs, root, "two", pa.array(["img-7", "img-499", "other", "img-7b"]))
    paths = [keys_path(root, "one"), keys_path(root, "two")]
    ranges = [range(0, 100), range(100, KEY_BUCKETS)]
    found = [duplicate_keys(fs, paths, r) for r in ranges]
    assert sum(count for count, _ in found) == 2
    assert sorted(name for _, names in found for name in names) == ["img-499", "img-7"]
    with pytest.raises(PlanError, match=r"2 key\(s\) appear more than once .*img-499, img-7"):
        raise_on_duplicates(2, ["img-499", "img-7"])
    # each check task holds at most KEYS_PER_CHECK keys: 10^8 keys take enough tasks, covering every bucket
    big = duplicate_check_ranges(10**8)
    assert len(big) == 20 and big[0].start == 0 and big[-1].stop == KEY_BUCKETS
    assert all(a.stop == b.start for a, b in zip(big, big[1:]))
    assert duplicate_check_ranges(10) == [range(0, KEY_BUCKETS)]


# ---------------------------------------------------------------- listing units


def test_listing_keeps_underscore_and_dot_names_follows_symlinks_once_and_skips_only_markers(tmp_path):
    root = tmp_path / "photos"
    for name in ("_DSC0001.JPG", "_archive/a.jpg", ".thumbs/b.jpg", "deep/1/2/3/4/c.png", "_SUCCESS", "_plan/x.jpg", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    (elsewhere / "inner" / "linked.jpg").write_bytes(b"x")
    os.symlink(elsewhere, root / "link")  # a symlinked folder is listed
    os.symlink(root, root / "deep" / "loop")  # a folder that is its own ancestor is entered once
    listing = list_inputs([parse_input(str(root))], {})
    keys = listing.table.column("key").to_pylist()
    assert keys == sorted(["_DSC0001.JPG", "_archive/a.jpg", ".thumbs/b.jpg", "deep/1/2/3/4/c.png", "link/inner/linked.jpg"])
    assert listing.skipped_count == 1  # notes.txt; the markers are not counted as anything


def _link_dag(top: Path, target_parent: Path, levels: int) -> Path:
    """`levels` folders under `target_parent`, each holding two links to the next; `top` holds two links to the
    first. Followed naively, the last folder's one image is reached 2 ** (levels + 1) times."""
    folders = [target_parent / f"f{i:02d}" for i in range(levels)]
    for folder in folders:
        folder.mkdir(parents=True)
    (folders[-1] / "only.jpg").write_bytes(b"x")
    for here, there in zip([top, *folders[:-1]], folders):
        for link in ("l1", "l2"):
            os.symlink(there, here / link)
    return folders[-1]


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_a_dag_of_folder_links_lists_each_real_folder_once(tmp_path, where):
    """14 levels with two links each to the next: one row, not 2 ** 15. A folder inside the input is listed at
    its real place (its real path is the key); one outside it through the first link that reaches it."""
    root = tmp_path / "photos"
    root.mkdir()
    _link_dag(root, root if where == "inside" else tmp_path / "elsewhere", 14)
    listing = list_inputs([parse_input(str(root))], {})
    keys = listing.table.column("key").to_pylist()
    assert len(keys) == 1
    if where == "inside":
        assert keys == ["f13/only.jpg"]
    else:
        assert keys[0].endswith("/only.jpg") and keys[0].startswith("l1/")


def test_names_that_are_not_utf8_are_counted_and_shown_and_a_too_long_path_is_named(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "fine.jpg").write_bytes(b"x")
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"x")  # a Latin-1 name, as old cameras and Windows shares write
    listing = list_inputs([parse_input(str(root))], {})
    assert listing.table.column("key").to_pylist() == ["fine.jpg"]
    assert listing.skipped_count == 1 and "caf\\xe9.jpg (name is not UTF-8" in listing.skipped[0]
    deep = root / "deep"
    deep.mkdir()
    os.chdir(deep)
    try:
        for _ in range(22):  # 22 levels of 200 characters: a path over PATH_MAX (4096)
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
    finally:
        os.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"cannot list folder .*File name too long.*shorten the path"):
        list_inputs([parse_input(str(root))], {})


def test_a_local_name_with_a_double_colon_is_one_file_not_a_chained_url(tmp_path):
    from pipeline.stages.storage import read_bytes

    (tmp_path / "red.jpg").write_bytes(b"red")
    (tmp_path / "red.jpg::blue.jpg").write_bytes(b"the file itself")
    keys = list_inputs([parse_input(str(tmp_path))], {}).table.column("path").to_pylist()
    assert str(tmp_path / "red.jpg::blue.jpg") in keys
    assert read_bytes(str(tmp_path / "red.jpg::blue.jpg"), {}) == b"the file itself"


def test_a_folder_that_cannot_be_listed_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jpg").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # root reads every folder, so the refusal the kernel gives other users is injected
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(files.os, "scandir", scandir)
    with pytest.raises(SourceError, match=r"cannot list folder .*locked .*Permission denied.*would be missing"):
        list_inputs([parse_input(str(tmp_path))], {})


def test_an_s3_prefix_lists_objects_under_empty_path_segments_at_every_depth(s3_server, s3_bucket):
    """`p//b.jpg` is an object like any other: S3 shows its empty segment as a sub-prefix named like its parent,
    which the fan-out levels once took for the parent's own marker and dropped without a count."""
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["a.jpg", "/b.jpg", "//e.jpg", "x/d.jpg", "x//c.jpg", "x/y//f.jpg", "x/y/z/w//g.jpg"]
    for key in keys:
        fs.pipe_file(f"{bucket}/p/{key}", key.encode())
    listing = list_inputs([parse_input(f"s3://{bucket}/p/")], s3_server.storage_options)
    assert sorted(listing.table.column("key").to_pylist()) == sorted(keys)
    from pipeline.stages.storage import read_bytes

    for key, path in zip(listing.table.column("key").to_pylist(), listing.table.column("path").to_pylist()):
        assert read_bytes(path, s3_server.storage_options) == key.encode()  # read literally: each its own object


def test_an_s3_prefix_fans_out_over_sub_prefixes(s3_server, s3_bucket, tmp_path):
    for group in range(6):
        for index in range(3):
            path = tmp_path / "tree" / f"g{group}" / f"sub{index % 2}" / f"{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    s3_server.upload_tree(tmp_path / "tree", f"{s3_bucket}/tree")
    spec = parse_input(f"{s3_bucket}/tree")
    fs, path = storage.filesystem_for(spec.uri, s3_server.storage_options)
    first = list_unit(ListingUnit(spec, root=path, prefix=path), s3_server.storage_options)
    assert first.table.num_rows == 0 and sorted(u.prefix.rsplit("/", 1)[-1] for u in first.more) == [f"g{i}" for i in range(6)]
    second = list_unit(first.more[0], s3_server.storage_options)
    assert len(second.more) == 2 and all(u.depth == 2 for u in second.more)
    listing = list_inputs([spec], s3_server.storage_options)
    assert listing.table.num_rows == 18 and listing.table.column("key").to_pylist()[0] == "g0/sub0/0.jpg"


# ---------------------------------------------------------------- commits


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> tuple[fsspec.AbstractFileSystem, str]:
    """An empty output folder on local disk, then on moto's S3: (filesystem, root)."""
    if request.param == "s3":
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        return fsspec.filesystem("s3", **s3_server.storage_options), bucket.removeprefix("s3://") + "/out"
    return fsspec.filesystem("file"), str(tmp_path / "out")


def _scored(shard: str, rows: range) -> pa.Table:
    """Scored rows as the scoring actors emit them: the output columns, plus the shard and row of each."""
    schema = output_schema(pa.schema([(ROW_COLUMN, pa.int32()), (SHARD_COLUMN, pa.string())]))
    records = [
        {
            **dict.fromkeys(schema.names),
            "key": f"{shard}-{i}",
            "path": f"/i/{shard}-{i}",
            "status": OK,
            "method": "clip",
            "model": "m",
            "pretrained": "random",
            "topk_labels": [],
            "topk_scores": [],
            "boxes": [],
            ROW_COLUMN: i,
            SHARD_COLUMN: shard,
        }
        for i in rows
    ]
    return pa.Table.from_pylist(records, schema=schema)


def test_a_shard_commits_once_its_pieces_cover_it_and_a_retried_batch_counts_once(store):
    fs, root = store
    schema = output_schema(None)
    mixed = pa.concat_tables([_scored("a", range(0, 3)), _scored("b", range(0, 2))])
    assert stage_pieces(fs, root, mixed).to_pylist() == [{"shard": "a", "rows": 3, "total": None}, {"shard": "b", "rows": 2, "total": None}]
    assert commit_shard(fs, root, "a", 5, schema) is None  # rows 3 and 4 are still missing: nothing is published
    assert not fs.exists(f"{root}/{part_name('a')}")
    stage_pieces(fs, root, _scored("a", range(2, 5)))  # a retried batch staged row 2 again
    assert commit_shard(fs, root, "a", 5, schema) == {OK: 5}
    with fs.open(f"{root}/{part_name('a')}", "rb") as handle:
        table = pq.read_table(handle)
    assert table.column("key").to_pylist() == [f"a-{i}" for i in range(5)] and table.column_names == schema.names
    assert commit_shard(fs, root, "a", 5, schema) == {OK: 5}  # a retried commit after publishing: same answer
    assert committed_counts(fs, root, ["a"]) == {OK: 5}
    if isinstance(fs, LocalFileSystem):  # the staged pieces of b are never a result to a glob
        assert glob.glob(f"{root}/**/*.parquet", recursive=True) == [f"{root}/{part_name('a')}"]
    else:
        assert fs.glob(f"{root}/**/*.parquet") == [f"{root}/{part_name('a')}"]


def test_a_commit_merges_only_its_runs_pieces_and_publishes_only_under_its_lease(store):
    """A stalled earlier owner's tasks still staging pieces cannot mix rows into this run's shards, and a commit
    of a job whose lease was taken over publishes nothing."""
    fs, root = store
    schema = output_schema(None)
    with Lease(fs, root, "out/") as lease:
        stage_pieces(fs, root, _scored("a", range(0, 3)), run_id="old-run")  # the old owner's pieces
        stage_pieces(fs, root, _scored("a", range(0, 2)), run_id="this-run")
        assert commit_shard(fs, root, "a", 3, schema, "this-run", lease.owner) is None  # row 2 is missing from this run
        stage_pieces(fs, root, _scored("a", range(2, 3)), run_id="this-run")
        with pytest.raises(LeaseError, match="no longer names this job"):
            commit_shard(fs, root, "a", 3, schema, "this-run", "another-owner")
        assert not fs.exists(f"{root}/{part_name('a')}")
        assert commit_shard(fs, root, "a", 3, schema, "this-run", lease.owner) == {OK: 3}


@pytest.mark.integration
def test_overwrite_removes_the_markers_before_the_results(tmp_path):
    """A kill during --overwrite leaves an incomplete-looking output, never `_SUCCESS` over missing part files."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("_SUCCESS", "_manifest.json", part_name("x-00000"), part_name("x-00001")):
        (out / name).write_bytes(b"{}")
    code = f"from pipeline.stages.sink import Output; Output.open({str(out)!r}, {{}}, 'overwrite').clear()"
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LGCA_FAULT_POINT": "clearing"}, timeout=60)
    assert killed.returncode == -9
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [part_name("x-00000"), part_name("x-00001")]


def test_output_modes(tmp_path):
    out = tmp_path / "out"
    Output.open(str(out), {}, "new")
    (out / "_plan").mkdir()
    with pytest.raises(OutputError, match="--resume to finish it or --overwrite"):
        Output.open(str(out), {}, "new")
    output = Output.open(str(out), {}, "overwrite")
    (out / part_name("x-00000")).write_bytes(b"")
    assert output.committed() == {"x-00000"}
    output.clear()
    assert output.committed() == set() and not (out / "_plan").exists()


# ---------------------------------------------------------------- the lease


def test_one_writer_per_output(store):
    fs, root = store
    first = Lease(fs, root, "out/", heartbeat_s=0.2)
    first.acquire()
    with pytest.raises(LeaseError, match=r"being written by another job \(host .*wait for it to end or stop it"):
        Lease(fs, root, "out/").acquire()
    time.sleep(0.6)
    held = LeaseRecord.parse(fs.cat_file(f"{root}/{LEASE}").decode())
    assert held.owner == first.owner and held.heartbeat_at > held.started_at  # the heartbeat keeps it fresh
    first.release()
    assert not fs.exists(f"{root}/{LEASE}")
    with Lease(fs, root, "out/") as second:  # released: the next job takes it
        assert LeaseRecord.parse(fs.cat_file(f"{root}/{LEASE}").decode()).owner == second.owner


def test_a_shard_feed_hands_out_shards_as_they_are_listed_and_raises_the_listings_error():
    import math
    import threading

    from pipeline.run.listing_tasks import ShardFeed

    gate = threading.Event()

    def listing(on_shards):  # a listing that has written its first unit's shard and waits on a slow one
        on_shards([Shard("u1-00000", 2)])
        gate.wait(10)
        on_shards([Shard("u2-00000", 3), Shard("u2-00001", 1)])
        return Plan(_fingerprint(), (Shard("u1-00000", 2), Shard("u2-00000", 3), Shard("u2-00001", 1)), _listing([]).schema)

    feed = ShardFeed(listing)
    assert [s.id for s in feed.take(head_start_s=0)] == ["u1-00000"] and feed.listing and feed.listed() == (2, 1)
    gate.set()
    later = feed.take(head_start_s=0)
    assert [s.id for s in later + feed.take(head_start_s=0)] == ["u2-00000", "u2-00001"]
    assert feed.take(head_start_s=0) == [] and not feed.listing and feed.plan().images == 6

    # A long head start (or none: a CSV manifest's types wait for the whole listing) takes everything at the end.
    gate.clear()
    feed = ShardFeed(listing)
    threading.Timer(0.3, gate.set).start()
    assert [s.id for s in feed.take(head_start_s=math.inf)] == ["u1-00000", "u2-00000", "u2-00001"]

    def repeated_keys(on_shards):
        on_shards([Shard("u1-00000", 2)])
        raise PlanError("1 key(s) appear more than once across the inputs (a.jpg)")

    feed = ShardFeed(repeated_keys)
    with pytest.raises(PlanError, match="appear more than once"):
        feed.take(head_start_s=math.inf)
    with pytest.raises(PlanError):
        feed.check()


def _reference_bucket(key: str) -> int:
    """bucket_of for one key, in plain Python integers: the polynomial over its UTF-8 bytes, then splitmix64's finaliser."""
    from pipeline.stages.plan import _HASH_BASE, KEY_BUCKETS

    data = key.encode("utf-8")
    mask = (1 << 64) - 1
    value = (len(data) + sum(byte * pow(_HASH_BASE, j, 1 << 64) for j, byte in enumerate(data))) & mask
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
    return (value ^ (value >> 31)) % KEY_BUCKETS


def test_key_buckets_match_a_plain_reference_and_spread_evenly():
    from pipeline.stages.plan import KEY_BUCKETS, bucket_of

    keys = ["", "a", "é", "photos/cat.jpg", "x" * 300, *(f"img-{i:06d}.jpg" for i in range(2000))]
    got = bucket_of(pa.array(keys)).to_pylist()
    assert got == [_reference_bucket(k) for k in keys]
    assert bucket_of(pa.chunked_array([pa.array(keys[:7]), pa.array(keys[7:20])])).to_pylist() == got[:20]  # chunks and slices alike
    assert bucket_of(pa.array(keys).slice(5, 9)).to_pylist() == got[5:14]
    spread = np.bincount(bucket_of(pa.array([f"k{i}" for i in range(256 * 200)])).to_numpy(), minlength=KEY_BUCKETS)
    assert spread.min() > 120 and spread.max() < 290  # about 200 a bucket


def test_a_stopped_shard_feed_ends_its_listing_before_the_plan():
    import threading

    from pipeline.run.listing_tasks import ListingStopped, ShardFeed

    written = []
    more = threading.Event()

    def listing(on_shards):
        on_shards([Shard("u1-00000", 2)])
        more.wait(10)
        on_shards([Shard("u2-00000", 1)])  # the next unit listed: where a stopped listing ends
        written.append("plan.json")
        return Plan(_fingerprint(), (Shard("u1-00000", 2), Shard("u2-00000", 1)), _listing([]).schema)

    feed = ShardFeed(listing)
    assert [s.id for s in feed.take(head_start_s=0)] == ["u1-00000"]
    threading.Timer(0.2, more.set).start()
    feed.stop(timeout_s=10)
    assert not feed.listing and written == []
    with pytest.raises(ListingStopped):
        feed.plan()


def test_the_plan_line_gives_the_cascade_its_range_of_encoder_passes():
    from pipeline.stages.plan import PlanSummary

    plain = PlanSummary(output="out/", images=1000, shards=2, skipped_count=0, passes_per_image=67, listing_seconds=1.0)
    assert "about 67,000 encoder passes (67 per image)" in plain.line()
    cascade = PlanSummary(
        output="out/", images=1000, shards=2, skipped_count=0, passes_per_image=67, listing_seconds=1.0, cascade_margin=0.3
    )
    assert "between 1,000 and 67,000 encoder passes (cascade at margin 0.3" in cascade.line()
