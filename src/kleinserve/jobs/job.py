"""Jobs: one accepted generation request, its lifecycle and its results (pure data, no I/O).

::

    queued ──> processing ──> succeeded
      │  ^         │    └───> failed
      │  └─────────┤          (a processing job goes back to queued when the server stops or
      │            │           crashes under it, until it has used up its attempts)
      └────────────┴───────> cancelled
      └─────────────────────> failed   (e.g. interrupted too often, or its model is gone)

The lifecycle is decided here and only here, by pure methods on :class:`Job` that return the changed
job (or raise :class:`InvalidTransitionError`); job stores load, call one of them and persist the
result, so every backend follows the same rules:

- :meth:`Job.claimed`: a worker takes a queued job under a *lease* (``worker_id``, ``lease_until``)
  and uses one attempt; :meth:`Job.renewed` extends the lease (with progress).
- :meth:`Job.holds_lease`: the fence every worker write is checked against (worker id *and*
  attempt), so a worker wrongly presumed dead cannot overwrite a newer attempt.
- :meth:`Job.finished`: the worker's outcome (succeeded, failed, cancelled) or its hand-back at
  shutdown (queued again, the attempt not counted).
- :meth:`Job.with_cancel_request`: a queued job is cancelled at once; a processing one gets the
  stored ``cancel_requested`` flag its worker checks at every step.
- :meth:`Job.expired`: the lease ran out (its worker died): back to the queue, or failed as
  ``interrupted`` once it has had ``max_attempts`` attempts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, Field

from kleinserve.request import GenerationRequest
from kleinserve.safety import SafetyReport


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.PROCESSING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransitionError(Exception):
    """A status change the lifecycle does not allow (a programming error, not a user error)."""


def check_transition(current: JobStatus, new: JobStatus) -> None:
    """Raise :class:`InvalidTransitionError` unless ``current -> new`` is allowed."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransitionError(f"a {current.value} job cannot become {new.value}")


class JobOutput(BaseModel):
    """One stored image a job produced."""

    key: str = Field(description="Storage key of the encoded image.")
    media_type: str
    seed: int
    width: int
    height: int
    size_bytes: int


class JobResult(BaseModel):
    """What a succeeded job produced, with the parameters that produced it."""

    outputs: list[JobOutput]
    steps: int
    guidance: float
    timings: dict[str, float] = Field(default_factory=dict)


def now() -> float:
    """Wall-clock time in seconds, as stored on jobs."""
    return time.time()


def new_job_id() -> str:
    return str(uuid.uuid4())


