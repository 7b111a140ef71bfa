"""Tests of pipeline.stages.sources: listing, manifests, reading and options, on local disk and on moto's S3."""

from __future__ import annotations

import gzip
import io
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.credentials import mask_credentials
from pipeline.stages import manifests, storage
from pipeline.stages.listing import list_inputs
from pipeline.stages.plan import PlanError
from pipeline.stages.sources import InputSpec, check_inputs, parse_input
from pipeline.stages.storage import SourceError, filesystem_for, read_bytes, redact, storage_options_from

# key -> listed as an image (True), skipped and counted as a non-image file (False), or skipped as a marker (None)
TREE = {
    "a/x.jpg": True,
    "a/b/Y.JPG": True,  # upper-case extension
    "c.PNG": True,
    "d.webp": True,
    "sub dir/café ünï ñ.jpeg": True,  # spaces and non-ASCII
    "notes.txt": False,
    "_SUCCESS": None,  # the project's own markers are the only names skipped
    "_plan/shards.jpg": None,
    ".hidden.jpg": True,  # a file that looks like an image gets a row, whatever its name
    "_tmp/e.jpg": True,
    "_DSC0001.JPG": True,  # camera file names
    "_archive/p.jpg": True,
}
IMAGES = sorted(key for key, is_image in TREE.items() if is_image)


def _content(key: str) -> bytes:
    return f"bytes of {key}".encode()


def _make_tree(root: Path) -> Path:
    for key in TREE:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(key))
    return root


@dataclass
class Place:
    """An image tree at `root` (a local folder or s3://bucket/imgs) and a way to add files next to it."""

    root: str
    options: dict[str, Any]
    write: Callable[[str, bytes], None]  # (path relative to root, content)

    def uri(self, relative: str) -> str:
        return f"{self.root}/{relative}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    tree = _make_tree(tmp_path / "imgs")
    if request.param == "local":

        def write_local(relative: str, data: bytes) -> None:
            (tree / relative).parent.mkdir(parents=True, exist_ok=True)
            (tree / relative).write_bytes(data)

        return Place(str(tree), {}, write_local)
    server = request.getfixturevalue("s3_server")
    root = request.getfixturevalue("s3_bucket") + "/imgs"
    server.upload_tree(tree, root)
    bucket, _, prefix = root.removeprefix("s3://").partition("/")

    def write_s3(relative: str, data: bytes) -> None:
        server.client().put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=data)

    return Place(root, server.storage_options, write_s3)


def _list(place: Place, *inputs: str) -> Any:
    return list_inputs([parse_input(text) for text in inputs], place.options)


# parse_input


@pytest.mark.parametrize(
    "text, kind",
    [
        ("s3://bucket/prefix", "directory"),
        ("s3://bucket/prefix/", "directory"),
        ("s3://bucket", "directory"),
        ("s3://bucket/a/*.jpg", "glob"),
        ("s3://bucket/a/img?.png", "glob"),
        ("s3://bucket/a/[ab].png", "glob"),
        ("s3://bucket/one.JPEG", "file"),
        ("s3://bucket/list.parquet", "manifest"),
        ("s3://bucket/list.CSV", "manifest"),
        ("s3://bucket/list.csv.gz", "manifest"),
        ("some/folder", "directory"),
        ("some/*.jpg", "glob"),
        ("photo.tif", "file"),
    ],
)
def test_parse_input_kinds(text: str, kind: str) -> None:
    assert parse_input(text).kind == kind


def test_parse_input_makes_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_input("imgs/").uri == str(tmp_path / "imgs")
    assert parse_input(f"file://{tmp_path}/x.jpg") == InputSpec(str(tmp_path / "x.jpg"), "file")
    assert parse_input("s3://b/p/").uri == "s3://b/p/"  # remote URIs stay as given
    # An existing local name with brackets is that file, not a pattern.
    (tmp_path / "photo [1].jpg").write_bytes(b"x")
    assert parse_input("photo [1].jpg").kind == "file"
    with pytest.raises(SourceError, match="empty"):
        parse_input("  ")


# listing


def test_directory_lists_images_recursively_and_reports_skipped(place: Place) -> None:
    listing = _list(place, place.root)
    assert listing.table.column_names == ["key", "path"]
    assert listing.table.column("key").to_pylist() == IMAGES
    assert listing.table.column("path").to_pylist() == [place.uri(key) for key in IMAGES]
    skipped = {key for key, is_image in TREE.items() if is_image is False}
    assert listing.skipped_count == len(skipped)
    assert sorted(listing.skipped) == sorted(place.uri(key) for key in skipped)


