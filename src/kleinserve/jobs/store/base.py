"""The job store interface: durable jobs, an atomic queue, and a numbered event log.

The store *is* the queue: a job accepted is a row, so a crash loses nothing. Every status change
goes through :meth:`JobStore.transition`, which checks the lifecycle in ``jobs/job.py`` and the
caller's expectation atomically, so two racing parties (a worker finishing, a client cancelling)
can never both win.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from kleinserve.jobs.events import Event
from kleinserve.jobs.job import Job, JobStatus


@runtime_checkable
class JobStore(Protocol):
    """Persistence for jobs and events. Implementations must be safe to use from many threads."""

    def add(self, job: Job) -> None:
        """Store a new job."""

    def enqueue(self, jobs: Sequence[Job], events: Sequence[Event], max_active: int) -> builtins.list[Event] | None:
        """Store new jobs and their first events in one transaction, unless that would bring the
        queued and processing jobs over ``max_active``; return the numbered events, or ``None``."""

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

    def transition(
        self, job_id: str, new: JobStatus, *, expect: Iterable[JobStatus] | None = None, **fields: Any
    ) -> Job | None:
        """Move a job to ``new`` and set ``fields``, atomically.

        Returns the updated job, or ``None`` when the job is missing or its status is not in
        ``expect`` (default: any status the lifecycle allows to become ``new``).
        """

    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set fields that are not the status (progress, for one)."""

    def claim_next(self) -> Job | None:
        """Atomically take the oldest queued job: processing, one more attempt, started now."""

    def recover(self, max_attempts: int) -> tuple[builtins.list[Job], builtins.list[Job]]:
        """After a restart: jobs left processing go back to the queue, or fail as interrupted once
        they have had ``max_attempts`` attempts. Returns (requeued, failed)."""

    def remove_finished_before(self, cutoff: float) -> builtins.list[Job]:
        """Delete terminal jobs completed before ``cutoff`` (and older events); return them."""

    def append_event(self, event: Event) -> Event:
        """Store an event and return it with its sequence number."""

    def events_after(
        self, seq: int, *, owner: str | None = None, any_owner: bool = True, limit: int = 1000
    ) -> builtins.list[Event]:
        """Up to ``limit`` stored events numbered above ``seq``, oldest first; only ``owner``'s
        (``None`` meaning jobs without an owner) unless ``any_owner``."""

    def last_seq_before(self, created_at: float) -> int:
        """The number of the last event stored before ``created_at`` (0 when there is none)."""

    def close(self) -> None:
        """Release connections."""
