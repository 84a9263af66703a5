"""PostgreSQL for the tests: a throwaway server on 127.0.0.1 (pytest plugin, see tests/conftest.py).

The server is Debian's ``postgresql`` (``scripts/test`` installs it as root when it is missing). One
server per test session: ``initdb -A trust`` into a temporary directory, ``postgres`` on a free
loopback port with ``fsync=off`` (nothing here must survive a power cut), stopped at the end. As
root, the server runs as the ``postgres`` user (it refuses to run as root). Each test that wants a
clean slate gets its own database from :meth:`PostgresServer.create_database` (the ``pg_url``
fixture), dropped afterwards.

Without the server binaries the tests that need them are skipped with a reason that says so; with
them, any failure to start is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

SUPERUSER = "postgres"
MISSING = (
    "PostgreSQL server binaries (initdb, postgres) are not installed, so the PostgreSQL backend is NOT "
    "tested: install Debian's `postgresql` package (./scripts/test does so when run as root) or set "
    "KLEINSERVE_PG_BIN to the directory holding them"
)


def find_bin() -> Path | None:
    """The directory with ``initdb`` and ``postgres``: KLEINSERVE_PG_BIN, Debian's newest, or PATH."""
    candidates = [os.environ.get("KLEINSERVE_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(str(Path(initdb).resolve().parent) if initdb else "")
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A running test server; ``url(db)`` is a DSN, ``create_database()`` makes a fresh one."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="kleinserve-pg-"))  # /tmp: readable by the postgres user
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, str] = {}
        if os.geteuid() == 0:  # postgres will not run as root
            self._as = {"user": SUPERUSER, "group": SUPERUSER}
            shutil.chown(self.root, SUPERUSER, SUPERUSER)

    def start(self) -> None:
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            check=True, capture_output=True, cwd=self.root, **self._as,
        )  # fmt: skip
        for _ in range(5):  # a free port can be taken between our probe and the server's bind
            self.port = _free_port()
            log = self.log.open("ab")
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._as,
            )  # fmt: skip
            log.close()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')  # much faster than WAL_LOG here
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skips, loudly, when PostgreSQL is not installed)."""
    bindir = find_bin()
    if bindir is None:
        pytest.skip(MISSING)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database for this test (dropped afterwards)."""
    url = postgres_server.create_database()
    yield url
    with contextlib.suppress(psycopg.Error):
        postgres_server.drop_database(url)