def test_directory_with_trailing_slash_gives_same_keys(place: Place) -> None:
    assert _list(place, place.root + "/").table.equals(_list(place, place.root).table)


def test_hidden_root_folder_is_not_hidden(tmp_path: Path) -> None:
    # Only components below the input root count as hidden, so a tree under ~/.cache still lists.
    root = _make_tree(tmp_path / ".cache" / "_imgs")
    assert list_inputs([parse_input(str(root))], {}).table.column("key").to_pylist() == IMAGES


def test_s3_folder_markers_are_not_files(s3_server: Any, s3_bucket: str) -> None:
    client, bucket = s3_server.client(), s3_bucket.removeprefix("s3://")
    for key in ("imgs/", "imgs/a/", "imgs/a/x.jpg"):  # console-made "folders" are empty objects ending in /
        client.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else b"x")
    listing = list_inputs([parse_input(f"{s3_bucket}/imgs")], s3_server.storage_options)
    assert listing.table.column("key").to_pylist() == ["a/x.jpg"]
    assert listing.skipped_count == 0


def test_skipped_examples_are_capped_but_all_counted(place: Place) -> None:
    for i in range(30):
        place.write(f"junk/{i}.txt", b"x")
    listing = _list(place, place.root)
    assert listing.skipped_count == 30 + sum(is_image is False for is_image in TREE.values())
    assert len(listing.skipped) == 20


def test_keys_and_bytes_match_between_local_and_s3(tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    tree = _make_tree(tmp_path / "imgs")
    s3_server.upload_tree(tree, f"{s3_bucket}/imgs")
    local = list_inputs([parse_input(str(tree))], {})
    remote = list_inputs([parse_input(f"{s3_bucket}/imgs")], s3_server.storage_options)
    assert local.table.column("key").equals(remote.table.column("key"))
    for key, path in zip(*remote.table.select(["key", "path"]).to_pydict().values()):
        assert path == f"{s3_bucket}/imgs/{key}"
        assert read_bytes(path, s3_server.storage_options) == _content(key)
    for key, path in zip(*local.table.select(["key", "path"]).to_pydict().values()):
        assert read_bytes(path, {}) == _content(key)


@pytest.mark.parametrize(
    "pattern, files, keys",
    [
        # keys are relative to the folder before the first wildcard component
        ("a/*.jpg", ["a/x.jpg"], ["x.jpg"]),
        # a matched folder (a/b) contributes everything below it; markers (_plan/) are skipped
        ("*/*", ["_archive/p.jpg", "_tmp/e.jpg", "a/b/Y.JPG", "a/x.jpg", "sub dir/café ünï ñ.jpeg"], None),
        ("[ac]*", ["a/b/Y.JPG", "a/x.jpg", "c.PNG"], None),
        ("sub dir/caf?*", ["sub dir/café ünï ñ.jpeg"], ["café ünï ñ.jpeg"]),
    ],
)
def test_glob(place: Place, pattern: str, files: list[str], keys: list[str] | None) -> None:
    listing = _list(place, place.uri(pattern))
    assert listing.table.column("key").to_pylist() == (keys or files)
    assert listing.table.column("path").to_pylist() == [place.uri(name) for name in files]


def test_glob_matching_nothing_fails(place: Place) -> None:
    with pytest.raises(SourceError, match="matched no files"):
        _list(place, place.uri("*.gif"))


def test_folder_without_images_fails_naming_the_skipped(place: Place) -> None:
    place.write("texts/readme.md", b"x")
    with pytest.raises(SourceError, match=r"holds no images.*readme\.md"):
        _list(place, place.uri("texts"))


def test_single_file(place: Place) -> None:
    listing = _list(place, place.uri("sub dir/café ünï ñ.jpeg"))
    assert listing.table.to_pylist() == [{"key": "café ünï ñ.jpeg", "path": place.uri("sub dir/café ünï ñ.jpeg")}]


def test_duplicate_keys_across_inputs_fail(place: Place) -> None:
    place.write("copy/a/x.jpg", b"x")
    place.write("copy/c.PNG", b"x")
    with pytest.raises(PlanError, match=r"2 key\(s\).*a/x\.jpg, c\.PNG.*'key' column"):  # the one message for repeated keys
        _list(place, place.root, place.uri("copy"))


def test_several_inputs_are_merged_and_sorted(place: Place) -> None:
    listing = _list(place, place.uri("sub dir"), place.uri("*/x.jpg"), place.uri("d.webp"))
    assert listing.table.column("key").to_pylist() == ["a/x.jpg", "café ünï ñ.jpeg", "d.webp"]


# manifests

MANIFEST = pa.table(
    {
        "path": ["../a/x.jpg", "../sub dir/café ünï ñ.jpeg", "../notes.txt"],  # relative to the manifest's folder
        "caption": ["a cat", "ein Café", None],
        "weight": [0.5, 1.25, 2.0],
        "count": pa.array([1, 2, 3], pa.int64()),
    }
)


def _encode(table: pa.Table, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buffer)
        return buffer.getvalue()
    pa_csv.write_csv(table, buffer)
    return gzip.compress(buffer.getvalue()) if fmt == "csv.gz" else buffer.getvalue()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "csv.gz"])
