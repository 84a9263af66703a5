"""API keys and their usage in PostgreSQL: :class:`~kleinserve.keys.ApiKeyStore` for many processes.

The same tables as the SQLite store, so a key created with ``kleinserve keys create`` against the
database works on every ``api`` replica at once; revoking it takes effect on the next request.
"""

from __future__ import annotations

import builtins
import hmac
import time
from typing import Any

import psycopg

from kleinserve.errors import InvalidParameterError, NotFoundError
from kleinserve.keys import ApiKey, Usage, hash_key, new_key, usage_from_rows
from kleinserve.postgres.database import PgDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    shown_prefix TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    requests_per_minute DOUBLE PRECISION,
    images_per_minute DOUBLE PRECISION,
    concurrency INTEGER,
    credits DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS api_usage (
    seq BIGSERIAL PRIMARY KEY,
    key_id TEXT NOT NULL,
    job_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS api_usage_key ON api_usage (key_id);
"""

_COLUMNS = (
    "id, name, shown_prefix, created_at, revoked_at, requests_per_minute, images_per_minute, concurrency, credits"
)


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(*row)


class PgKeyStore:
    """:class:`~kleinserve.keys.ApiKeyStore` on a PostgreSQL database."""

    def __init__(self, database: PgDatabase | str) -> None:
        self._owned = isinstance(database, str)
        self._database = PgDatabase(database) if isinstance(database, str) else database
        self._database.migrate(SCHEMA)

    def close(self) -> None:
        if self._owned:
            self._database.close()

    def create(
        self,
        name: str,
        *,
        requests_per_minute: float | None = None,
        images_per_minute: float | None = None,
        concurrency: int | None = None,
        credits: float | None = None,
    ) -> tuple[ApiKey, str]:
        key, secret = new_key(
            name,
            requests_per_minute=requests_per_minute,
            images_per_minute=images_per_minute,
            concurrency=concurrency,
            credits=credits,
        )
        try:
            with self._database.connection() as db:
                db.execute(
                    "INSERT INTO api_keys (id, name, hash, shown_prefix, created_at, revoked_at, requests_per_minute,"
                    " images_per_minute, concurrency, credits) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (key.id, key.name, hash_key(secret), key.shown_prefix, key.created_at, None,
                     key.requests_per_minute, key.images_per_minute, key.concurrency, key.credits),
                )  # fmt: skip
        except psycopg.errors.UniqueViolation:
            raise InvalidParameterError("name", f"a key named {name!r} exists already") from None
        return key, secret

    def list(self) -> builtins.list[ApiKey]:
        with self._database.connection() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_key(row) for row in rows]

    def get(self, name: str) -> ApiKey:
        with self._database.connection() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name=%s", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key named {name!r}")
        return _key(row)

    def revoke(self, name: str) -> ApiKey:
        key = self.get(name)
        with self._database.connection() as db:
            db.execute("UPDATE api_keys SET revoked_at=%s WHERE id=%s AND revoked_at IS NULL", (time.time(), key.id))
        return self.get(name)

    def any_active(self) -> bool:
        with self._database.connection() as db:
            return db.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None

    def any_key(self) -> bool:
        with self._database.connection() as db:
            return db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def revoked_since(self, since: float) -> builtins.list[tuple[str, float]]:
        with self._database.connection() as db:
            rows = db.execute(
                "SELECT id, revoked_at FROM api_keys WHERE revoked_at >= %s ORDER BY revoked_at", (since,)
            ).fetchall()
        return [(str(key_id), float(at)) for key_id, at in rows]

    def authenticate(self, secret: str) -> ApiKey | None:
        wanted = hash_key(secret)
        with self._database.connection() as db:
            row = db.execute(f"SELECT {_COLUMNS}, hash FROM api_keys WHERE hash=%s", (wanted,)).fetchone()
        if row is None or not hmac.compare_digest(str(row[-1]), wanted):
            return None
        key = _key(row[:-1])
        return key if key.active else None

    def record_usage(self, key_id: str, job_id: str, model: str, images: int, cost: float) -> None:
        with self._database.connection() as db:
            db.execute(
                "INSERT INTO api_usage (key_id, job_id, model, images, cost, created_at) "
                "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (job_id) DO NOTHING",
                (key_id, job_id, model, images, cost, time.time()),
            )

    def spent(self, key_id: str) -> float:
        with self._database.connection() as db:
            row = db.execute("SELECT COALESCE(SUM(cost), 0) FROM api_usage WHERE key_id=%s", (key_id,)).fetchone()
        return float(row[0]) if row else 0.0

    def usage(self, key_id: str) -> Usage:
        with self._database.connection() as db:
            rows = db.execute(
                "SELECT model, COUNT(*), SUM(images), SUM(cost) FROM api_usage WHERE key_id=%s GROUP BY model",
                (key_id,),
            ).fetchall()
        return usage_from_rows(rows)
