"""The default job store: one SQLite file in the data directory, in WAL mode.

Each job is a row holding its JSON, with the columns queries filter on beside it. Every write is a
short ``BEGIN IMMEDIATE`` transaction, which serialises writers across threads and processes, so
status checks and changes are atomic. Each thread gets its own connection.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kleinserve.database import Database
from kleinserve.jobs.events import Event
from kleinserve.jobs.job import ALLOWED_TRANSITIONS, Job, JobStatus, now

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
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
"""


class SQLiteJobStore:
    """:class:`~kleinserve.jobs.store.base.JobStore` on a SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._database = Database(self.path, _SCHEMA)
        self._db = self._database.connection
        self._write = self._database.write

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
            job.id,
        )

    def add(self, job: Job) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (owner, status, model, created_at, completed_at, body, id) VALUES (?,?,?,?,?,?,?)",
                self._row(job),
            )

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], max_active: int) -> builtins.list[Event] | None:
        active = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)
        with self._write() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", active).fetchone()
            if count + len(jobs) > max_active:
                return None
            db.executemany(
                "INSERT INTO jobs (owner, status, model, created_at, completed_at, body, id) VALUES (?,?,?,?,?,?,?)",
                [self._row(job) for job in jobs],
            )
            return [self._insert_event(db, event) for event in events]

    def _save(self, db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "UPDATE jobs SET owner=?, status=?, model=?, created_at=?, completed_at=?, body=? WHERE id=?",
            self._row(job),
        )

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
            (JobStatus.QUEUED.value, *wanted),
        )
        return {job_id: int(pos) for job_id, pos in rows}

    def transition(
        self, job_id: str, new: JobStatus, *, expect: Iterable[JobStatus] | None = None, **fields: Any
    ) -> Job | None:
        with self._write() as db:
            job = self._load(db, job_id)
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
        with self._write() as db:
            job = self._load(db, job_id)
            if job is None:
                return None
            job = job.model_copy(update=fields)
            self._save(db, job)
            return job

    def claim_next(self) -> Job | None:
        with self._write() as db:
            row = db.execute(
                "SELECT body FROM jobs WHERE status=? ORDER BY created_at LIMIT 1", (JobStatus.QUEUED.value,)
            ).fetchone()
            if row is None:
                return None
            job = Job.model_validate_json(row[0])
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
        with self._write() as db:
            rows = db.execute("SELECT body FROM jobs WHERE status=?", (JobStatus.PROCESSING.value,)).fetchall()
            for (body,) in rows:
                job = Job.model_validate_json(body)
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
