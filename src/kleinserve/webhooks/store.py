"""Webhook deliveries, durable: the protocol, and the SQLite store beside the jobs.

A :class:`Delivery` is one job's notification to one URL; each try is an :class:`Attempt`, kept.
The store decides nothing about retries: the dispatcher computes the next try and records it.

- ``add`` is idempotent per job (a job has at most one delivery), so several processes reading
  the same events cannot notify twice;
- ``claim_due`` hands out due deliveries with a lease (their next try is pushed ``lease`` seconds
  ahead in the same transaction), so two senders never send one delivery at once, and one that
  dies mid-send is retried when the lease runs out (at-least-once; receivers dedupe on the id);
- ``cursor``/``set_cursor`` keep how far the finished-job events have been read, so a restart
  resumes where the last run stopped and no finished job is missed.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from kleinserve.database import Database


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # out of attempts


class Delivery(BaseModel):
    """One job's notification to one URL, with the exact body every attempt sends."""

    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    job_id: str
    owner: str | None = None
    url: str
    event_type: str
    payload: str
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: float
    created_at: float
    last_error: str | None = None


class Attempt(BaseModel):
    """One try to deliver: when, what the receiver answered (or why nothing), how long it took."""

    delivery_id: str
    number: int
    at: float
    status_code: int | None = None
    error: str | None = None
    duration: float = 0.0


class WebhookStore(Protocol):
    def add(self, delivery: Delivery) -> bool:
        """Store ``delivery`` unless its job has one already; True if stored."""
        ...

    def claim_due(self, now: float, lease: float, limit: int = 10) -> list[Delivery]: ...

    def record(
        self, attempt: Attempt, status: DeliveryStatus, next_attempt_at: float, error: str | None = None
    ) -> None:
        """Keep ``attempt`` and move its delivery on (attempts + 1, new status, next try)."""
        ...

    def get(self, delivery_id: str) -> Delivery | None: ...

    def for_job(self, job_id: str) -> list[Delivery]: ...

    def attempts(self, delivery_id: str) -> list[Attempt]: ...

    def remove_finished_before(self, cutoff: float) -> int:
        """Forget delivered and failed deliveries created before ``cutoff``, with their attempts."""
        ...

    def cursor(self, name: str) -> int | None: ...

    def set_cursor(self, name: str, seq: int) -> None: ...

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT,
    url TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration REAL NOT NULL,
    PRIMARY KEY (delivery_id, number)
);
CREATE TABLE IF NOT EXISTS webhook_cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

COLUMNS = "id, job_id, owner, url, event_type, payload, status, attempts, next_attempt_at, created_at, last_error"
ATTEMPT_COLUMNS = "delivery_id, number, at, status_code, error, duration"


def delivery_from(row: Sequence[Any]) -> Delivery:
    return Delivery(**dict(zip(COLUMNS.split(", "), row, strict=True)))


def attempt_from(row: Sequence[Any]) -> Attempt:
    return Attempt(**dict(zip(ATTEMPT_COLUMNS.split(", "), row, strict=True)))


def delivery_row(delivery: Delivery) -> tuple[Any, ...]:
    return tuple(getattr(delivery, name) for name in COLUMNS.split(", "))


class SQLiteWebhookStore:
    """:class:`WebhookStore` in the server's SQLite file (``DATA_DIR/jobs.sqlite3``)."""

    def __init__(self, path: Path) -> None:
        self._database = Database(path, SCHEMA)

    def add(self, delivery: Delivery) -> bool:
        with self._database.write() as db:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO webhook_deliveries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                delivery_row(delivery),
            )
            return cursor.rowcount == 1

    def claim_due(self, now: float, lease: float, limit: int = 10) -> builtins.list[Delivery]:
        with self._database.write() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM webhook_deliveries WHERE status = ? AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at LIMIT ?",
                (DeliveryStatus.PENDING.value, now, limit),
            ).fetchall()
            claimed = [delivery_from(row) for row in rows]
            db.executemany(
                "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id = ?",
                [(now + lease, d.id) for d in claimed],
            )
            return claimed

    def record(
        self, attempt: Attempt, status: DeliveryStatus, next_attempt_at: float, error: str | None = None
    ) -> None:
        with self._database.write() as db:
            db.execute(
                f"INSERT OR REPLACE INTO webhook_attempts ({ATTEMPT_COLUMNS}) VALUES (?,?,?,?,?,?)",
                tuple(getattr(attempt, name) for name in ATTEMPT_COLUMNS.split(", ")),
            )
            db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?, next_attempt_at = ?, "
                "last_error = ? WHERE id = ?",
                (status.value, next_attempt_at, error, attempt.delivery_id),
            )

    def get(self, delivery_id: str) -> Delivery | None:
        row = (
            self._database.connection()
            .execute(f"SELECT {COLUMNS} FROM webhook_deliveries WHERE id = ?", (delivery_id,))
            .fetchone()
        )
        return delivery_from(row) if row else None

    def for_job(self, job_id: str) -> builtins.list[Delivery]:
        rows = self._database.connection().execute(
            f"SELECT {COLUMNS} FROM webhook_deliveries WHERE job_id = ? ORDER BY created_at", (job_id,)
        )
        return [delivery_from(row) for row in rows]

    def attempts(self, delivery_id: str) -> builtins.list[Attempt]:
        rows = self._database.connection().execute(
            f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE delivery_id = ? ORDER BY number", (delivery_id,)
        )
        return [attempt_from(row) for row in rows]

    def remove_finished_before(self, cutoff: float) -> int:
        finished = (DeliveryStatus.DELIVERED.value, DeliveryStatus.FAILED.value)
        with self._database.write() as db:
            old = "SELECT id FROM webhook_deliveries WHERE status IN (?, ?) AND created_at < ?"
            db.execute(f"DELETE FROM webhook_attempts WHERE delivery_id IN ({old})", (*finished, cutoff))
            return db.execute(
                "DELETE FROM webhook_deliveries WHERE status IN (?, ?) AND created_at < ?", (*finished, cutoff)
            ).rowcount

    def cursor(self, name: str) -> int | None:
        row = self._database.connection().execute("SELECT seq FROM webhook_cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else None

    def set_cursor(self, name: str, seq: int) -> None:
        with self._database.write() as db:
            db.execute(
                "INSERT INTO webhook_cursors (name, seq) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                (name, seq),
            )

    def close(self) -> None:
        self._database.close()
