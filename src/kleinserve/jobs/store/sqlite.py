"""The default job store: one SQLite file in the data directory, in WAL mode.

Each job is a row holding its JSON, with the columns queries filter on beside it. Every write is a
short ``BEGIN IMMEDIATE`` transaction, which serialises writers across threads and processes (an
``api`` and a ``worker`` process may share the file), so status checks and changes are atomic and
event numbers become visible in order. Each thread gets its own connection.

Migration: a database from before leases gains the ``worker_id``, ``attempts``, ``lease_until`` and
``cancel_requested`` columns (``ALTER TABLE``) on open; its processing jobs have no lease, so the
first :meth:`SQLiteJobStore.reap` treats them as expired, as the start-up ``recover()`` did.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kleinserve.database import Database
from kleinserve.jobs.admission import Admission, take_or_refuse
from kleinserve.jobs.events import Event, EventType, lifecycle_event
from kleinserve.jobs.job import Job, JobStatus, now
from kleinserve.jobs.store.base import WorkerInfo
from kleinserve.keys import ApiKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    completed_at REAL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE TABLE IF NOT EXISTS rate_buckets (
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    tokens REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (key_id, kind)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    info TEXT NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);
"""
# Columns added since the first schema: (name, declaration) in the order they were added.
_ADDED_COLUMNS = (
    ("worker_id", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("lease_until", "REAL"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_status_lease ON jobs (status, lease_until);
"""
_COLUMNS = (
    "owner, status, model, created_at, completed_at, body, worker_id, attempts, lease_until, cancel_requested, id"
)
_Q = JobStatus.QUEUED.value
_P = JobStatus.PROCESSING.value


class _Reads:
    """:class:`~kleinserve.jobs.admission.AdmissionReads` inside one write transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def active(self) -> int:
        (count,) = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (_Q, _P)).fetchone()
        return int(count)

    def owner_active(self, owner: str) -> tuple[int, float]:
        count, reserved = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(json_extract(body, '$.cost')), 0) FROM jobs "
            "WHERE owner=? AND status IN (?, ?)",
            (owner, _Q, _P),
        ).fetchone()
        return int(count), float(reserved)

    def spent(self, owner: str) -> float:
        # Usage is the key store's table in the same file (keys.py); without keys there is none.
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='api_usage'").fetchone() is None:
            return 0.0
        (spent,) = self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM api_usage WHERE key_id=?", (owner,)).fetchone()
        return float(spent)

    def bucket(self, owner: str, kind: str) -> tuple[float, float] | None:
        row = self.db.execute("SELECT tokens, updated FROM rate_buckets WHERE key_id=? AND kind=?", (owner, kind))
        found = row.fetchone()
        return (float(found[0]), float(found[1])) if found else None

    def save_bucket(self, owner: str, kind: str, tokens: float, updated: float) -> None:
        self.db.execute(
            "INSERT INTO rate_buckets (key_id, kind, tokens, updated) VALUES (?,?,?,?) "
            "ON CONFLICT (key_id, kind) DO UPDATE SET tokens=excluded.tokens, updated=excluded.updated",
            (owner, kind, tokens, updated),
        )