def test_manifest_resolves_paths_and_keeps_columns(place: Place, fmt: str) -> None:
    place.write(f"lists/m.{fmt}", _encode(MANIFEST, fmt))
    listing = _list(place, place.uri(f"lists/m.{fmt}"))
    table = listing.table
    assert table.column_names == ["key", "path", "caption", "weight", "count"]
    # Sorted by key, the path as written; the non-image row is kept (decode reports it), not skipped.
    assert table.column("key").to_pylist() == ["../a/x.jpg", "../notes.txt", "../sub dir/café ünï ñ.jpeg"]
    assert table.column("path").to_pylist() == [place.uri(name) for name in ("a/x.jpg", "notes.txt", "sub dir/café ünï ñ.jpeg")]
    assert table.column("weight").to_pylist() == [0.5, 2.0, 1.25]
    assert table.schema.field("weight").type == pa.float64()
    assert table.schema.field("count").type == pa.int64()
    assert listing.skipped_count == 0
    assert read_bytes(table.column("path")[2].as_py(), place.options) == _content("sub dir/café ünï ñ.jpeg")


def test_manifest_key_column_and_absolute_uris(place: Place) -> None:
    manifest = pa.table({"key": ["007", "001"], "path": [place.uri("c.PNG"), place.uri("d.webp")]})
    place.write("lists/keys.csv", _encode(manifest, "csv"))
    table = _list(place, place.uri("lists/keys.csv")).table
    assert table.to_pylist() == [  # "007" stays a string key
        {"key": "001", "path": place.uri("d.webp")},
        {"key": "007", "path": place.uri("c.PNG")},
    ]


def test_manifest_and_directory_together(place: Place) -> None:
    manifest = pa.table({"key": ["m1"], "path": ["../c.PNG"], "caption": ["x"]})
    place.write("lists/m.parquet", _encode(manifest, "parquet"))
    table = _list(place, place.uri("a"), place.uri("lists/m.parquet")).table
    assert table.to_pylist() == [
        {"key": "b/Y.JPG", "path": place.uri("a/b/Y.JPG"), "caption": None},
        {"key": "m1", "path": place.uri("c.PNG"), "caption": "x"},
        {"key": "x.jpg", "path": place.uri("a/x.jpg"), "caption": None},
    ]


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"file": ["a.jpg"], "caption": ["x"]}), r"no 'path' column \(found: file, caption\)"),
        (pa.table({"path": ["a.jpg"], "label": ["cat"]}), r"column\(s\) label, which the output already uses; rename"),
        (pa.table({"path": ["a.jpg", ""]}), r"'path' is empty in rows \[1\]"),
        (pa.table({"path": ["a.jpg", "b.jpg"], "key": ["k", "k"]}), r"1 key\(s\) appear more than once across the inputs \(k\)"),
        (pa.table({"path": pa.array([], pa.string())}), "has no rows"),
    ],
)
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_manifest_errors(place: Place, table: pa.Table, message: str, fmt: str) -> None:
    place.write(f"bad.{fmt}", _encode(table, fmt))
    with pytest.raises(ConfigError, match=message):  # SourceError; PlanError for the repeated keys
        _list(place, place.uri(f"bad.{fmt}"))


