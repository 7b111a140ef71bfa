"""One writer per output: the lease under stalls, shared hostnames, torn reads, skewed clocks and weak stores.

Real files and a real S3 endpoint (moto on loopback); a store that ignores or refuses conditional writes is
moto behind the fault proxy, which strips or refuses the conditional headers.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest

from pipeline.stages.lease import ASSUME_SINGLE_WRITER_ENV, LEASE, SAFE_SHARE, Lease, LeaseError
from pipeline.stages.lease_record import LeaseRecord, host_identity, process_start

from .fault_proxy import FaultProxy, Rule


def _local(tmp_path: Path) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.filesystem("file"), str(tmp_path / "out")


def _write(tmp_path: Path, record: LeaseRecord, age_s: float = 0.0) -> Path:
    path = tmp_path / "out" / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.encode())
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return path


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


@pytest.mark.integration
def test_a_job_killed_on_this_host_releases_its_lease_at_once(tmp_path):
    fs, root = _local(tmp_path)
    pid = _dead_pid()
    _write(tmp_path, LeaseRecord("killed", "h", pid, time.time(), time.time(), 120.0, host_identity(), "123"))
    with Lease(fs, root, "out/") as lease:
        assert LeaseRecord.parse((tmp_path / "out" / LEASE).read_text()).owner == lease.owner


def test_a_live_process_with_a_reused_pid_is_not_the_lease_holder(tmp_path):
    """The pid is alive here but started at another time: the holder is gone (its pid was reused)."""
    fs, root = _local(tmp_path)
    _write(tmp_path, LeaseRecord("gone", "h", os.getpid(), time.time(), time.time(), 120.0, host_identity(), "1"))
    with Lease(fs, root, "out/"):
        pass
    _write(tmp_path, LeaseRecord("me", "h", os.getpid(), time.time(), time.time(), 120.0, host_identity(), process_start(os.getpid())))
    with pytest.raises(LeaseError, match="being written by another job"):
        Lease(fs, root, "out/").acquire()  # the very process that holds it: alive


@pytest.mark.integration
def test_a_shared_hostname_is_not_a_shared_pid_namespace(tmp_path):
    """A lease written in another PID namespace of a host with our hostname (two containers with one `hostname:`):
    its pid means nothing here, so it is fresh until it expires, even though that pid is not running here."""
    fs, root = _local(tmp_path)
    other = host_identity().rsplit("/", 1)[0] + "/pid:[4026530000]"
    _write(tmp_path, LeaseRecord("container-a", "vm", _dead_pid(), time.time(), time.time(), 120.0, other, "5"))
    with pytest.raises(LeaseError, match="being written by another job"):
        Lease(fs, root, "out/").acquire()


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare(1) and root for PID namespaces")
@pytest.mark.integration
def test_two_processes_in_separate_pid_namespaces_cannot_both_hold_an_output(tmp_path):
    """The real thing: each job in its own PID namespace (as a container is), one hostname."""
    script = tmp_path / "hold.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time, fsspec
            sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
            from pipeline.stages.lease import Lease, LeaseError
            try:
                lease = Lease(fsspec.filesystem("file"), {str(tmp_path / "out")!r}, "out/", heartbeat_s=0.2)
                lease.acquire()
            except LeaseError as error:
                print("refused:", error, flush=True)
                sys.exit(3)
            print("holding", flush=True)
            time.sleep(float(sys.argv[1]))
            """
        )
    )
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)]
    first = subprocess.Popen([*command, "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "holding"
        second = subprocess.run([*command, "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stdout + second.stderr
        assert "being written by another job" in second.stdout
    finally:
        first.kill()
        first.wait()


def test_an_unreadable_lease_is_read_again_and_never_taken_while_fresh(tmp_path):
    """A torn or foreign lease file: refused while recently written, taken over only once it is older than the ttl."""
    fs, root = _local(tmp_path)
    path = tmp_path / "out" / LEASE
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"owner": "half-writ')
    started = time.monotonic()
    with pytest.raises(LeaseError, match="its lease file cannot be read"):
        Lease(fs, root, "out/").acquire()
    assert time.monotonic() - started >= 0.6  # read again before giving up
    stamp = time.time() - 200
    os.utime(path, (stamp, stamp))
    with Lease(fs, root, "out/"):
        pass


def test_expiry_is_judged_on_the_stores_clock_not_the_writers(tmp_path):
    """A writer whose clock runs 500 s behind (or a reader 500 s ahead) writes heartbeats that look old; the lease
    file was written just now, so the lease is fresh."""
    fs, root = _local(tmp_path)
    _write(tmp_path, LeaseRecord("skewed", "elsewhere", 1, time.time() - 600, time.time() - 500, 120.0, "other-host", "1"))
    with pytest.raises(LeaseError, match="last written 0 s ago"):
        Lease(fs, root, "out/").acquire()
    # and one that really stopped writing 200 s ago, with a heartbeat that claims now, has expired
    _write(tmp_path, LeaseRecord("stopped", "elsewhere", 1, time.time(), time.time(), 120.0, "other-host", "1"), age_s=200)
    with Lease(fs, root, "out/"):
        pass


def test_heartbeats_replace_the_lease_atomically_and_keep_it_fresh(tmp_path):
    fs, root = _local(tmp_path)
    with Lease(fs, root, "out/", heartbeat_s=0.05) as lease:
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # a reader never sees a torn file between the beats
            record = LeaseRecord.parse((tmp_path / "out" / LEASE).read_text())
            assert record is not None and record.owner == lease.owner
            seen.add(record.heartbeat_at)
        assert len(seen) > 3


def test_a_stalled_job_stops_writing_and_never_touches_the_new_owners_lease(tmp_path):
    """Job A stops renewing (a paused VM, a stalled driver); past its expiry job B takes the output. A must
    refuse to write its final state, and its release must leave B's lease in place."""
    fs, root = _local(tmp_path)
    a = Lease(fs, root, "out/", ttl_s=1.0, heartbeat_s=3600)  # A's heartbeat never comes: it is stalled
    a.acquire()
    time.sleep(SAFE_SHARE * 1.0 + 0.1)
    with pytest.raises(LeaseError, match="could not renew its lease"):
        a.check()  # silent for over half the ttl: stop before anyone could take over
    time.sleep(0.6)  # past the ttl
    b = Lease(fs, root, "out/", ttl_s=1.0, heartbeat_s=0.1)
    b.acquire()
    with pytest.raises(LeaseError):
        a.confirm()
    a.release()
    assert LeaseRecord.parse((tmp_path / "out" / LEASE).read_text()).owner == b.owner
    time.sleep(0.3)
    b.confirm()  # B renewed meanwhile: its lease stands
    b.release()


def test_a_lease_taken_while_the_heartbeat_was_failing_is_noticed_at_the_next_beat(tmp_path):
    fs, root = _local(tmp_path)
    mine = Lease(fs, root, "out/", heartbeat_s=0.1)
    mine.acquire()
    _write(tmp_path, LeaseRecord("other", "another-host", 1, time.time(), time.time(), 120.0, "other", "1"))
    time.sleep(0.5)
    with pytest.raises(LeaseError, match="lost its lease"):
        mine.check()
    mine.release()
    assert LeaseRecord.parse((tmp_path / "out" / LEASE).read_text()).owner == "other"


# ---------------------------------------------------------------- S3


def _s3(s3_server, bucket: str, endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = dict(s3_server.storage_options)
    if endpoint:
        options["endpoint_url"] = endpoint
    return fsspec.filesystem("s3", skip_instance_cache=True, **options), bucket.removeprefix("s3://") + "/out"


def test_s3_heartbeats_and_release_are_conditional_on_the_lease_being_ours(s3_server, s3_bucket):
    fs, root = _s3(s3_server, s3_bucket)
    mine = Lease(fs, root, "s3://out/", heartbeat_s=0.2)
    mine.acquire()
    time.sleep(0.5)
    mine.confirm()
    # another job's lease replaces ours (we stalled past the expiry): the next conditional heartbeat fails
    other = LeaseRecord("other", "another-host", 1, time.time(), time.time(), 120.0, "other", "1")
    fs.pipe_file(f"{root}/{LEASE}", other.encode())
    time.sleep(0.6)
    with pytest.raises(LeaseError, match="lost its lease"):
        mine.check()
    mine.release()  # conditional on our ETag: the other job's lease stays
    assert LeaseRecord.parse(fs.cat_file(f"{root}/{LEASE}").decode()).owner == "other"
    assert not [p for p in fs.ls(root, detail=False) if "_lease.probe" in p or "_lease.clock" in p]  # probes cleaned up


def test_s3_expiry_uses_the_stores_clock(s3_server, s3_bucket):
    fs, root = _s3(s3_server, s3_bucket)
    skewed = LeaseRecord("skewed", "elsewhere", 1, time.time() - 600, time.time() - 500, 120.0, "other-host", "1")
    fs.pipe_file(f"{root}/{LEASE}", skewed.encode())
    with pytest.raises(LeaseError, match="being written by another job"):
        Lease(fs, root, "s3://out/").acquire()


@pytest.mark.parametrize("fault, named", [("unconditional", "ignores conditional writes"), ("501", "refuses conditional writes")])
def test_a_store_without_conditional_writes_is_refused_before_any_work(s3_server, s3_bucket, fault, named, monkeypatch, caplog):
    with FaultProxy(s3_server.endpoint_url, [Rule(every=1, faults=(fault,), methods=frozenset({"PUT"}))]) as proxy:
        fs, root = _s3(s3_server, s3_bucket, proxy.url)
        with pytest.raises(LeaseError, match=f"{named}.*{ASSUME_SINGLE_WRITER_ENV}=1"):
            Lease(fs, root, "s3://out/").acquire()
        assert not fs.exists(f"{root}/{LEASE}")
        monkeypatch.setenv(ASSUME_SINGLE_WRITER_ENV, "1")  # the operator guarantees one writer
        with caplog.at_level(logging.WARNING), Lease(fs, root, "s3://out/", heartbeat_s=0.1) as lease:
            time.sleep(0.3)
            lease.confirm()
        assert "one writer is assumed" in caplog.text
        assert not fs.exists(f"{root}/{LEASE}")
