"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .s3_server import MotoS3Server


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
