"""The job store on PostgreSQL: many API and worker processes share one queue and one event log.

Mirrors ``sqlite.py`` behind the same :class:`~kleinserve.jobs.store.base.JobStore` protocol; the
lifecycle is decided by the pure methods of :class:`~kleinserve.jobs.job.Job`, not here. Decisions:

- Each job is a row holding its JSON (``body``) with the columns queries filter on beside it, as in
  SQLite, so both stores read and write jobs the same way.
- A read-decide-write is one transaction that first locks the row (``SELECT ... FOR UPDATE``), so two
  processes racing on one job (a worker finishing it, a client cancelling it) cannot both win; the
  event the change produces is written in the same transaction.
- Claims take the oldest queued jobs with ``FOR UPDATE SKIP LOCKED``: concurrent workers never wait
  for each other and never take the same job.
- Admission runs under one transaction-level advisory lock, so two API replicas cannot both take
  the last place in the queue (or a key's last concurrent slot, credit or image token); a key's
  request-rate bucket under an advisory lock of its own. Rate buckets are rows (``rate_buckets``).
- The reaper runs under ``pg_try_advisory_xact_lock``: one process at a time reaps; the others
  skip that round instead of queueing behind it.
- Event numbers come from a sequence, which alone would let a later number commit before an earlier
  one (and a client resuming after the later one would skip the earlier for good). Every event insert
  first takes one transaction-level advisory lock, held until commit, so numbers become visible in
  order. The lock is always the last one a transaction takes (after its row locks), so it is held
  only for the rest of that transaction and cannot be part of a deadlock. Each insert also sends
  ``NOTIFY`` with the new number (delivered at commit) to wake readers in every process.
- Migrations: ``CREATE ... IF NOT EXISTS`` and ``ADD COLUMN IF NOT EXISTS`` at start (see
  :meth:`kleinserve.postgres.database.PgDatabase.migrate`).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from kleinserve.jobs.admission import Admission, take_or_refuse
from kleinserve.jobs.events import Event, EventType, lifecycle_event
from kleinserve.jobs.job import Job, JobStatus, now
from kleinserve.jobs.store.base import WorkerInfo
from kleinserve.keys import ApiKey
from kleinserve.postgres.database import PgDatabase, advisory_key
from kleinserve.postgres.notify import EVENTS_CHANNEL

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    body TEXT NOT NULL
);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS worker_id TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_status_lease ON jobs (status, lease_until);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    owner TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE TABLE IF NOT EXISTS rate_buckets (
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key_id, kind)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    models JSONB NOT NULL,
    info JSONB NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);
"""

Conn = psycopg.Connection[tuple[Any, ...]]
_COLUMNS = (
    "owner, status, model, created_at, completed_at, body, worker_id, attempts, lease_until, cancel_requested, id"
)
_Q = JobStatus.QUEUED.value
_P = JobStatus.PROCESSING.value
_EVENTS_LOCK = advisory_key("events")
_ADMISSION_LOCK = advisory_key("admission")
_REAP_LOCK = advisory_key("reap")


def _owner_clause(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("owner IS NULL", ()) if owner is None else ("owner = %s", (owner,))


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.owner,
        job.status.value,
        job.request.model,
        job.created_at,
        job.completed_at,
        job.model_dump_json(),
        job.worker_id,
        job.attempts,
        job.lease_until,
        job.cancel_requested,
        job.id,
    )


def _job(body: str) -> Job:
    return Job.model_validate_json(body)


def insert_events(db: Conn, events: Sequence[Event]) -> list[Event]:
    """Number and store ``events`` inside the caller's transaction ``db`` (see the module docstring)."""
    if not events:
        return []
    db.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_LOCK,))
    stored = []
    for event in events:
        body = event.model_dump(mode="json", exclude={"seq"})
        row = db.execute(
            "INSERT INTO events (job_id, owner, created_at, body) VALUES (%s,%s,%s,%s) RETURNING seq",
            (event.job_id, event.owner, event.created_at, json.dumps(body)),
        ).fetchone()
        assert row is not None
        stored.append(event.model_copy(update={"seq": int(row[0])}))
    db.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(stored[-1].seq)))
    return stored


