"""Inputs: INPUT arguments parsed into kinds (folder, glob, file, manifest, WebDataset tars; a manifest holding the
images becomes image bytes when its columns are read), and checked fast: missing or unreadable roots fail in seconds."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.credentials import REFUSED as CREDENTIALS_REFUSED
from pipeline.credentials import has_credentials, mask_credentials
from pipeline.stages.storage import (
    LOCAL_PROTOCOLS,
    S3_PROTOCOLS,
    RefusedInput,
    SourceError,
    check_scheme,
    filesystem_for,
    is_local,
    schemes_of,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".csv.gz")
INPUT_KINDS = ("directory", "glob", "file", "manifest", "image_bytes", "webdataset")  # image_bytes: Parquet holding the images
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")  # WebDataset shards
PROBED_TARS = 3  # tars named one by one (a brace range of 10^5) are checked here, the first few; the others when read

_WILDCARDS = ("*", "?", "[")
# The existence probe gives up quickly: a wrong endpoint or credentials must fail in seconds, not
# after botocore's and s3fs's retry loops (minutes against an unreachable host).
_PROBE_S3_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}}


@dataclass(frozen=True)
class InputSpec:
    """One INPUT argument, parsed."""

    uri: str  # as given; local paths made absolute
    kind: str  # directory | glob | file | manifest | image_bytes | webdataset
    image_column: str | None = None  # image_bytes: the column holding the images (`--image-column`), else detected

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise SourceError(f"input kind {self.kind!r} of {self.uri} is unknown; use one of {', '.join(INPUT_KINDS)}")


def parse_input(text: str) -> InputSpec:
    """Parse one INPUT string into an InputSpec.

    A path containing `*`, `?` or `[` is a glob (unless it exists locally as written); a path ending in
    .parquet/.csv/.csv.gz is a manifest (or, if its rows hold images, Parquet image bytes: decided from its
    columns when the job starts); .tar/.tar.gz/.tgz a WebDataset shard; one ending in an image extension, or an existing local file,
    is a single file; anything else (including s3://bucket/prefix, with or without a trailing slash)
    is a directory.

    Args:
        text: a local path (relative paths allowed), a URI such as s3://bucket/prefix, or a glob.

    Returns:
        The spec; local paths are made absolute, remote URIs are kept as given.

    Raises:
        SourceError: the input is empty.
    """
    text = text.strip()
    if not text:
        raise SourceError("an input is empty; pass a directory, glob, file, s3:// prefix or manifest")
    protocol, path = fsspec.core.split_protocol(text)
    local = protocol in LOCAL_PROTOCOLS
    if local:
        path = os.path.abspath(os.path.expanduser(path))
        uri = path
    else:
        uri = text
    name = path.rstrip("/").lower()
    # A local file literally named "photo [1].jpg" is a file, not a pattern.
    if any(c in path for c in _WILDCARDS) and not (local and os.path.exists(path)):
        kind = "webdataset" if name.endswith(TAR_EXTENSIONS) else "glob"  # `shards/*.tar`: tars, listed by name
    elif name.endswith(MANIFEST_EXTENSIONS):
        kind = "manifest"
    elif name.endswith(TAR_EXTENSIONS):
        kind = "webdataset"
    elif name.endswith(IMAGE_EXTENSIONS) or (local and os.path.isfile(path)):
        kind = "file"
    else:
        kind = "directory"
    return InputSpec(uri=uri, kind=kind)


def check_inputs(specs: Sequence[InputSpec], storage_options: Mapping[str, Any], allowed_schemes: Sequence[str] | None = None) -> None:
    """Fail fast if an input's root is missing or unreadable, before any work is scheduled.

    For a glob the folder before the first wildcard must exist; whether the pattern matches is
    checked by `list_inputs`. S3 probes use short timeouts and no retries, so wrong endpoints or
    credentials fail within seconds.

    Args:
        specs: parsed inputs.
        storage_options: fsspec options for remote inputs (endpoint_url, key, secret, ...).
        allowed_schemes: URL schemes inputs may use (DecodeConfig.allowed_schemes); None allows any.

    Raises:
        SourceError: no inputs; an input's URL scheme is not allowed or its URL carries a password; an input
            does not exist, is not readable, its bucket is missing, or its store rejects the credentials or
            cannot be reached. The message names the fix.
    """
    if not specs:
        raise SourceError("no inputs given; pass one or more directories, globs, files, s3:// prefixes or manifests")
    for spec in specs:
        if has_credentials(spec.uri):
            raise SourceError(f"input {mask_credentials(spec.uri)}: {CREDENTIALS_REFUSED}")
        try:
            check_scheme(spec.uri, allowed_schemes or schemes_of(spec.uri))
        except RefusedInput as error:
            raise SourceError(f"input {error}") from None
    tars = [spec for spec in specs if spec.kind == "webdataset"]
    for spec in [spec for spec in specs if spec.kind != "webdataset"] + tars[:PROBED_TARS]:
        if is_local(spec.uri):
            _check_local(spec)
        else:
            _check_remote(spec, storage_options)


def glob_root(path: str) -> str:
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _WILDCARDS))
    return "/".join(parts[:first])


def _is_pattern(spec: InputSpec) -> bool:
    return spec.kind == "glob" or (spec.kind == "webdataset" and any(c in spec.uri for c in _WILDCARDS))


def _check_local(spec: InputSpec) -> None:
    target = glob_root(spec.uri) if _is_pattern(spec) else spec.uri
    where = f"input {spec.uri}" if target == spec.uri else f"the folder {target} of glob {spec.uri}"
    if not os.path.exists(target):
        raise SourceError(f"{where} does not exist; check the path")
    is_dir = os.path.isdir(target)
    if spec.kind in ("directory", "glob") and not is_dir:
        raise SourceError(f"{where} is a file, not a folder; pass its folder or the file itself")
    if spec.kind in ("file", "manifest") and is_dir:
        raise SourceError(f"input {spec.uri} is a folder, not a file; check the path")
    if not os.access(target, os.R_OK | (os.X_OK if is_dir else 0)):
        raise SourceError(f"{where} is not readable by this user; check its permissions")


def _probe_filesystem(uri: str, storage_options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol not in S3_PROTOCOLS:
        return filesystem_for(uri, storage_options)
    options = dict(storage_options)
    options["config_kwargs"] = {**_PROBE_S3_CONFIG, **options.get("config_kwargs", {})}
    # A private instance: the fast-fail settings must not leak into the cached one used for reading.
    fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **options)
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs, path


def _check_remote(spec: InputSpec, storage_options: Mapping[str, Any]) -> None:
    fs, path = _probe_filesystem(spec.uri, storage_options)
    protocol = fsspec.core.split_protocol(spec.uri)[0]
    target = glob_root(path) if _is_pattern(spec) else path.rstrip("/")
    fix_access = (
        "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --storage-option key=... "
        "secret=...) and the endpoint (--storage-option endpoint_url=...)"
    )
    try:
        info = fs.info(target)
    except FileNotFoundError as error:
        bucket = target.split("/")[0]
        if protocol in S3_PROTOCOLS and not _bucket_exists(fs, bucket):
            raise SourceError(
                f"bucket {bucket} of input {spec.uri} does not exist or is not visible with these credentials; "
                f"check the bucket name, then {fix_access}"
            ) from error
        raise SourceError(f"input {spec.uri} does not exist; check the path") from error
    except PermissionError as error:
        raise SourceError(f"access to input {spec.uri} was denied ({error}); {fix_access}") from error
    except Exception as error:
        raise SourceError(f"could not reach the store of input {spec.uri} ({type(error).__name__}: {error}); {fix_access}") from error
    is_dir = info.get("type") == "directory"
    if spec.kind in ("file", "manifest") and is_dir:
        raise SourceError(f"input {spec.uri} is a folder, not a file; check the path")


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    try:
        return bool(fs.exists(bucket))
    except Exception:
        return False
