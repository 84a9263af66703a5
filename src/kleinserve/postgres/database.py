"""A PostgreSQL database shared by threads (and by processes on other hosts): a connection pool.

Decisions:
- psycopg 3 with ``psycopg_pool.ConnectionPool``; connections are in autocommit mode and every
  multi-statement unit of work is an explicit :meth:`PgDatabase.transaction`, so no connection ever
  goes back to the pool with a transaction left open.
- Migrations are ``CREATE ... IF NOT EXISTS`` statements run at start, inside one transaction that
  first takes a transaction-level advisory lock: several processes starting at once (two ``api``
  replicas and a worker) would otherwise race on the catalog and one would fail with a duplicate-key
  error on ``pg_type``.
- Timestamps are stored as double precision seconds since the epoch, as the SQLite stores keep them:
  the same numbers flow through both backends and the models that read them.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

#: The URL schemes that select PostgreSQL.
SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(SCHEMES)


def advisory_key(name: str) -> int:
    """A stable 32-bit advisory lock key for ``name`` (one per purpose, the same in every process)."""
    return zlib.crc32(f"kleinserve:{name}".encode())


class PgDatabase:
    """A pool of autocommit connections to one PostgreSQL database."""

    def __init__(self, url: str, schema: str = "", *, max_size: int = 10) -> None:
        self.url = url
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True},
            open=True,
            name="kleinserve",
        )
        self.pool.wait(timeout=30)
        if schema:
            self.migrate(schema)

    def migrate(self, schema: str) -> None:
        """Create the tables and indexes ``schema`` describes, once, even with racing starters."""
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("migrate"),))
            db.execute(schema)  # several statements, no parameters: allowed in one execute

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A pooled connection (autocommit: each statement is its own transaction)."""
        with self.pool.connection() as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection inside one transaction: committed on success, rolled back on any error."""
        with self.pool.connection() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        self.pool.close()