class _Reads:
    """:class:`~kleinserve.jobs.admission.AdmissionReads` inside one enqueue transaction."""

    def __init__(self, db: Conn) -> None:
        self.db = db

    def active(self) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (%s, %s)", (_Q, _P)).fetchone()
        return int(row[0]) if row else 0

    def owner_active(self, owner: str) -> tuple[int, float]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM((body::jsonb->>'cost')::float8), 0) FROM jobs "
            "WHERE owner=%s AND status IN (%s, %s)",
            (owner, _Q, _P),
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    def spent(self, owner: str) -> float:
        # Usage is the key store's table in the same database (postgres/keys.py); without keys there is none.
        row = self.db.execute("SELECT to_regclass('api_usage') IS NOT NULL").fetchone()
        if not (row and row[0]):
            return 0.0
        row = self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM api_usage WHERE key_id=%s", (owner,)).fetchone()
        return float(row[0]) if row else 0.0

    def bucket(self, owner: str, kind: str) -> tuple[float, float] | None:
        row = self.db.execute(
            "SELECT tokens, updated FROM rate_buckets WHERE key_id=%s AND kind=%s", (owner, kind)
        ).fetchone()
        return (float(row[0]), float(row[1])) if row else None

    def save_bucket(self, owner: str, kind: str, tokens: float, updated: float) -> None:
        self.db.execute(
            "INSERT INTO rate_buckets (key_id, kind, tokens, updated) VALUES (%s,%s,%s,%s) "
            "ON CONFLICT (key_id, kind) DO UPDATE SET tokens=excluded.tokens, updated=excluded.updated",
            (owner, kind, tokens, updated),
        )


