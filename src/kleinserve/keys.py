"""API keys: creation, storage as hashes, limits, credits and usage.

A key is shown once, at creation; only its SHA-256 is stored (keys are 256 random bits, so a fast
hash loses nothing against guessing). Lookups go by hash and the final comparison is constant-time.
Usage rows are written when a job succeeds; failed and cancelled jobs are never charged.

:class:`ApiKeyStore` is the protocol; :class:`KeyStore` keeps keys in SQLite beside the jobs (the
default), ``kleinserve.postgres.keys.PgKeyStore`` in PostgreSQL. Both build keys with
:func:`new_key` and sum usage with :func:`usage_from_rows`, so they differ only in their SQL.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kleinserve.database import Database
from kleinserve.errors import InvalidParameterError, NotFoundError

KEY_PREFIX = "ks-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    shown_prefix TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    requests_per_minute REAL,
    images_per_minute REAL,
    concurrency INTEGER,
    credits REAL
);
CREATE TABLE IF NOT EXISTS api_usage (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    job_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    cost REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS api_usage_key ON api_usage (key_id);
"""
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$", re.I)
_PER_MINUTE = {"s": 60.0, "sec": 60.0, "second": 60.0, "m": 1.0, "min": 1.0, "minute": 1.0}


def parse_rate(text: str, field: str = "rate") -> float:
    """Requests (or images) per minute from ``60/min``, ``2/s``, ``1000/hour`` or ``60``."""
    match = _RATE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise InvalidParameterError(field, f"must look like 60/min, 2/s or 1000/hour; got {text!r}")
    unit = (match.group(2) or "min").lower()
    return float(match.group(1)) * _PER_MINUTE.get(unit, 1 / 60)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never the key itself): who it is and what it may do."""

    id: str
    name: str
    shown_prefix: str
    created_at: float
    revoked_at: float | None
    requests_per_minute: float | None
    images_per_minute: float | None
    concurrency: int | None
    credits: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Usage:
    """What a key has generated and spent."""

    images: int
    jobs: int
    spent: float
    by_model: dict[str, dict[str, float]]


@runtime_checkable
class ApiKeyStore(Protocol):
    """Where keys and their usage live. Implementations must be safe to use from many threads."""

    def create(
        self,
        name: str,
        *,
        requests_per_minute: float | None = None,
        images_per_minute: float | None = None,
        concurrency: int | None = None,
        credits: float | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it and the secret, which is never shown again."""

    def list(self) -> builtins.list[ApiKey]:
        """Every key, oldest first."""

    def get(self, name: str) -> ApiKey:
        """The key called ``name``; :class:`NotFoundError` when there is none."""

    def revoke(self, name: str) -> ApiKey:
        """Revoke the key called ``name`` (once; revoking again changes nothing)."""

    def any_active(self) -> bool:
        """Whether any key is active (a running open server then starts requiring keys)."""

    def any_key(self) -> bool:
        """Whether any key was ever created, revoked ones included (see kleinserve.access)."""

    def revoked_since(self, since: float) -> builtins.list[tuple[str, float]]:
        """``(id, revoked_at)`` of the keys revoked at or after ``since``, oldest first."""

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or ``None``."""

    def record_usage(self, key_id: str, job_id: str, model: str, images: int, cost: float) -> None:
        """Charge a succeeded job to its key (a job id is charged at most once)."""

    def spent(self, key_id: str) -> float:
        """Credits the key has spent."""

    def usage(self, key_id: str) -> Usage:
        """What the key has generated and spent, by model."""

    def close(self) -> None:
        """Release connections."""


def new_key(
    name: str,
    *,
    requests_per_minute: float | None = None,
    images_per_minute: float | None = None,
    concurrency: int | None = None,
    credits: float | None = None,
) -> tuple[ApiKey, str]:
    """A new key (checked) and its secret, not yet stored."""
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
        raise InvalidParameterError("name", "1-64 letters, digits and . _ @ - only")
    if concurrency is not None and concurrency < 1:
        raise InvalidParameterError("concurrency", "must be at least 1")
    if credits is not None and credits < 0:
        raise InvalidParameterError("credits", "must not be negative")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=secrets.token_hex(8),
        name=name,
        shown_prefix=secret[:10],
        created_at=time.time(),
        revoked_at=None,
        requests_per_minute=requests_per_minute,
        images_per_minute=images_per_minute,
        concurrency=concurrency,
        credits=credits,
    )
    return key, secret


def usage_from_rows(rows: Iterable[Sequence[Any]]) -> Usage:
    """Usage from (model, jobs, images, cost) rows, one per model."""
    by_model = {str(m): {"jobs": int(j), "images": int(i), "spent": float(c)} for m, j, i, c in rows}
    return Usage(
        images=sum(int(v["images"]) for v in by_model.values()),
        jobs=sum(int(v["jobs"]) for v in by_model.values()),
        spent=sum(v["spent"] for v in by_model.values()),
        by_model=by_model,
    )


class KeyStore:
    """:class:`ApiKeyStore` in a SQLite file (the job store's, by default)."""

    def __init__(self, path: Path) -> None:
        self._database = Database(Path(path), _SCHEMA)
        self._db = self._database.connection
        self._write = self._database.write

    def close(self) -> None:
        self._database.close()

    # -- keys -----------------------------------------------------------------------------------

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
            with self._write() as db:
                db.execute(
                    "INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (key.id, key.name, hash_key(secret), key.shown_prefix, key.created_at, None,
                     key.requests_per_minute, key.images_per_minute, key.concurrency, key.credits),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise InvalidParameterError("name", f"a key named {name!r} exists already") from None
        return key, secret

    @staticmethod
    def _key(row: tuple[object, ...]) -> ApiKey:
        return ApiKey(*row)  # type: ignore[arg-type]

    _COLUMNS = (
        "id, name, shown_prefix, created_at, revoked_at, requests_per_minute, images_per_minute, concurrency, credits"
    )

    def list(self) -> builtins.list[ApiKey]:
        rows = self._db().execute(f"SELECT {self._COLUMNS} FROM api_keys ORDER BY created_at")
        return [self._key(row) for row in rows]

    def get(self, name: str) -> ApiKey:
        row = self._db().execute(f"SELECT {self._COLUMNS} FROM api_keys WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key named {name!r}")
        return self._key(row)

    def revoke(self, name: str) -> ApiKey:
        key = self.get(name)
        if key.active:
            with self._write() as db:
                db.execute("UPDATE api_keys SET revoked_at=? WHERE id=?", (time.time(), key.id))
        return self.get(name)

    def any_active(self) -> bool:
        return self._db().execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None

    def any_key(self) -> bool:
        """Whether any key was ever created here (revoked ones count: see kleinserve.access)."""
        return self._db().execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def revoked_since(self, since: float) -> builtins.list[tuple[str, float]]:
        """``(id, revoked_at)`` of the keys revoked at or after ``since`` (oldest first)."""
        rows = self._db().execute(
            "SELECT id, revoked_at FROM api_keys WHERE revoked_at >= ? ORDER BY revoked_at", (since,)
        )
        return [(str(key_id), float(at)) for key_id, at in rows]

    def authenticate(self, secret: str) -> ApiKey | None:
        wanted = hash_key(secret)
        row = self._db().execute(f"SELECT {self._COLUMNS}, hash FROM api_keys WHERE hash=?", (wanted,)).fetchone()
        if row is None or not hmac.compare_digest(str(row[-1]), wanted):
            return None
        key = self._key(row[:-1])
        return key if key.active else None

    # -- usage ----------------------------------------------------------------------------------

    def record_usage(self, key_id: str, job_id: str, model: str, images: int, cost: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO api_usage (key_id, job_id, model, images, cost, created_at) "
                "VALUES (?,?,?,?,?,?)",
                (key_id, job_id, model, images, cost, time.time()),
            )

    def spent(self, key_id: str) -> float:
        row = self._db().execute("SELECT COALESCE(SUM(cost), 0) FROM api_usage WHERE key_id=?", (key_id,)).fetchone()
        return float(row[0])

    def usage(self, key_id: str) -> Usage:
        rows = (
            self._db()
            .execute(
                "SELECT model, COUNT(*), SUM(images), SUM(cost) FROM api_usage WHERE key_id=? GROUP BY model", (key_id,)
            )
            .fetchall()
        )
        return usage_from_rows(rows)