def test_manifest_not_a_table(tmp_path: Path) -> None:
    (tmp_path / "m.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="could not be read"):
        list_inputs([parse_input(str(tmp_path / "m.parquet"))], {})


# check_inputs


def test_check_inputs_accepts_existing_inputs(place: Place) -> None:
    place.write("m.csv", b"path\na/x.jpg\n")
    specs = [parse_input(text) for text in (place.root, place.uri("a/*.jpg"), place.uri("c.PNG"), place.uri("m.csv"))]
    check_inputs(specs, place.options)


def test_check_inputs_missing_local(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"input {tmp_path}/nope does not exist; check the path"):
        check_inputs([parse_input(str(tmp_path / "nope"))], {})
    with pytest.raises(SourceError, match=f"the folder {tmp_path}/nope of glob .* does not exist"):
        check_inputs([parse_input(str(tmp_path / "nope" / "*.jpg"))], {})
    with pytest.raises(SourceError, match="does not exist"):
        check_inputs([parse_input(str(tmp_path / "m.parquet"))], {})
    with pytest.raises(SourceError, match="no inputs"):
        check_inputs([], {})


def test_check_inputs_missing_s3_prefix(s3_server: Any, s3_bucket: str) -> None:
    with pytest.raises(SourceError, match=f"input {s3_bucket}/nope does not exist"):
        check_inputs([parse_input(f"{s3_bucket}/nope")], s3_server.storage_options)


def test_check_inputs_rejected_credentials_fail_fast(s3_server: Any, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="imgs/x.jpg", Body=b"x")
    start = time.monotonic()
    with s3_server.enforce_auth(), pytest.raises(SourceError, match=r"denied.*credentials.*AWS_ACCESS_KEY_ID.*endpoint"):
        check_inputs([parse_input(f"{s3_bucket}/imgs")], s3_server.storage_options)
    assert time.monotonic() - start < 10


def test_check_inputs_missing_bucket_names_bucket_and_credentials(s3_server: Any) -> None:
    # A bucket these credentials cannot see is also what a wrong account looks like: same advice.
    with pytest.raises(SourceError, match=r"bucket no-such-bucket-x .*does not exist.*credentials.*endpoint_url"):
        check_inputs([parse_input("s3://no-such-bucket-x/imgs")], s3_server.storage_options)


def test_check_inputs_unreachable_endpoint_fails_fast(s3_server: Any) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {**s3_server.storage_options, "endpoint_url": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not reach .*credentials.*endpoint_url"):
        check_inputs([parse_input("s3://bucket/imgs")], options)
    assert time.monotonic() - start < 10


# read_bytes


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """Serves FILES, raising the queued errors first: a stand-in for a store with transient failures."""

    protocol = "flakytest"
    FILES: ClassVar[dict[str, bytes]] = {"bucket/img.jpg": b"pixels"}
    errors: ClassVar[list[BaseException]] = []
    calls: ClassVar[int] = 0

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        type(self).calls += 1
        if self.errors:
            raise self.errors.pop(0)
        if path not in self.FILES:
            raise FileNotFoundError(path)
        return self.FILES[path]


@pytest.fixture
def flaky() -> type[FlakyFileSystem]:
    fsspec.register_implementation(FlakyFileSystem.protocol, FlakyFileSystem, clobber=True)
    FlakyFileSystem.errors, FlakyFileSystem.calls = [], 0
    return FlakyFileSystem


class EndpointConnectionError(Exception):
    """Named like botocore's, which is not a builtin ConnectionError."""


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("reset"),
        TimeoutError("slow"),
        OSError("SlowDown: reduce your request rate"),
        OSError("HTTP 503"),
        EndpointConnectionError("x"),
    ],
)
def test_read_bytes_retries_transient_errors(flaky: type[FlakyFileSystem], error: BaseException) -> None:
    flaky.errors = [error, error]
    assert read_bytes("flakytest://bucket/img.jpg", {}, retries=3, backoff_s=0.001) == b"pixels"
    assert flaky.calls == 3


def test_read_bytes_gives_up_after_bounded_retries(flaky: type[FlakyFileSystem]) -> None:
    flaky.errors = [ConnectionError("first"), ConnectionError("second"), ConnectionError("third")]
    with pytest.raises(ConnectionError, match="second"):
        read_bytes("flakytest://bucket/img.jpg", {}, retries=1, backoff_s=0.001)
    assert flaky.calls == 2


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"), OSError("img_500.jpg is corrupt")])
def test_read_bytes_does_not_retry_permanent_errors(flaky: type[FlakyFileSystem], error: BaseException) -> None:
    flaky.errors = [error]
    with pytest.raises(type(error)):
        read_bytes("flakytest://bucket/img.jpg", {}, retries=3, backoff_s=0.001)
    assert flaky.calls == 1


