"""One writer per output: a lease object created atomically under the output, kept alive by a heartbeat.

A second job on the same output is refused while the lease is fresh. Freshness is judged on the store's own
clock (the lease file's modification time against the store's time), never by comparing two machines' clocks.
A job that died stops heartbeating, and its lease expires `ttl_s` after its last heartbeat; at once when it
ran in this host's PID namespace since this boot and its process is gone (a hostname alone does not name a
PID namespace: two containers may share one).

Every write is conditional on the lease still being the one this job saw. On local disks an advisory lock
(`flock`) serialises readers and writers and files are replaced atomically, so no one reads a torn lease; on S3,
creation is a conditional PUT (`If-None-Match: *`), heartbeats and release are conditional on the lease's ETag
(`If-Match`), and a store that ignores conditional writes is detected when the lease is first taken and refused
(`ASSUME_SINGLE_WRITER_ENV` is the operator's opt-out). A job that cannot renew its lease for half the ttl stops
before writing anything more (`check`, `confirm`): no one can have taken the output over in that time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.stages.lease_record import LeaseRecord, host_identity, process_start

LEASE = "_lease.json"
LOCK = "_lease.lock"  # local disks: the advisory lock every lease read and write holds
TTL_S = 120.0  # a lease without a heartbeat for this long belonged to a job that died
TTL_ENV = "LGCA_LEASE_TTL_S"  # another expiry, in seconds (docs/OPERATIONS.md)
HEARTBEAT_S = 15.0  # at most; never more than an eighth of the expiry
SAFE_SHARE = 0.5  # a job whose last renewal is older than this share of the ttl stops writing
UNREADABLE_TRIES = 5  # an unreadable lease is read again this many times (0.2 s apart) before its age decides
# The operator's opt-out for stores without conditional writes: they guarantee a single writer themselves.
ASSUME_SINGLE_WRITER_ENV = "LGCA_ASSUME_SINGLE_WRITER"

log = logging.getLogger(__name__)


class LeaseError(ConfigError):
    """Another job holds the output, or this job lost it; the message names the holder and the fix."""


@dataclass(frozen=True)
class _Held:
    """The lease as read: its record (None when unreadable), its age on the store's clock and its version."""

    record: LeaseRecord | None
    age_s: float
    version: str  # the S3 ETag, or the local file's mtime in nanoseconds


