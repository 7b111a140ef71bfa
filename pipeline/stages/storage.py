"""Storage: filesystems and their options, URL schemes, reads bounded in size, time and retries, atomic writes,
and storage options shown with their secrets masked."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.credentials import MASK, has_credentials, is_secret_option, mask_credentials
from pipeline.credentials import REFUSED as CREDENTIALS_REFUSED

LOCAL_PROTOCOLS = (None, "file", "local")
S3_PROTOCOLS = ("s3", "s3a")

# Messages of transient storage errors worth another attempt: S3 5xx and throttling codes, socket trouble.
_TRANSIENT_MESSAGE = re.compile(
    r"slow ?down|throttl|reduce your request rate|request ?timeout|internal ?error|service ?unavailable"
    r"|\b50[0234]\b|timed out|connection (reset|aborted|closed)|broken pipe|temporar",
    re.IGNORECASE,
)


class SourceError(ConfigError):
    """An input cannot be used as given; the message names the input and the fix."""


class RefusedInput(OSError):
    """An input that is not read: larger than the byte limit, not a regular file (a FIFO, a device), a URL
    scheme not allowed, or a URL that carries credentials."""


def filesystem_for(uri: str, storage_options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri`, and the path within it.

    Args:
        uri: a local path or a URI (s3://bucket/key, memory://..., chained URLs). An absolute local path is
            taken literally: `/data/red.jpg::blue.jpg` is one file, never a chained URL (a chain starts with
            a protocol, never with `/`).
        storage_options: passed unchanged to the remote filesystem's constructor; ignored for local
            paths, since they hold settings for the remote store (s3 keys would mean nothing there).

    Returns:
        (filesystem, path without protocol), e.g. (S3FileSystem, "bucket/key").
    """
    if uri.startswith("/"):
        return fsspec.filesystem("file"), uri
    protocol, _ = fsspec.core.split_protocol(uri)
    options = {} if protocol in LOCAL_PROTOCOLS else dict(storage_options)
    return fsspec.core.url_to_fs(uri, **options)


def read_bytes(
    path: str, storage_options: Mapping[str, Any], max_bytes: int | None = None, retries: int = 3, backoff_s: float = 0.2
) -> bytes:
    """The bytes of one file, at most `max_bytes` of them, retrying transient storage errors.

    Local files are opened without blocking and must be regular files: a FIFO would wait forever for a
    writer, and a symlink to /dev/zero would never end. A local file's size is checked before reading; a
    remote object is fetched with a ranged request for one byte more than the limit, so memory stays bounded
    whatever the object's size.

    Args:
        path: a full URI or local path, as in a listing's `path` column.
        storage_options: fsspec options for remote paths.
        max_bytes: refuse larger files; None reads any size.
        retries: extra attempts after the first for transient errors (connection, timeout, a body cut
            short, 5xx, throttling); missing files, denied access and refused files are not retried.
        backoff_s: wait before the first retry; doubles each retry.

    Returns:
        The file's content.

    Raises:
        RefusedInput: larger than `max_bytes`, or not a regular file.
        FileNotFoundError, PermissionError, or the last transient error once the retries are spent.
    """
    fs, fs_path = filesystem_for(path, storage_options)
    attempt = 0
    while True:
        try:
            if isinstance(fs, LocalFileSystem):
                return _read_local(fs_path, max_bytes)
            return _read_remote(fs, fs_path, max_bytes)
        except Exception as error:
            if attempt >= retries or not _is_transient(error):
                raise
        time.sleep(backoff_s * 2**attempt)
        attempt += 1


