"""A SQLite file shared by threads: one connection per thread, WAL, short write transactions.

The job store and the key store keep their tables in the same file (``DATA_DIR/jobs.sqlite3``);
this is the connection handling they share. ``BEGIN IMMEDIATE`` serialises writers across threads
and processes, so a read-check-write inside :meth:`Database.write` is atomic.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path


class Database:
    """Per-thread connections to one SQLite file in WAL mode."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.connection().executescript(schema)  # executescript manages its own transaction
        # Owner-only: the file holds key hashes, prompts and inputs. SQLite gives new -wal and -shm
        # files the database file's permissions; ones opened before this are set here too.
        for path in (
            self.path,
            self.path.with_name(self.path.name + "-wal"),
            self.path.with_name(self.path.name + "-shm"),
        ):
            if path.exists():
                path.chmod(0o600)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any error."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for db in self._connections:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed from another thread already
                    db.close()
            self._connections.clear()
        self._local = threading.local()
