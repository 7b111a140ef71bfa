"""Shared pytest fixtures, and the `integration` mark: added to the tests that use the fixtures below that start
Ray or a server, and enforced where LGCA_FAST_TESTS=1 (`make test-fast`)."""

from __future__ import annotations

import contextlib
import functools
import os
import posix
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .s3_server import MotoS3Server

FAST_ENV = "LGCA_FAST_TESTS"
# A test that uses one of these (or a fixture that does) starts moto's S3 server, Ray, a labelling run on Ray
# or Chromium: it is an integration test, whatever else it is marked.
INTEGRATION_FIXTURES = frozenset({"s3_server", "s3_bucket", "ray_local", "real_run", "chromium"})


class StartedOutsideIntegration(RuntimeError):
    """An unmarked test started a subprocess, Ray or a server while LGCA_FAST_TESTS=1."""


def pytest_itemcollected(item: pytest.Item) -> None:
    # at collection, before `-m` selects: `-m "not integration"` leaves these out
    if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _starts_nothing(item):  # fixtures too: a module or session fixture is set up for its first test
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _starts_nothing(item):
        return (yield)


@contextlib.contextmanager
def _starts_nothing(item: pytest.Item) -> Iterator[None]:
    """Where LGCA_FAST_TESTS=1, a test without the `integration` mark that starts a process (subprocess,
    multiprocessing, fork), Ray or a listening server fails at that call, naming itself and what it started."""
    if os.environ.get(FAST_ENV) != "1" or item.get_closest_marker("integration"):
        yield
        return

    def refuse(what: Callable[..., str], original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)  # its module and name: pickle still refers to `os.system` as such
        def refused(*args: Any, **kwargs: Any) -> Any:
            if _library_lookup():
                return original(*args, **kwargs)
            raise StartedOutsideIntegration(
                f"{item.nodeid} {what(*args)} but is not marked integration: mark it @pytest.mark.integration "
                f"(with {FAST_ENV}=1, as in `make test-fast`, a test may start no subprocess, Ray or server)"
            )

        return refused

    def command(args: Any, *_: Any) -> str:
        return f"starts a subprocess ({' '.join(os.fsdecode(a) for a in args)[:200]})"

    import _posixsubprocess

    with pytest.MonkeyPatch.context() as patch:
        if getattr(subprocess, "_fork_exec", None) is not None:  # subprocess.Popen and all that uses it
            patch.setattr(subprocess, "_fork_exec", refuse(command, subprocess._fork_exec))
        patch.setattr(_posixsubprocess, "fork_exec", refuse(command, _posixsubprocess.fork_exec))  # multiprocessing's spawn
        spawns = {"posix_spawn": lambda path, args, *_: command(args), "posix_spawnp": lambda path, args, *_: command(args)}
        spawns |= {"fork": lambda: "forks a process", "forkpty": lambda: "forks a process"}
        spawns["system"] = lambda line: f"starts a shell ({line[:200]})"
        for name, what in spawns.items():  # os.system is posix.system: both names, so pickle finds it under its own
            refused = refuse(what, getattr(os, name))
            for module in (os, posix):
                patch.setattr(module, name, refused)
        listen = refuse(lambda sock, *_: f"starts a server (listens on {sock.getsockname()})", socket.socket.listen)
        patch.setattr(socket.socket, "listen", listen)
        if "ray" in sys.modules:  # otherwise Ray's own processes start through subprocess, refused above
            ray = sys.modules["ray"]
            patch.setattr(ray, "init", refuse(lambda *_: "starts Ray (ray.init)", ray.init))
        yield


def _library_lookup() -> bool:
    """Whether the process is started by `ctypes.util.find_library` (its `ldconfig -p` probe, as torch's import
    makes): a library lookup, not a process the test starts."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "ctypes.util":
            return True
        frame = frame.f_back
    return False


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread in the test process: the tiny models' ops take microseconds, and with two threads on a
    2-core machine shared with Ray workers, OpenMP hand-offs make them ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """moto's S3 on loopback for the whole session, with fake AWS env vars set while it runs.

    Use `s3_server.storage_options` for s3fs, `s3_server.make_bucket()` for a fresh bucket.
    """
    from .s3_server import MotoS3Server  # moto and boto3 load only in sessions that use S3

    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server) -> Iterator[str]:
    """A fresh empty bucket as s3://name, with s3fs's instance cache (and its listings) cleared around the test."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server.make_bucket()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One in-process local Ray for the session; `pipeline.run.job.run` reuses it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()
