"""Jobs: one accepted generation request, its lifecycle and its results (pure data, no I/O).

::

    queued ──> processing ──> succeeded
      │  ^         │    └───> failed
      │  └─────────┤          (a processing job goes back to queued when the server stops or
      │            │           crashes under it, until it has used up its attempts)
      └────────────┴───────> cancelled
      └─────────────────────> failed   (e.g. interrupted too often, or its model is gone)
"""

from __future__ import annotations

import time
import uuid
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

    @property
    def terminal(self) -> bool:
        return self.status.terminal