class PgJobStore:
    """:class:`~kleinserve.jobs.store.base.JobStore` on a PostgreSQL database."""

    def __init__(self, database: PgDatabase | str, *, owned: bool | None = None) -> None:
        # A URL opens a pool this store closes; a given pool is closed only when ``owned``.
        self._owned = isinstance(database, str) if owned is None else owned
        self.database = PgDatabase(database) if isinstance(database, str) else database
        self.database.migrate(SCHEMA)

    def close(self) -> None:
        if self._owned:
            self.database.close()

    # -- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def _insert(db: Conn, jobs: Sequence[Job]) -> None:
        with db.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", [_row(j) for j in jobs]
            )

    def add(self, job: Job) -> None:
        with self.database.transaction() as db:
            self._insert(db, [job])

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], admission: Admission) -> builtins.list[Event]:
        with self.database.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_ADMISSION_LOCK,))
            admission.check(_Reads(db), jobs)
            self._insert(db, jobs)
            return insert_events(db, events)

    def admit_request(self, key: ApiKey, now: float) -> None:
        with self.database.transaction() as db:
            # One key's request bucket at a time across processes (other keys are not held up).
            db.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(f"requests:{key.id}"),))
            take_or_refuse(_Reads(db), key, "requests", key.requests_per_minute, 1, now)

    @staticmethod
    def _save(db: Conn, before: Job | None, job: Job) -> Job:
        """Persist ``job`` and the event its status change produces, in the caller's transaction."""
        db.execute(
            "UPDATE jobs SET owner=%s, status=%s, model=%s, created_at=%s, completed_at=%s, body=%s, worker_id=%s, "
            "attempts=%s, lease_until=%s, cancel_requested=%s WHERE id=%s",
            _row(job),
        )
        event = lifecycle_event(before, job)
        if event is not None:
            insert_events(db, [event])
        return job

    @staticmethod
    def _lock(db: Conn, job_id: str) -> Job | None:
        row = db.execute("SELECT body FROM jobs WHERE id=%s FOR UPDATE", (job_id,)).fetchone()
        return _job(row[0]) if row else None

    def get(self, job_id: str) -> Job | None:
        with self.database.connection() as db:
            row = db.execute("SELECT body FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return _job(row[0]) if row else None

    def list(
        self,
        *,
        owner: str | None = None,
        any_owner: bool = True,
        statuses: Iterable[JobStatus] | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if not any_owner:
            clause, values = _owner_clause(owner)
            clauses.append(clause)
            params.extend(values)
        if statuses is not None:
            clauses.append("status = ANY(%s)")
            params.append([s.value for s in statuses])
        if model is not None:
            clauses.append("model = %s")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.database.connection() as db:
            rows = db.execute(
                f"SELECT body FROM jobs {where} ORDER BY created_at DESC LIMIT %s", (*params, limit)
            ).fetchall()
        return [_job(row[0]) for row in rows]

    def count(self, statuses: Iterable[JobStatus]) -> int:
        with self.database.connection() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ANY(%s)", ([s.value for s in statuses],)
            ).fetchone()
        return int(row[0]) if row else 0

    def queue_positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        wanted = builtins.list(dict.fromkeys(job_ids))
        if not wanted:
            return {}
        with self.database.connection() as db:
            rows = db.execute(
                "SELECT id, pos FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY created_at, id) - 1 AS pos "
                "FROM jobs WHERE status=%s) AS queued WHERE id = ANY(%s)",
                (_Q, wanted),
            ).fetchall()
        return {job_id: int(pos) for job_id, pos in rows}

    def transition(
        self, job_id: str, new: JobStatus, *, expect: Iterable[JobStatus] | None = None, **fields: Any
    ) -> Job | None:
        """Force a status change the lifecycle allows (tests and maintenance)."""
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None:
                return None
            changed = job.forced(new, expect, now(), **fields)
            return None if changed is None else self._save(db, job, changed)

    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set fields that are not the status (tests and maintenance)."""
        if "status" in fields:
            raise ValueError("use transition() to change a job's status")
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None:
                return None
            return self._save(db, job, job.model_copy(update=fields))

    # -- the leased queue -----------------------------------------------------------------------

    def claim(
        self, worker_id: str, models: Iterable[str] | None, lease_seconds: float, limit: int = 1
    ) -> builtins.list[Job]:
        wanted = None if models is None else builtins.list(models)
        if wanted == [] or limit < 1:
            return []
        only = "" if wanted is None else "AND model = ANY(%s) "
        params: tuple[Any, ...] = (_Q, limit) if wanted is None else (_Q, wanted, limit)
        with self.database.transaction() as db:
            rows = db.execute(
                f"SELECT body FROM jobs WHERE status=%s {only}ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
                params,
            ).fetchall()
            at = now()
            claimed = []
            for (body,) in rows:
                job = _job(body)
                claimed.append(self._save(db, job, job.claimed(worker_id, lease_seconds, at)))
            return claimed

    def renew(
        self,
        job_id: str,
        worker_id: str,
        attempt: int,
        lease_seconds: float,
        *,
        step: int | None = None,
        total: int | None = None,
    ) -> Job | None:
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None or not job.holds_lease(worker_id, attempt):
                return None
            renewed = self._save(db, job, job.renewed(lease_seconds, now(), step, total))
            if step is not None:
                insert_events(db, [Event.for_job(EventType.PROGRESS, renewed, step=step, total=renewed.progress_total)])
            return renewed

    def complete(self, job_id: str, worker_id: str, attempt: int, new: JobStatus, **fields: Any) -> Job | None:
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None or not job.holds_lease(worker_id, attempt):
                return None
            return self._save(db, job, job.finished(new, now(), **fields))

    def request_cancel(self, job_id: str) -> Job | None:
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None:
                return None
            changed = job.with_cancel_request(now())
            return job if changed is job else self._save(db, job, changed)

    def cancel_requested(self, job_id: str) -> bool:
        with self.database.connection() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return bool(row and row[0])

    def reap(
        self, max_attempts: int, now: float, dead_workers: Iterable[str] = ()
    ) -> tuple[builtins.list[Job], builtins.list[Job]]:
        dead = builtins.list(dead_workers)
        requeued: builtins.list[Job] = []
        ended: builtins.list[Job] = []
        with self.database.transaction() as db:
            row = db.execute("SELECT pg_try_advisory_xact_lock(%s)", (_REAP_LOCK,)).fetchone()
            if not (row and row[0]):  # another process is reaping right now
                return requeued, ended
            # SKIP LOCKED: a row locked right now belongs to a worker renewing or finishing it.
            rows = db.execute(
                "SELECT body FROM jobs WHERE status=%s AND (lease_until IS NULL OR lease_until < %s "
                "OR worker_id = ANY(%s)) ORDER BY created_at, id FOR UPDATE SKIP LOCKED",
                (_P, now, dead),
            ).fetchall()
            for (body,) in rows:
                job = _job(body)
                changed = self._save(db, job, job.expired(max_attempts, now))
                (requeued if changed.status is JobStatus.QUEUED else ended).append(changed)
        return requeued, ended

    def remove_finished_before(self, cutoff: float) -> builtins.list[Job]:
        terminal = [s.value for s in JobStatus if s.terminal]
        with self.database.transaction() as db:
            rows = db.execute(
                "DELETE FROM jobs WHERE status = ANY(%s) AND completed_at < %s RETURNING body", (terminal, cutoff)
            ).fetchall()
            db.execute("DELETE FROM events WHERE created_at < %s", (cutoff,))
        return [_job(body) for (body,) in rows]

    # -- events ---------------------------------------------------------------------------------

    def append_event(self, event: Event) -> Event:
        with self.database.transaction() as db:
            return insert_events(db, [event])[0]

    def events_after(
        self, seq: int, *, owner: str | None = None, any_owner: bool = True, limit: int = 1000
    ) -> builtins.list[Event]:
        query = "SELECT seq, body FROM events WHERE seq > %s"
        params: builtins.list[Any] = [seq]
        if not any_owner:
            clause, values = _owner_clause(owner)
            query += f" AND {clause}"
            params.extend(values)
        with self.database.connection() as db:
            rows = db.execute(query + " ORDER BY seq LIMIT %s", (*params, limit)).fetchall()
        return [Event.model_validate({**json.loads(body), "seq": s}) for s, body in rows]

    def last_seq_before(self, created_at: float) -> int:
        with self.database.connection() as db:
            row = db.execute("SELECT MAX(seq) FROM events WHERE created_at < %s", (created_at,)).fetchone()
        return int(row[0] or 0) if row else 0

    def last_seq(self) -> int:
        with self.database.connection() as db:
            row = db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0) if row else 0

    # -- workers --------------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, models: Iterable[str], info: dict[str, Any]) -> None:
        at = now()
        with self.database.connection() as db:
            db.execute(
                "INSERT INTO workers (id, models, info, started_at, seen_at) VALUES (%s,%s,%s,%s,%s) "
                "ON CONFLICT (id) DO UPDATE SET models=excluded.models, info=excluded.info, seen_at=excluded.seen_at",
                (worker_id, Jsonb(builtins.list(models)), Jsonb(info), at, at),
            )

    def live_workers(self, since: float) -> builtins.list[WorkerInfo]:
        with self.database.connection() as db:
            rows = db.execute(
                "SELECT id, models, info, started_at, seen_at FROM workers WHERE seen_at >= %s ORDER BY id", (since,)
            ).fetchall()
        return [
            WorkerInfo(id=i, models=m, info=info, started_at=started, seen_at=seen)
            for i, m, info, started, seen in rows
        ]

    def forget_worker(self, worker_id: str) -> None:
        with self.database.connection() as db:
            db.execute("DELETE FROM workers WHERE id=%s", (worker_id,))
