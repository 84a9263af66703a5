"""The job store on PostgreSQL: many API and worker processes share one queue and one event log.

Mirrors ``sqlite.py`` behind the same :class:`~kleinserve.jobs.store.base.JobStore` protocol; the
job lifecycle is decided by ``jobs/job.py``, not here. Decisions:

- Each job is a row holding its JSON (``body``) with the columns queries filter on beside it, as in
  SQLite, so both stores read and write jobs the same way.
- A read-check-write is one transaction that first locks the row (``SELECT ... FOR UPDATE``), so two
  processes racing on one job (a worker finishing it, a client cancelling it) cannot both win.
- Claims take the oldest queued jobs with ``FOR UPDATE SKIP LOCKED``: concurrent workers never wait
  for each other and never take the same job.
- Event numbers come from a sequence, which alone would let a later number commit before an earlier
  one (and a client resuming after the later one would skip the earlier for good). Every event insert
  first takes one transaction-level advisory lock, held until commit, so numbers become visible in
  order. Each insert also sends ``NOTIFY`` with the new number (delivered at commit) to wake readers.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from kleinserve.jobs.events import Event
from kleinserve.jobs.job import ALLOWED_TRANSITIONS, Job, JobStatus, now
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
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    owner TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
"""

Conn = psycopg.Connection[tuple[Any, ...]]
_INSERT_JOB = (
    "INSERT INTO jobs (owner, status, model, created_at, completed_at, body, id) VALUES (%s,%s,%s,%s,%s,%s,%s)"
)
_EVENTS_LOCK = advisory_key("events")


def _owner_clause(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("owner IS NULL", ()) if owner is None else ("owner = %s", (owner,))


def insert_events(db: Conn, events: Sequence[Event]) -> list[Event]:
    """Number and store ``events`` inside the caller's transaction ``db`` (see the module docstring).

    The advisory lock is the last lock the transaction takes, so it is held only until commit.
    """
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


class PgJobStore:
    """:class:`~kleinserve.jobs.store.base.JobStore` on a PostgreSQL database."""

    def __init__(self, database: PgDatabase | str) -> None:
        self._owned = isinstance(database, str)
        self.database = PgDatabase(database) if isinstance(database, str) else database
        self.database.migrate(SCHEMA)

    def close(self) -> None:
        if self._owned:
            self.database.close()

    # -- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def _row(job: Job) -> tuple[Any, ...]:
        return (
            job.owner,
            job.status.value,
            job.request.model,
            job.created_at,
            job.completed_at,
            job.model_dump_json(),
            job.id,
        )

    @staticmethod
    def _job(body: str) -> Job:
        return Job.model_validate_json(body)

    def add(self, job: Job) -> None:
        with self.database.connection() as db:
            db.execute(_INSERT_JOB, self._row(job))

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], max_active: int) -> builtins.list[Event] | None:
        with self.database.transaction() as db:
            # One admission at a time across every process: the count and the inserts are atomic.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("admission"),))
            row = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN (%s, %s)",
                (JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
            ).fetchone()
            if row is None or int(row[0]) + len(jobs) > max_active:
                return None
            with db.cursor() as cursor:
                cursor.executemany(_INSERT_JOB, [self._row(job) for job in jobs])
            return insert_events(db, events)

    def _save(self, db: Conn, job: Job) -> None:
        db.execute(
            "UPDATE jobs SET owner=%s, status=%s, model=%s, created_at=%s, completed_at=%s, body=%s WHERE id=%s",
            self._row(job),
        )

    def _lock(self, db: Conn, job_id: str) -> Job | None:
        row = db.execute("SELECT body FROM jobs WHERE id=%s FOR UPDATE", (job_id,)).fetchone()
        return self._job(row[0]) if row else None

    def get(self, job_id: str) -> Job | None:
        with self.database.connection() as db:
            row = db.execute("SELECT body FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return self._job(row[0]) if row else None

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
        return [self._job(row[0]) for row in rows]

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
                (JobStatus.QUEUED.value, wanted),
            ).fetchall()
        return {job_id: int(pos) for job_id, pos in rows}

    def transition(
        self, job_id: str, new: JobStatus, *, expect: Iterable[JobStatus] | None = None, **fields: Any
    ) -> Job | None:
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None:
                return None
            allowed = set(expect) if expect is not None else set(JobStatus)
            if job.status not in allowed or new not in ALLOWED_TRANSITIONS[job.status]:
                return None
            job = job.model_copy(update={"status": new, **fields})
            if new.terminal and job.completed_at is None:
                job.completed_at = now()
            self._save(db, job)
            return job

    def update(self, job_id: str, **fields: Any) -> Job | None:
        if "status" in fields:
            raise ValueError("use transition() to change a job's status")
        with self.database.transaction() as db:
            job = self._lock(db, job_id)
            if job is None:
                return None
            job = job.model_copy(update=fields)
            self._save(db, job)
            return job

    def claim_next(self) -> Job | None:
        with self.database.transaction() as db:
            row = db.execute(
                "SELECT body FROM jobs WHERE status=%s ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (JobStatus.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            job = self._job(row[0])
            job = job.model_copy(
                update={
                    "status": JobStatus.PROCESSING,
                    "attempts": job.attempts + 1,
                    "started_at": now(),
                    "progress_step": 0,
                    "progress_total": 0,
                }
            )
            self._save(db, job)
            return job

    def recover(self, max_attempts: int) -> tuple[builtins.list[Job], builtins.list[Job]]:
        requeued: builtins.list[Job] = []
        failed: builtins.list[Job] = []
        with self.database.transaction() as db:
            rows = db.execute(
                "SELECT body FROM jobs WHERE status=%s FOR UPDATE", (JobStatus.PROCESSING.value,)
            ).fetchall()
            for (body,) in rows:
                job = self._job(body)
                if job.attempts >= max_attempts:
                    job = job.model_copy(
                        update={
                            "status": JobStatus.FAILED,
                            "completed_at": now(),
                            "error_code": "interrupted",
                            "error_message": (
                                f"interrupted: the server stopped while this job was running, "
                                f"{job.attempts} time(s); it will not be retried"
                            ),
                        }
                    )
                    failed.append(job)
                else:
                    job = job.model_copy(update={"status": JobStatus.QUEUED, "progress_step": 0})
                    requeued.append(job)
                self._save(db, job)
        return requeued, failed

    def remove_finished_before(self, cutoff: float) -> builtins.list[Job]:
        terminal = [s.value for s in JobStatus if s.terminal]
        with self.database.transaction() as db:
            rows = db.execute(
                "DELETE FROM jobs WHERE status = ANY(%s) AND completed_at < %s RETURNING body", (terminal, cutoff)
            ).fetchall()
            db.execute("DELETE FROM events WHERE created_at < %s", (cutoff,))
        return [self._job(body) for (body,) in rows]

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