def read_all(paths: Sequence[str], read: Callable[[str], bytes], threads: int, timeout_s: float) -> list[bytes | Exception]:
    """`read(path)` for every path, `threads` at a time; each result is the bytes or the exception raised.

    A read still running after `timeout_s` is given up: its result is a TimeoutError, and its thread (a
    daemon, which cannot be interrupted) is left behind while another thread takes its place. A stuck
    network mount or a store that trickles bytes costs one thread, not the batch.
    """
    results: list[bytes | Exception | None] = [None] * len(paths)
    started: dict[int, float] = {}  # reads running now: index -> start time
    done = threading.Condition()

    def run(index: int) -> None:
        try:
            value: bytes | Exception = read(paths[index])
        except Exception as error:  # reported in the row, never raised
            value = error
        with done:
            if index in started:  # not given up meanwhile
                results[index] = value
                del started[index]
            done.notify()

    waiting = iter(range(len(paths)))
    with done:
        while True:
            while len(started) < threads and (index := next(waiting, None)) is not None:
                started[index] = time.monotonic()
                threading.Thread(target=run, args=(index,), daemon=True, name=f"read-{index}").start()
            if not started:
                break
            now = time.monotonic()
            for index, since in list(started.items()):
                if now - since >= timeout_s:
                    results[index] = TimeoutError(f"the read did not finish within {timeout_s:g} s; raise --read-timeout for slow stores")
                    del started[index]
            if started:
                done.wait(timeout=max(0.01, min(since + timeout_s for since in started.values()) - now))
    return [result if result is not None else TimeoutError("not read") for result in results]


