"""One writer per output: a lease object created atomically under the output, kept alive by a heartbeat.

A second job on the same output is refused while the lease is fresh; a job that died stops heartbeating,
and its lease expires after `ttl_s` (at once when it ran on this host, where its process can be checked). Creation is exclusive: `O_EXCL` on local disks, a conditional PUT
(`If-None-Match: *`) on S3. Heartbeats rewrite the lease only while it still names this owner, so a job
whose lease was taken over (it stalled past the expiry) learns it and stops before writing more.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError

LEASE = "_lease.json"
TTL_S = 120.0  # a lease without a heartbeat for this long belonged to a job that died
HEARTBEAT_S = 15.0

log = logging.getLogger(__name__)


class LeaseError(ConfigError):
    """Another job holds the output, or this job lost it; the message names the holder and the fix."""


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    ttl_s: float

    @classmethod
    def parse(cls, text: str) -> LeaseRecord | None:
        try:
            data = json.loads(text)
            return cls(
                str(data["owner"]),
                str(data["host"]),
                int(data["pid"]),
                float(data["started_at"]),
                float(data["heartbeat_at"]),
                float(data["ttl_s"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: treated as expired

    def expired(self, now: float) -> bool:
        """No heartbeat for ttl_s, or its owner ran on this host and is gone (a killed job, resumed at once)."""
        return now - self.heartbeat_at > self.ttl_s or (self.host == socket.gethostname() and not _alive(self.pid))

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")


class Lease:
    """The lease of one job on one output; `acquire`, then `release` (a context manager does both)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.fs = fs
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.url = url
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or take over an expired one; then heartbeat in a daemon thread.

        Raises:
            LeaseError: another job's lease is fresh.
        """
        record = self._record(time.time())
        if not self._create(record):
            held = self._read()
            if held is not None and held.owner == self.owner:
                pass  # our own create went through; its answer was lost and the retry found it
            elif held is not None and not held.expired(time.time()):
                age = time.time() - held.heartbeat_at
                raise LeaseError(
                    f"output {self.url} is being written by another job (host {held.host}, pid {held.pid}, last heartbeat "
                    f"{age:.0f} s ago); wait for it to end or stop it, or choose another --output. A job that died "
                    f"releases it {held.ttl_s:.0f} s after its last heartbeat"
                )
            else:
                log.warning(
                    "taking over the expired lease of %s (%s)", self.url, f"host {held.host}, pid {held.pid}" if held else "unreadable"
                )
                self._remove()
                if not self._create(record):
                    raise LeaseError(
                        f"another job took output {self.url} at the same moment; wait for it to end, or choose another --output"
                    )
        self._thread = threading.Thread(target=self._beat, name="lgca-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.owner == self.owner:
            self._remove()

    def check(self) -> None:
        """Raises LeaseError when another job has taken over this output."""
        if self.lost.is_set():
            raise LeaseError(
                f"this job lost its lease on {self.url} (no heartbeat for over {self.ttl_s:.0f} s, and another job took "
                "the output over); its committed shards stay, finish with --resume once the other job ends"
            )

    # ---- internals

    def _record(self, now: float) -> LeaseRecord:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self._started_at, now, self.ttl_s)

    def _create(self, record: LeaseRecord) -> bool:
        """Create the lease file if none exists; False when one does."""
        data = record.encode()
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except (FileExistsError, OSError) as error:  # s3fs maps 412 PreconditionFailed to an OSError
            if self.fs.exists(self.path):
                return False
            raise LeaseError(f"cannot create the lease {self.path} on output {self.url}: {error}") from None
        return True

    def _read(self) -> LeaseRecord | None:
        try:
            self.fs.invalidate_cache(self.path)
            with self.fs.open(self.path, "rb") as handle:
                return LeaseRecord.parse(handle.read().decode("utf-8", "replace"))
        except FileNotFoundError:
            return None

    def _remove(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read()
                if held is None or held.owner != self.owner:
                    self.lost.set()
                    return
                self.fs.pipe_file(self.path, self._record(time.time()).encode())
            except Exception as error:  # a missed heartbeat is retried; only expiry loses the lease
                log.warning("lease heartbeat on %s failed: %s", self.url, error)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