class Lease:
    """The lease of one job on one output; `acquire`, then `release` (a context manager does both)."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, url: str, ttl_s: float | None = None, heartbeat_s: float | None = None
    ) -> None:
        """
        Args:
            ttl_s: the expiry; default TTL_ENV from the environment, else TTL_S.
            heartbeat_s: seconds between renewals; default HEARTBEAT_S, at most an eighth of the expiry.

        Raises:
            LeaseError: TTL_ENV is not a number of at least 1 second.
        """
        if ttl_s is None:
            text = os.environ.get(TTL_ENV, str(TTL_S))
            try:
                ttl_s = float(text)
            except ValueError:
                ttl_s = float("nan")
            if not ttl_s >= 1:
                raise LeaseError(f"{TTL_ENV}={text!r} is not a number of seconds >= 1; unset it for the default {TTL_S:.0f}")
        self.fs = fs
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LEASE}"
        self.url = url
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(HEARTBEAT_S, ttl_s / 8)
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._local = isinstance(fs, LocalFileSystem)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()
        self._renewed = time.monotonic()  # when the lease was last written by this job, on this job's clock
        self._version = ""  # the S3 ETag of our lease as last written
        self._conditional = True  # False under the single-writer opt-out on a store without conditional writes

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or take over an expired one; then heartbeat in a daemon thread.

        Raises:
            LeaseError: another job's lease is fresh, or the store cannot guarantee one writer.
        """
        if not self._local:
            self._conditional = self._store_honours_conditional_writes()
        with self._locked():
            if not self._create():
                held = self._inspect()
                if held is None:  # released between our create and our read
                    if not self._create():
                        raise LeaseError(
                            f"another job took output {self.url} at the same moment; wait for it to end, or choose another --output"
                        )
                elif held.record is not None and held.record.owner == self.owner:
                    self._version = held.version  # our own create went through; its answer was lost and the retry found it
                elif held.age_s <= self.ttl_s and not (held.record is not None and held.record.dead_here()):
                    raise LeaseError(self._held_message(held))
                else:
                    who = f"host {held.record.host}, pid {held.record.pid}" if held.record else "unreadable"
                    log.warning("taking over the expired lease of %s (%s, last written %.0f s ago)", self.url, who, held.age_s)
                    if not self._remove(held.version) or not self._create():
                        raise LeaseError(
                            f"another job took output {self.url} at the same moment; wait for it to end, or choose another --output"
                        )
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lgca-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._locked():
            held = self._inspect()
            if held is not None and held.record is not None and held.record.owner == self.owner:
                self._remove(held.version)

    def check(self) -> None:
        """Raises LeaseError when another job has taken this output over, or when this job has not renewed its
        lease for SAFE_SHARE of the ttl (a stalled driver, a store that keeps failing): it must write no more."""
        if self.lost.is_set():
            raise LeaseError(
                f"this job lost its lease on {self.url} (no heartbeat for over {self.ttl_s:.0f} s, and another job took "
                "the output over); its committed shards stay, finish with --resume once the other job ends"
            )
        silent = time.monotonic() - self._renewed
        if silent > SAFE_SHARE * self.ttl_s:
            self.lost.set()
            raise LeaseError(
                f"this job could not renew its lease on {self.url} for {silent:.0f} s (more than {SAFE_SHARE:.0%} of its "
                f"{self.ttl_s:.0f} s expiry): another job may take the output over, so this one stops writing; its "
                "committed shards stay, finish with --resume"
            )

    def confirm(self) -> None:
        """Renew the lease now and prove it is still this job's, just before writing the output's final state.

        Raises:
            LeaseError: as `check`, or the renewal failed.
        """
        self.check()
        try:
            renewed = self._renew()
        except Exception as error:
            raise LeaseError(f"cannot renew the lease on {self.url} before finishing ({error}); finish with --resume") from None
        if not renewed:
            self.lost.set()
        self.check()

    # ---- internals

    def _record(self) -> LeaseRecord:
        return LeaseRecord(
            self.owner,
            socket.gethostname(),
            os.getpid(),
            self._started_at,
            time.time(),
            self.ttl_s,
            host_identity(),
            process_start(os.getpid()),
        )

    def _held_message(self, held: _Held) -> str:
        record = held.record
        who = f"host {record.host}, pid {record.pid}" if record else "its lease file cannot be read"
        return (
            f"output {self.url} is being written by another job ({who}, lease last written {held.age_s:.0f} s ago); wait "
            f"for it to end or stop it, or choose another --output. A job that died releases it {self.ttl_s:.0f} s after "
            "its last heartbeat"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """On local disks, hold the output's advisory lease lock (every reader and writer of the lease does)."""
        if not self._local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        handle = os.open(f"{self.root}/{LOCK}", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # closing releases the lock

    def _create(self) -> bool:
        """Create the lease if none exists; False when one does."""
        data = self._record().encode()
        if self._local:
            if os.path.exists(self.path):
                return False
            _replace_local(self.path, data)  # under the lock: nobody else creates meanwhile
            return True
        if not self._conditional:
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            self._version = self._etag()
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except (FileExistsError, OSError) as error:  # s3fs maps 412 PreconditionFailed to an OSError
            if self.fs.exists(self.path):
                return False
            raise LeaseError(f"cannot create the lease {self.path} on output {self.url}: {error}") from None
        self._version = self._etag()
        return True

    def _inspect(self) -> _Held | None:
        """The lease as it stands (None when there is none); an unreadable one is read again before its age counts."""
        for attempt in range(UNREADABLE_TRIES):
            try:
                self.fs.invalidate_cache(self.path)
                info = self.fs.info(self.path)
                with self.fs.open(self.path, "rb") as handle:
                    text = handle.read().decode("utf-8", "replace")
            except FileNotFoundError:
                return None
            record = LeaseRecord.parse(text)
            if record is not None or attempt == UNREADABLE_TRIES - 1:
                return _Held(record, self._age(info), self._version_of(info))
            time.sleep(0.2)
        raise AssertionError("unreachable")

    def _age(self, info: dict[str, Any]) -> float:
        """Seconds since the lease was last written, on the store's clock."""
        if self._local:
            return time.time() - float(info["mtime"])  # this machine's disk: the same clock
        return (self._store_now() - _timestamp(info.get("LastModified"))).total_seconds()

    def _store_now(self) -> datetime:
        """The store's time: the modification time it gives a probe object written now."""
        probe = f"{self.root}/_lease.clock-{uuid.uuid4().hex}"
        self.fs.pipe_file(probe, b"")
        try:
            return _timestamp(self.fs.info(probe).get("LastModified"))
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(probe)

    def _version_of(self, info: dict[str, Any]) -> str:
        if self._local:
            return str(os.stat(self.path).st_mtime_ns)
        return str(info.get("ETag", "")).strip('"')

    def _etag(self) -> str:
        self.fs.invalidate_cache(self.path)
        return str(self.fs.info(self.path).get("ETag", "")).strip('"')

    def _remove(self, version: str) -> bool:
        """Remove the lease if it is still at `version`; False when it changed meanwhile (another job wrote it)."""
        if self._local:
            held = self._inspect()  # under the lock
            if held is None:
                return True
            if held.version != version:
                return False
            os.remove(self.path)
            return True
        if not self._conditional:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
            return True
        bucket, key = self._bucket_key()
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return True
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        return True

    def _renew(self) -> bool:
        """Rewrite the lease with a new heartbeat if it is still this job's; False when it is not."""
        with self._locked():
            if self._local:
                held = self._inspect()
                if held is None or held.record is None or held.record.owner != self.owner:
                    return False
                _replace_local(self.path, self._record().encode())
            elif not self._conditional:
                held = self._inspect()
                if held is None or held.record is None or held.record.owner != self.owner:
                    return False
                self.fs.pipe_file(self.path, self._record().encode())
            else:
                bucket, key = self._bucket_key()
                try:
                    answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._record().encode(), IfMatch=self._version)
                except (FileNotFoundError, OSError) as error:
                    if isinstance(error, FileNotFoundError) or _precondition_failed(error):
                        return False
                    raise
                self._version = str(answer.get("ETag", "")).strip('"')
                self.fs.invalidate_cache(self.path)
        self._renewed = time.monotonic()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._renew():
                    self.lost.set()
                    return
            except Exception as error:  # retried at the next beat; `check` stops the job once renewals stay away too long
                log.warning("lease heartbeat on %s failed: %s", self.url, error)

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def _store_honours_conditional_writes(self) -> bool:
        """Create a probe object twice with `If-None-Match: *`: the second must be refused. A store that accepts
        it, or refuses conditional writes outright, cannot keep two jobs apart: refused, unless the operator
        opted out (ASSUME_SINGLE_WRITER_ENV)."""
        probe = f"{self.root}/_lease.probe-{uuid.uuid4().hex}"
        opt_out = os.environ.get(ASSUME_SINGLE_WRITER_ENV) == "1"
        fix = (
            f"use a store that honours conditional writes (AWS S3 does), or, if you guarantee that only one job writes "
            f"{self.url} at a time, set {ASSUME_SINGLE_WRITER_ENV}=1 (docs/OPERATIONS.md)"
        )
        try:
            self.fs.pipe_file(probe, b"1", mode="create")
        except OSError as error:
            if opt_out:
                log.warning(
                    "the store of %s refuses conditional writes (%s); %s=1: one writer is assumed",
                    self.url,
                    error,
                    ASSUME_SINGLE_WRITER_ENV,
                )
                return False
            raise LeaseError(f"the store of output {self.url} refuses conditional writes ({error}); {fix}") from None
        try:
            try:
                self.fs.pipe_file(probe, b"2", mode="create")
            except (FileExistsError, OSError) as error:
                if isinstance(error, FileExistsError) or _precondition_failed(error):
                    return True
                raise LeaseError(f"the store of output {self.url} answered a conditional write with {error}; {fix}") from None
            if opt_out:
                log.warning("the store of %s ignores If-None-Match; %s=1: one writer is assumed", self.url, ASSUME_SINGLE_WRITER_ENV)
                return False
            raise LeaseError(
                f"the store of output {self.url} ignores conditional writes (a second create with If-None-Match succeeded), "
                f"so two jobs could both take the output; {fix}"
            )
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm_file(probe)


def require_owner(fs: fsspec.AbstractFileSystem, root: str, owner: str) -> None:
    """Raises LeaseError unless the output's lease names `owner`: a worker checks it just before publishing a
    file, so a job taken over while it stalled cannot write into the new owner's output."""
    path = f"{root.rstrip('/')}/{LEASE}"
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as handle:
            record = LeaseRecord.parse(handle.read().decode("utf-8", "replace"))
    except FileNotFoundError:
        record = None
    if record is None or record.owner != owner:
        raise LeaseError(f"the lease on {root} no longer names this job: another job has taken the output over; nothing was published")


def _replace_local(path: str, data: bytes) -> None:
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def _timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    raise LeaseError(f"the store gave no modification time for the lease ({value!r}); it cannot judge the lease's age")


def _precondition_failed(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error} {getattr(error, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text or "409" in text