def _read_local(path: str, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any special file.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedInput(f"{path} is {_file_kind(info.st_mode)}, not a regular file; only regular files are read")
        if max_bytes is not None and info.st_size > max_bytes:
            raise RefusedInput(_too_large(f"{info.st_size} bytes", max_bytes))
        data = file.read() if max_bytes is None else file.read(max_bytes + 1)  # it may have grown since fstat
    if max_bytes is not None and len(data) > max_bytes:
        raise RefusedInput(_too_large(f"more than {max_bytes} bytes", max_bytes))
    return data


def _read_remote(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return fs.cat_file(path)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as error:
        if "range is not satisfiable" not in str(error).lower() and "invalidrange" not in str(error).lower():
            raise
        data = b""  # a range from byte 0 is unsatisfiable only for an empty object
    if len(data) > max_bytes:
        raise RefusedInput(_too_large(f"more than {max_bytes} bytes", max_bytes))
    return data


def _too_large(size: str, max_bytes: int) -> str:
    return f"the file holds {size}, above max_bytes={max_bytes}; raise --max-bytes if such files are expected"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a directory" if stat.S_ISDIR(mode) else "not a file")


def storage_options_from(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse CLI `--storage-option key=value` pairs into fsspec storage options.

    Values "true"/"false" become booleans and plain integers and decimals become numbers, except for
    secret-looking keys, which stay strings (a numeric secret must not lose leading zeros). Dotted keys
    nest: `client_kwargs.region_name=eu-west-1` gives {"client_kwargs": {"region_name": "eu-west-1"}}.
    A repeated key keeps its last value.

    Args:
        pairs: strings "key=value"; the value may contain "=".

    Returns:
        The options dict.

    Raises:
        SourceError: a pair has no "=" or an empty key part, or a key is both a value and a group.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        parts = name.strip().split(".")
        if not sep or not all(parts):
            raise SourceError(f"storage option {pair!r} is not key=value; write e.g. endpoint_url=http://127.0.0.1:9000")
        node = options
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SourceError(f"storage option {pair!r}: {part} is already a value, not a group; drop one of them")
        if isinstance(node.get(parts[-1]), dict):
            raise SourceError(f"storage option {pair!r}: {parts[-1]} is already a group of options; drop one of them")
        node[parts[-1]] = raw if is_secret_option(parts[-1]) else _parse_value(raw)
    return options


STORAGE_OPTIONS_ENV = "LGCA_STORAGE_OPTIONS"  # a JSON object of storage options, for secrets kept out of `ps`


def gather_storage_options(pairs: Sequence[str], file: str | None = None, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Storage options from a file, the LGCA_STORAGE_OPTIONS variable and `--storage-option` pairs, later ones winning.

    Flags are visible to every user of the machine (`ps`); a file (JSON or YAML mapping, readable by its owner
    only) or the environment variable (a JSON object) keep secrets out of the process list.

    Raises:
        SourceError: the file or the variable does not hold a mapping, or a pair is malformed.
    """
    options: dict[str, Any] = {}
    if file:
        import yaml

        try:
            loaded = yaml.safe_load(Path(file).expanduser().read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise SourceError(f"--storage-options-file {file} is not readable JSON or YAML: {error}") from None
        _require_mapping(loaded, f"--storage-options-file {file}")
        options = _merged(options, loaded)
    text = environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if text:
        try:
            loaded = json.loads(text)
        except ValueError as error:
            raise SourceError(f"{STORAGE_OPTIONS_ENV} is not a JSON object: {error}") from None
        _require_mapping(loaded, STORAGE_OPTIONS_ENV)
        options = _merged(options, loaded)
    return _merged(options, storage_options_from(pairs))


def _require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise SourceError(
            f'{where} must hold a mapping of storage options (e.g. {{"key": ..., "secret": ...}}), got {type(value).__name__}'
        )


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in extra.items():
        out[name] = _merged(out[name], value) if isinstance(value, Mapping) and isinstance(out.get(name), Mapping) else value
    return out


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of storage options safe to log or write into a manifest.

    Values of secret-looking keys (key, secret, token, password, session_token, aws_*, and any name
    containing secret/token/key/password/credential, except endpoint, url and region names) become
    "***"; nested dicts are redacted too, and passwords inside endpoint URLs are masked.

    Args:
        options: storage options, possibly nested.

    Returns:
        The redacted copy; the input is not modified.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is not None and is_secret_option(str(name)):
            out[name] = MASK
        elif isinstance(value, Mapping):
            out[name] = redact(value)
        elif isinstance(value, str):
            out[name] = mask_credentials(value)
        else:
            out[name] = value
    return out


def check_scheme(uri: str, allowed: Sequence[str]) -> None:
    """Refuse `uri`, before any request, if it carries credentials (masked or not) or uses a URL scheme not in `allowed`.

    Every layer of a chained URL (simplecache::s3://...) must be allowed.

    Raises:
        RefusedInput: naming the scheme and the flag that allows it.
    """
    if has_credentials(uri):
        raise RefusedInput(CREDENTIALS_REFUSED)
    for scheme in schemes_of(uri):
        if scheme not in allowed:
            raise RefusedInput(
                f"{mask_credentials(uri)} uses the URL scheme {scheme}://, which this job does not read; add --allow-scheme {scheme} if you trust it"
            )


def schemes_of(uri: str) -> list[str]:
    """The URL schemes of `uri`, outermost first: file for local paths, s3 for s3a, else as written."""
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol in LOCAL_PROTOCOLS:
        return ["file"]
    return ["s3" if part in S3_PROTOCOLS else ("file" if part in LOCAL_PROTOCOLS else part.lower()) for part in str(protocol).split("::")]


def is_local(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] in LOCAL_PROTOCOLS


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local paths stay plain absolute paths; remote ones get their protocol back (bucket/k -> s3://bucket/k).
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RefusedInput)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    # botocore/aiohttp raise their own classes, not always OSErrors: a connection dropped mid-body is aiohttp's
    # ClientPayloadError (ContentLengthError), botocore's ResponseStreamingError or IncompleteReadError.
    name = type(error).__name__.lower()
    if any(word in name for word in ("connection", "timeout", "throttl", "disconnect", "payload", "streaming", "incompleteread")):
        return True
    return isinstance(error, OSError) and _TRANSIENT_MESSAGE.search(str(error)) is not None


def _parse_value(raw: str) -> Any:
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    # Only canonical numbers: "007" or "1e3" stay strings (ids, versions).
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", raw.strip()):
        return int(raw)
    if re.fullmatch(r"-?(0|[1-9][0-9]*)\.[0-9]+", raw.strip()):
        return float(raw)
    return raw


# S3 reads retry in botocore, in s3fs (a loop of 5, nested twice in cat_file) and in read_bytes (4 attempts):
# multiplied, one object that keeps failing took many minutes. Reads use botocore's standard mode with 3
# attempts and s3fs's loop off, so a read makes at most 4 x 3 requests (docs/RELIABILITY.md); storage
# options that set their own config_kwargs keys win.
S3_READ_CONFIG: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 30, "retries": {"mode": "standard", "total_max_attempts": 3}}


def read_options(path: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options for reading `path`: bounded retries and timeouts on S3 (S3_READ_CONFIG), else unchanged."""
    if not path.startswith(("s3://", "s3a://")):
        return dict(storage_options)
    config = {**S3_READ_CONFIG, "retries": dict(S3_READ_CONFIG["retries"]), **storage_options.get("config_kwargs", {})}
    options = {**storage_options, "config_kwargs": config}
    filesystem_for(path, options)[0].retries = 1  # the instance read_bytes gets (fsspec caches it by options)
    return options
