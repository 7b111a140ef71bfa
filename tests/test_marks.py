"""The `integration` mark holds: under LGCA_FAST_TESTS=1 (`make test-fast`) a test without it can start no
subprocess, Ray or server (tests/conftest.py), so a fast run that passes started none."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess

import pytest

from .conftest import FAST_ENV, StartedOutsideIntegration


@pytest.fixture(autouse=True)
def _guard_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard on for these tests in every run, `make test` too: it is checked when each test's call begins."""
    monkeypatch.setenv(FAST_ENV, "1")


def test_an_unmarked_test_cannot_start_a_subprocess():
    with pytest.raises(StartedOutsideIntegration, match=r"test_an_unmarked_test_cannot_start_a_subprocess starts a subprocess \(true\)"):
        subprocess.run(["true"], check=False)


def test_an_unmarked_test_cannot_fork_or_spawn_a_process():
    for method in ("fork", "spawn"):
        process = multiprocessing.get_context(method).Process(target=print)
        with pytest.raises(StartedOutsideIntegration, match="not marked integration"):
            process.start()


def test_an_unmarked_test_cannot_start_a_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        with pytest.raises(StartedOutsideIntegration, match="starts a server"):
            server.listen()


def test_an_unmarked_test_cannot_start_ray():
    import ray

    was_running = ray.is_initialized()  # the session's Ray, where an earlier test started it
    with pytest.raises(StartedOutsideIntegration, match="starts (Ray|a subprocess)"):
        ray.init(num_cpus=1, include_dashboard=False)
    assert ray.is_initialized() == was_running


@pytest.mark.integration
def test_a_marked_test_may_start_a_subprocess():
    assert subprocess.run(["true"], check=False).returncode == 0