class Job(BaseModel):
    """A generation request accepted by the server, and everything known about it since."""

    id: str = Field(default_factory=new_job_id)
    owner: str | None = Field(None, description="Id of the API key that submitted the job.")
    dialect: str = Field("kleinserve", description="API the job came through.")
    request_id: str | None = Field(None, description="X-Request-ID of the HTTP request that submitted the job.")
    webhook_url: str | None = Field(None, description="Where to POST the job's view when it finishes.")
    request: GenerationRequest
    extra: dict[str, object] = Field(
        default_factory=dict, description="Dialect-specific fields echoed back (e.g. Oxen's aspect_ratio)."
    )
    status: JobStatus = JobStatus.QUEUED
    created_at: float = Field(default_factory=now)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    cost: float = Field(0.0, description="Credits the job costs its key if it succeeds.")
    progress_step: int = 0
    progress_total: int = 0
    error_code: str | None = None
    error_message: str | None = None
    result: JobResult | None = None
    safety: SafetyReport | None = Field(None, description="The safety checker's verdict, when one ran.")
    worker_id: str | None = Field(None, description="The worker holding (or that last held) the job.")
    lease_until: float | None = Field(None, description="When the running job's lease runs out.")
    cancel_requested: bool = Field(False, description="A client asked to cancel the running job.")

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    # -- lifecycle: pure, each returns the changed job --------------------------------------------

    def _to(self, new: JobStatus, **fields: object) -> Job:
        check_transition(self.status, new)
        return self.model_copy(update={"status": new, **fields})

    def claimed(self, worker_id: str, lease_seconds: float, at: float) -> Job:
        """Taken by ``worker_id``: one more attempt, leased until ``at + lease_seconds``."""
        return self._to(
            JobStatus.PROCESSING,
            attempts=self.attempts + 1,
            worker_id=worker_id,
            lease_until=at + lease_seconds,
            started_at=at,
            progress_step=0,
            progress_total=0,
        )

    def holds_lease(self, worker_id: str, attempt: int) -> bool:
        """Whether ``worker_id``'s attempt number ``attempt`` is the job's current run."""
        return self.status is JobStatus.PROCESSING and self.worker_id == worker_id and self.attempts == attempt

    def lease_expired(self, at: float) -> bool:
        """A processing job whose lease ran out (a job from before leases existed has none)."""
        return self.status is JobStatus.PROCESSING and (self.lease_until is None or self.lease_until < at)

    def renewed(self, lease_seconds: float, at: float, step: int | None = None, total: int | None = None) -> Job:
        """The lease extended to ``at + lease_seconds``, with the progress if given."""
        if self.status is not JobStatus.PROCESSING:
            raise InvalidTransitionError(f"a {self.status.value} job has no lease to renew")
        update: dict[str, object] = {"lease_until": at + lease_seconds}
        if step is not None:
            update["progress_step"] = step
        if total is not None:
            update["progress_total"] = total
        return self.model_copy(update=update)

    def finished(self, new: JobStatus, at: float, **fields: object) -> Job:
        """The running job's outcome: succeeded (``result``), failed (``error_code``,
        ``error_message``) or cancelled; or ``queued`` when its worker hands it back at shutdown,
        in which case this run does not count as an attempt."""
        if self.status is not JobStatus.PROCESSING:
            raise InvalidTransitionError(f"a {self.status.value} job is not running")
        if new is JobStatus.QUEUED:
            return self._to(
                new,
                attempts=max(0, self.attempts - 1),
                worker_id=None,
                lease_until=None,
                progress_step=0,
                progress_total=0,
                **fields,
            )
        if new is JobStatus.SUCCEEDED and fields.get("result") is None:
            raise InvalidTransitionError("a succeeded job needs its result")
        return self._to(new, completed_at=at, lease_until=None, **fields)

    def forced(self, new: JobStatus, expect: Iterable[JobStatus] | None, at: float, **fields: object) -> Job | None:
        """A status change outside the leased path (tests and maintenance): ``None`` unless the job
        is in ``expect`` (default: any status) and the lifecycle allows ``new``; a terminal status
        gets ``completed_at`` unless ``fields`` set it."""
        allowed = set(expect) if expect is not None else set(JobStatus)
        if self.status not in allowed or new not in ALLOWED_TRANSITIONS[self.status]:
            return None
        changed = self.model_copy(update={"status": new, **fields})
        if new.terminal and changed.completed_at is None:
            changed.completed_at = at
        return changed

    def with_cancel_request(self, at: float) -> Job:
        """A queued job cancelled now; a processing one flagged for its worker; others unchanged."""
        if self.status is JobStatus.QUEUED:
            return self._to(JobStatus.CANCELLED, completed_at=at, cancel_requested=True)
        if self.status is JobStatus.PROCESSING:
            return self.model_copy(update={"cancel_requested": True})
        return self

    def expired(self, max_attempts: int, at: float) -> Job:
        """Its worker is gone: back to the queue (the attempt stays counted), or failed as
        ``interrupted`` once it has had ``max_attempts`` attempts."""
        if self.status is not JobStatus.PROCESSING:
            raise InvalidTransitionError(f"a {self.status.value} job has no lease to expire")
        if self.cancel_requested:
            return self._to(JobStatus.CANCELLED, completed_at=at, lease_until=None)
        if self.attempts >= max_attempts:
            return self._to(
                JobStatus.FAILED,
                completed_at=at,
                lease_until=None,
                error_code="interrupted",
                error_message=(
                    f"interrupted: the worker running this job stopped or crashed, {self.attempts} "
                    "time(s); it will not be retried"
                ),
            )
        return self._to(JobStatus.QUEUED, worker_id=None, lease_until=None, progress_step=0, progress_total=0)