class SQLiteJobStore:
    """:class:`~kleinserve.jobs.store.base.JobStore` on a SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._database = Database(self.path, _SCHEMA)
        self._db = self._database.connection
        self._write = self._database.write
        with self._write() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, declaration in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self._database.connection().executescript(_INDEXES)

    def close(self) -> None:
        self._database.close()

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
            job.worker_id,
            job.attempts,
            job.lease_until,
            int(job.cancel_requested),
            job.id,
        )

    def _insert(self, db: sqlite3.Connection, jobs: Sequence[Job]) -> None:
        db.executemany(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", [self._row(j) for j in jobs])

    def add(self, job: Job) -> None:
        with self._write() as db:
            self._insert(db, [job])

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], admission: Admission) -> builtins.list[Event]:
        with self._write() as db:
            admission.check(_Reads(db), jobs)
            self._insert(db, jobs)
            return [self._insert_event(db, event) for event in events]

    def admit_request(self, key: ApiKey, now: float) -> None:
        with self._write() as db:
            take_or_refuse(_Reads(db), key, "requests", key.requests_per_minute, 1, now)

    def _save(self, db: sqlite3.Connection, before: Job | None, job: Job) -> Job:
        """Persist ``job`` and the event its status change produces, in the caller's transaction."""
        db.execute(
            "UPDATE jobs SET owner=?, status=?, model=?, created_at=?, completed_at=?, body=?, worker_id=?, "
            "attempts=?, lease_until=?, cancel_requested=? WHERE id=?",
            self._row(job),
        )
        event = lifecycle_event(before, job)
        if event is not None:
            self._insert_event(db, event)
        return job

    @staticmethod
    def _load(db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT body FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.model_validate_json(row[0]) if row else None

    def get(self, job_id: str) -> Job | None:
        return self._load(self._db(), job_id)

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
            clauses.append("owner IS ?")
            params.append(owner)
        if statuses is not None:
            wanted = [s.value for s in statuses]
            clauses.append(f"status IN ({','.join('?' * len(wanted))})")
            params.extend(wanted)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db().execute(f"SELECT body FROM jobs {where} ORDER BY created_at DESC LIMIT ?", (*params, limit))
        return [Job.model_validate_json(row[0]) for row in rows]

    def count(self, statuses: Iterable[JobStatus]) -> int:
        wanted = [s.value for s in statuses]
        row = (
            self._db()
            .execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' * len(wanted))})", wanted)
            .fetchone()
        )
        return int(row[0])

    def queue_positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        wanted = builtins.list(dict.fromkeys(job_ids))
        if not wanted:
            return {}
        rows = self._db().execute(
            "SELECT id, pos FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY created_at, id) - 1 AS pos "
            f"FROM jobs WHERE status=?) WHERE id IN ({','.join('?' * len(wanted))})",
            (_Q, *wanted),
        )
        return {job_id: int(pos) for job_id, pos in rows}

    def transition(
        self, job_id: str, new: JobStatus, *, expect: Iterable[JobStatus] | None = None, **fields: Any
    ) -> Job | None:
        """Force a status change the lifecycle allows (tests and maintenance; the server uses the
        leased methods below)."""
        with self._write() as db:
            job = self._load(db, job_id)
            if job is None:
                return None
            changed = job.forced(new, expect, now(), **fields)
            return None if changed is None else self._save(db, job, changed)

    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set fields that are not the status (tests and maintenance)."""
        if "status" in fields:
            raise ValueError("use transition() to change a job's status")
        with self._write() as db:
            job = self._load(db, job_id)
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
        only = "" if wanted is None else f"AND model IN ({','.join('?' * len(wanted))}) "
        with self._write() as db:
            rows = db.execute(
                f"SELECT body FROM jobs WHERE status=? {only}ORDER BY created_at, id LIMIT ?",
                (_Q, *(wanted or []), limit),
            ).fetchall()
            at = now()
            claimed = []
            for (body,) in rows:
                job = Job.model_validate_json(body)
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
        with self._write() as db:
            job = self._load(db, job_id)
            if job is None or not job.holds_lease(worker_id, attempt):
                return None
            renewed = self._save(db, job, job.renewed(lease_seconds, now(), step, total))
            if step is not None:
                self._insert_event(
                    db, Event.for_job(EventType.PROGRESS, renewed, step=step, total=renewed.progress_total)
                )
            return renewed

    def complete(self, job_id: str, worker_id: str, attempt: int, new: JobStatus, **fields: Any) -> Job | None:
        with self._write() as db:
            job = self._load(db, job_id)
            if job is None or not job.holds_lease(worker_id, attempt):
                return None
            return self._save(db, job, job.finished(new, now(), **fields))

    def request_cancel(self, job_id: str) -> Job | None:
        with self._write() as db:
            job = self._load(db, job_id)
            if job is None:
                return None
            changed = job.with_cancel_request(now())
            return job if changed is job else self._save(db, job, changed)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db().execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row[0])

    def reap(
        self, max_attempts: int, now: float, dead_workers: Iterable[str] = ()
    ) -> tuple[builtins.list[Job], builtins.list[Job]]:
        dead = builtins.list(dead_workers)
        requeued: builtins.list[Job] = []
        ended: builtins.list[Job] = []
        with self._write() as db:
            rows = db.execute(
                "SELECT body FROM jobs WHERE status=? AND (lease_until IS NULL OR lease_until < ? "
                f"OR worker_id IN ({','.join('?' * len(dead))}))",
                (_P, now, *dead),
            ).fetchall()
            for (body,) in rows:
                job = Job.model_validate_json(body)
                changed = self._save(db, job, job.expired(max_attempts, now))
                (requeued if changed.status is JobStatus.QUEUED else ended).append(changed)
        return requeued, ended

    def remove_finished_before(self, cutoff: float) -> builtins.list[Job]:
        terminal = [s.value for s in JobStatus if s.terminal]
        with self._write() as db:
            rows = db.execute(
                f"SELECT body FROM jobs WHERE status IN ({','.join('?' * len(terminal))}) AND completed_at < ?",
                (*terminal, cutoff),
            ).fetchall()
            removed = [Job.model_validate_json(body) for (body,) in rows]
            db.executemany("DELETE FROM jobs WHERE id=?", [(job.id,) for job in removed])
            db.execute("DELETE FROM events WHERE created_at < ?", (cutoff,))
        return removed

    # -- events ---------------------------------------------------------------------------------

    @staticmethod
    def _insert_event(db: sqlite3.Connection, event: Event) -> Event:
        body = event.model_dump(mode="json", exclude={"seq"})
        cursor = db.execute(
            "INSERT INTO events (job_id, owner, created_at, body) VALUES (?,?,?,?)",
            (event.job_id, event.owner, event.created_at, json.dumps(body)),
        )
        return event.model_copy(update={"seq": int(cursor.lastrowid or 0)})

    def append_event(self, event: Event) -> Event:
        with self._write() as db:
            return self._insert_event(db, event)

    def events_after(
        self, seq: int, *, owner: str | None = None, any_owner: bool = True, limit: int = 1000
    ) -> builtins.list[Event]:
        query = "SELECT seq, body FROM events WHERE seq > ?"
        params: builtins.list[Any] = [seq]
        if not any_owner:
            query += " AND owner IS ?"
            params.append(owner)
        rows = self._db().execute(query + " ORDER BY seq LIMIT ?", (*params, limit))
        return [Event.model_validate({**json.loads(body), "seq": s}) for s, body in rows]

    def last_seq_before(self, created_at: float) -> int:
        row = self._db().execute("SELECT MAX(seq) FROM events WHERE created_at < ?", (created_at,)).fetchone()
        return int(row[0] or 0)

    def last_seq(self) -> int:
        row = self._db().execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    # -- workers --------------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, models: Iterable[str], info: dict[str, Any]) -> None:
        at = now()
        with self._write() as db:
            db.execute(
                "INSERT INTO workers (id, models, info, started_at, seen_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET models=excluded.models, info=excluded.info, seen_at=excluded.seen_at",
                (worker_id, json.dumps(builtins.list(models)), json.dumps(info), at, at),
            )

    def live_workers(self, since: float) -> builtins.list[WorkerInfo]:
        rows = self._db().execute(
            "SELECT id, models, info, started_at, seen_at FROM workers WHERE seen_at >= ? ORDER BY id", (since,)
        )
        return [
            WorkerInfo(id=i, models=json.loads(m), info=json.loads(info), started_at=started, seen_at=seen)
            for i, m, info, started, seen in rows
        ]

    def forget_worker(self, worker_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE id=?", (worker_id,))
