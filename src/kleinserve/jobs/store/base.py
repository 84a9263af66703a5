"""The job store interface: durable jobs, a leased queue, worker heartbeats and a numbered event log.

The store *is* the queue: a job accepted is a row, so a crash loses nothing. Stores persist; they do
not decide: every status change loads the job, applies one of the pure lifecycle methods of
:class:`~kleinserve.jobs.job.Job` and saves the result, atomically, and writes the event that change
produces (:func:`~kleinserve.jobs.events.lifecycle_event`) in the same transaction, so the event log
and the jobs never disagree.

Leases: :meth:`JobStore.claim` gives a worker a job until ``lease_until``; the worker renews the lease
while it runs and every later write of that worker (:meth:`JobStore.renew`,
:meth:`JobStore.complete`) is fenced by its ``worker_id`` and attempt number, so a worker wrongly
presumed dead cannot overwrite a newer attempt. :meth:`JobStore.reap` hands expired leases back to the
queue (or fails them as ``interrupted``); any process may call it at any time.

Event numbers never become visible out of order: a reader that has seen event *n* has seen every
event below *n* that will ever exist (SQLite: one writer at a time; PostgreSQL: inserts serialised
by a transaction-level advisory lock). :class:`~kleinserve.jobs.events.StoreEventBus` relies on it.

Adding a backend: implement this protocol (mirroring ``sqlite.py``), add a factory to the contract
suite in ``tests/jobs/contract.py`` and pick it in ``backends.py`` from ``KLEINSERVE_DATABASE_URL``.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from kleinserve.jobs.admission import Admission
from kleinserve.jobs.events import Event
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.keys import ApiKey


class WorkerInfo(BaseModel):
    """A worker process as its heartbeats describe it."""

    id: str
    models: list[str] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict, description="host, pid, device, ...")
    started_at: float
    seen_at: float


@runtime_checkable
class JobStore(Protocol):
    """Persistence for jobs, workers and events. Implementations must be safe to use from many
    threads (and, for shared databases, from many processes)."""

    # -- jobs -----------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Store a job as it is (tests and imports; submissions go through :meth:`enqueue`)."""

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], admission: Admission) -> builtins.list[Event]:
        """Admit and store new jobs and their first events in ONE transaction; return the numbered
        events. ``admission`` checks the queue bound and the submitting key's limits against the
        state read inside that transaction and raises its refusal (nothing is stored then)."""

    def admit_request(self, key: ApiKey, now: float) -> None:
        """Take one token from the key's request-rate bucket (stored in the database) in one
        transaction, or raise :class:`~kleinserve.errors.RateLimitedError`."""

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or ``None``."""

    def list(
        self,
        *,
        owner: str | None = None,
        any_owner: bool = True,
        statuses: Iterable[JobStatus] | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        """Jobs, newest first, filtered by owner (unless ``any_owner``), status and model."""

    def count(self, statuses: Iterable[JobStatus]) -> int:
        """How many jobs are in any of ``statuses``."""

    def queue_positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        """For each queued job among ``job_ids``, how many queued jobs are ahead of it, in one
        query; jobs not queued are left out."""

    # -- the leased queue -----------------------------------------------------------------------

    def claim(
        self, worker_id: str, models: Iterable[str] | None, lease_seconds: float, limit: int = 1
    ) -> builtins.list[Job]:
        """Atomically take up to ``limit`` of the oldest queued jobs for ``models`` (``None``: any
        model) (see :meth:`Job.claimed`), writing their ``job.started`` events."""

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
        """Extend the lease (and record progress, writing a ``job.progress`` event when ``step`` is
        given); ``None`` when the worker no longer holds the job (lost lease: stop, write nothing)."""

    def complete(self, job_id: str, worker_id: str, attempt: int, new: JobStatus, **fields: Any) -> Job | None:
        """End the worker's run (see :meth:`Job.finished`) and write its event; ``None`` when the
        worker no longer holds the job, so nothing was written."""

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now, or set ``cancel_requested`` on a processing one (its worker
        stops at the next step); a finished job is returned unchanged; ``None`` if missing."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether cancelling the job was asked for (cheap: workers call it at every step)."""

    def reap(
        self, max_attempts: int, now: float, dead_workers: Iterable[str] = ()
    ) -> tuple[builtins.list[Job], builtins.list[Job]]:
        """Jobs whose lease expired before ``now``, or held by one of ``dead_workers``, go back to
        the queue or fail (see :meth:`Job.expired`). Returns (requeued, ended)."""

    def remove_finished_before(self, cutoff: float) -> builtins.list[Job]:
        """Delete terminal jobs completed before ``cutoff`` (and older events); return them."""

    # -- workers --------------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, models: Iterable[str], info: dict[str, Any]) -> None:
        """Record that ``worker_id`` is alive and serves ``models``."""

    def live_workers(self, since: float) -> builtins.list[WorkerInfo]:
        """Workers whose last heartbeat is at or after ``since``."""

    def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's row (it stopped cleanly)."""

    # -- events ---------------------------------------------------------------------------------

    def append_event(self, event: Event) -> Event:
        """Store an event and return it with its sequence number."""

    def events_after(
        self, seq: int, *, owner: str | None = None, any_owner: bool = True, limit: int = 1000
    ) -> builtins.list[Event]:
        """Up to ``limit`` stored events numbered above ``seq``, oldest first; only ``owner``'s
        (``None`` meaning jobs without an owner) unless ``any_owner``."""

    def last_seq_before(self, created_at: float) -> int:
        """The number of the last event stored before ``created_at`` (0 when there is none)."""

    def last_seq(self) -> int:
        """The number of the last event stored (0 when there is none)."""

    def close(self) -> None:
        """Release connections."""
