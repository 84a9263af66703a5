"""Webhook deliveries in PostgreSQL: :class:`~kleinserve.webhooks.store.WebhookStore` for many processes.

The same tables and rules as the SQLite store. ``claim_due`` locks the due rows with
``FOR UPDATE SKIP LOCKED`` and pushes their next try out by the lease in the same transaction, so
senders in several ``api`` processes share the work without sending one delivery twice at once.
"""

from __future__ import annotations

import builtins

from kleinserve.postgres.database import PgDatabase
from kleinserve.webhooks.store import (
    ATTEMPT_COLUMNS,
    COLUMNS,
    Attempt,
    Delivery,
    DeliveryStatus,
    attempt_from,
    delivery_from,
    delivery_row,
)

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
    next_attempt_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (delivery_id, number)
);
CREATE TABLE IF NOT EXISTS webhook_cursors (name TEXT PRIMARY KEY, seq BIGINT NOT NULL);
"""


class PgWebhookStore:
    """:class:`~kleinserve.webhooks.store.WebhookStore` on a PostgreSQL database."""

    def __init__(self, database: PgDatabase | str) -> None:
        self._owned = isinstance(database, str)
        self._database = PgDatabase(database) if isinstance(database, str) else database
        self._database.migrate(SCHEMA)

    def close(self) -> None:
        if self._owned:
            self._database.close()

    def add(self, delivery: Delivery) -> bool:
        with self._database.connection() as db:
            cursor = db.execute(
                f"INSERT INTO webhook_deliveries ({COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (job_id) DO NOTHING",
                delivery_row(delivery),
            )
            return cursor.rowcount == 1

    def claim_due(self, now: float, lease: float, limit: int = 10) -> builtins.list[Delivery]:
        with self._database.transaction() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM webhook_deliveries WHERE status = %s AND next_attempt_at <= %s "
                "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (DeliveryStatus.PENDING.value, now, limit),
            ).fetchall()
            claimed = [delivery_from(row) for row in rows]
            for delivery in claimed:
                db.execute(
                    "UPDATE webhook_deliveries SET next_attempt_at = %s WHERE id = %s", (now + lease, delivery.id)
                )
            return claimed

    def record(
        self, attempt: Attempt, status: DeliveryStatus, next_attempt_at: float, error: str | None = None
    ) -> None:
        with self._database.transaction() as db:
            db.execute(
                f"INSERT INTO webhook_attempts ({ATTEMPT_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (delivery_id, number) DO NOTHING",
                tuple(getattr(attempt, name) for name in ATTEMPT_COLUMNS.split(", ")),
            )
            db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, status = %s, next_attempt_at = %s, "
                "last_error = %s WHERE id = %s",
                (status.value, next_attempt_at, error, attempt.delivery_id),
            )

    def get(self, delivery_id: str) -> Delivery | None:
        with self._database.connection() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM webhook_deliveries WHERE id = %s", (delivery_id,)).fetchone()
        return delivery_from(row) if row else None

    def for_job(self, job_id: str) -> builtins.list[Delivery]:
        with self._database.connection() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM webhook_deliveries WHERE job_id = %s ORDER BY created_at", (job_id,)
            ).fetchall()
        return [delivery_from(row) for row in rows]

    def attempts(self, delivery_id: str) -> builtins.list[Attempt]:
        with self._database.connection() as db:
            rows = db.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE delivery_id = %s ORDER BY number",
                (delivery_id,),
            ).fetchall()
        return [attempt_from(row) for row in rows]

    def remove_finished_before(self, cutoff: float) -> int:
        finished = (DeliveryStatus.DELIVERED.value, DeliveryStatus.FAILED.value)
        with self._database.transaction() as db:
            old = "SELECT id FROM webhook_deliveries WHERE status IN (%s, %s) AND created_at < %s"
            db.execute(f"DELETE FROM webhook_attempts WHERE delivery_id IN ({old})", (*finished, cutoff))
            return db.execute(
                "DELETE FROM webhook_deliveries WHERE status IN (%s, %s) AND created_at < %s", (*finished, cutoff)
            ).rowcount

    def cursor(self, name: str) -> int | None:
        with self._database.connection() as db:
            row = db.execute("SELECT seq FROM webhook_cursors WHERE name = %s", (name,)).fetchone()
        return int(row[0]) if row else None

    def set_cursor(self, name: str, seq: int) -> None:
        with self._database.connection() as db:
            db.execute(
                "INSERT INTO webhook_cursors (name, seq) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET seq = GREATEST(webhook_cursors.seq, excluded.seq)",
                (name, seq),
            )