def test_read_bytes_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "none.jpg"), {}, backoff_s=0.001)


def test_filesystem_for_passes_options_unchanged(flaky: type[FlakyFileSystem]) -> None:
    fs, path = filesystem_for("flakytest://bucket/img.jpg", {"endpoint_url": "http://x", "client_kwargs": {"a": 1}})
    assert path == "bucket/img.jpg"
    assert fs.storage_options == {"endpoint_url": "http://x", "client_kwargs": {"a": 1}}
    local, local_path = filesystem_for(os.sep + "tmp", {"key": "k"})  # remote options do not reach local disk
    assert local.storage_options == {} and local_path == "/tmp"


# storage options


def test_storage_options_from_parses_values_and_nesting() -> None:
    options = storage_options_from(
        [
            "endpoint_url=http://127.0.0.1:9000/?a=b",
            "anon=false",
            "use_ssl=TRUE",
            "max_concurrency=8",
            "client_kwargs.region_name=eu-west-1",
            "config_kwargs.retries.max_attempts=2",
            "config_kwargs.read_timeout=2.5",
            "version=007",
            "secret=0123",
            "key=42",
        ]
    )
    assert options == {
        "endpoint_url": "http://127.0.0.1:9000/?a=b",
        "anon": False,
        "use_ssl": True,
        "max_concurrency": 8,
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}, "read_timeout": 2.5},
        "version": "007",
        "secret": "0123",  # secrets stay strings
        "key": "42",
    }


@pytest.mark.parametrize("pairs", [["novalue"], ["=x"], ["a..b=1"], ["a=1", "a.b=2"], ["a.b=1", "a=2"]])
def test_storage_options_from_rejects_malformed(pairs: list[str]) -> None:
    with pytest.raises(SourceError, match="storage option"):
        storage_options_from(pairs)


def test_redact_hides_secrets() -> None:
    options = {
        "key": "AKIA",
        "secret": "s3cr3t",
        "token": "t",
        "password": "p",
        "aws_session_token": "x",
        "sse_kms_key_id": "arn",
        "endpoint_url": "http://user:pw@host:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "s"},
        "session_token": None,
    }
    assert redact(options) == {
        "key": "***",
        "secret": "***",
        "token": "***",
        "password": "***",
        "aws_session_token": "***",
        "sse_kms_key_id": "***",
        "endpoint_url": "http://***@host:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "***"},
        "session_token": None,  # unset stays visible as unset
    }
    assert options["key"] == "AKIA"  # the input is untouched


@pytest.mark.integration
def test_sources_imports_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = "import sys, pipeline.stages.sources; assert not {'torch', 'ray'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_manifest_paths_resolve_alike_in_bulk_and_one_at_a_time(tmp_path, where, request):
    # The listing takes a vectorised shortcut for paths that are final as written; every other form goes
    # through _resolve_manifest_path. Both must give what _resolve_manifest_path gives for every row.
    raws = [
        "/a/b.jpg", "/a//b.jpg", "/a/./b.jpg", "/a/../b.jpg", "/a/b/", "/a/.hidden.jpg", "/a/..b.jpg", "rel/x.jpg", "./x.jpg",
        "~/x.jpg", "file:///x/y.jpg", "local:///x/z.jpg", "s3://b/k@2x.jpg", "s3://user:pw@b/k.jpg", "http://h/x.jpg", "gs://b/c d.jpg",
    ]  # fmt: skip
    keys = [f"k{i:02d}" for i in range(len(raws))]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": keys, "path": raws}), manifest)
    options: dict[str, Any] = {}
    uri = str(manifest)
    if where == "s3":
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        options = s3_server.storage_options
        uri = f"{bucket}/lists/m.parquet"
        fsspec.filesystem("s3", **options).put(str(manifest), uri)
    spec = parse_input(uri)
    fs, path = storage.filesystem_for(spec.uri, options)
    local = where == "local"
    manifest_dir = os.path.dirname(path) if local else path.rsplit("/", 1)[0]
    expected = [manifests._resolve_manifest_path(mask_credentials(raw), fs, manifest_dir, local) for raw in raws]
    assert manifests.list_manifest(spec, options).column("path").to_pylist() == expected  # keys sort as the rows
