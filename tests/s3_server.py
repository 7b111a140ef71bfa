"""A real S3 API on loopback for tests: moto's threaded server, as s3fs's own test suite uses."""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

FAKE_CREDENTIALS = {"key": "testing", "secret": "testing"}
REGION = "us-east-1"
# Fake credentials for botocore's default chain, and no profile or token that could point at a real account.
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
_ENV_REMOVED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class MotoS3Server:
    """moto's S3 on 127.0.0.1 at a free port; sets fake AWS env vars while it runs.

    moto accepts any credentials unless told otherwise: inside `enforce_auth()` it checks them against
    its (empty) IAM, so every request is refused as with a wrong key.
    """

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._saved_env: dict[str, str | None] = {}
        self._saved_log_level = logging.NOTSET
        self.endpoint_url = ""

    def start(self) -> MotoS3Server:
        for name in (*_ENV, *_ENV_REMOVED):
            self._saved_env[name] = os.environ.pop(name, None)
        os.environ.update(_ENV)
        # werkzeug logs one line per request; keep test output readable.
        werkzeug = logging.getLogger("werkzeug")
        self._saved_log_level = werkzeug.level
        werkzeug.setLevel(logging.ERROR)
        self._server.start()  # port=0 binds a free port; read it back from the server
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()
        logging.getLogger("werkzeug").setLevel(self._saved_log_level)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server; a fresh dict each time, so tests may change it."""
        return {**FAKE_CREDENTIALS, "endpoint_url": self.endpoint_url, "client_kwargs": {"region_name": REGION}}

    @contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Within the block, the server rejects the fake credentials (403 InvalidAccessKeyId)."""
        self._set_auth_free_requests("0")
        try:
            yield
        finally:
            self._set_auth_free_requests("inf")

    def _set_auth_free_requests(self, count: str) -> None:
        # moto's server API: authentication starts after `count` requests (inf: never).
        # text/plain, or Flask parses the body as a form and moto reads it as empty.
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def client(self) -> Any:
        """A boto3 S3 client for this server (set-up that should not go through s3fs's caches)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_CREDENTIALS["key"],
            aws_secret_access_key=FAKE_CREDENTIALS["secret"],
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name by default) and return its URI, s3://name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_tree(self, local_dir: str | os.PathLike[str], uri: str) -> list[str]:
        """Copy every file below `local_dir` to the prefix `uri` (s3://bucket/prefix); returns the object URIs."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        client = self.client()
        root = Path(local_dir)
        uploaded = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), path.relative_to(root).as_posix()) if part)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            uploaded.append(f"s3://{bucket}/{key}")
        return uploaded
