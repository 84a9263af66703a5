"""Tests for the job lifecycle and the Job model (kleinserve.jobs.job)."""

from __future__ import annotations

import itertools

import pytest

from kleinserve.jobs.job import (
    ALLOWED_TRANSITIONS,
    InvalidTransitionError,
    Job,
    JobOutput,
    JobResult,
    JobStatus,
    check_transition,
)
from kleinserve.request import GenerationRequest

Q, P, S, F, C = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)

# The lifecycle as documented in jobs/job.py, written out independently of ALLOWED_TRANSITIONS.
EXPECTED_ALLOWED = {
    (Q, P),
    (Q, C),
    (Q, F),
    (P, S),
    (P, F),
    (P, C),
    (P, Q),
}
ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))


def test_every_status_is_covered_by_the_table() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobStatus)
    assert len(ALL_PAIRS) == 25


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
def test_check_transition(current: JobStatus, new: JobStatus) -> None:
    if (current, new) in EXPECTED_ALLOWED:
        check_transition(current, new)  # does not raise
        assert new in ALLOWED_TRANSITIONS[current]
    else:
        with pytest.raises(InvalidTransitionError) as info:
            check_transition(current, new)
        assert current.value in str(info.value) and new.value in str(info.value)
        assert new not in ALLOWED_TRANSITIONS[current]


@pytest.mark.parametrize(("status", "terminal"), [(Q, False), (P, False), (S, True), (F, True), (C, True)])
def test_terminal(status: JobStatus, terminal: bool) -> None:
    assert status.terminal is terminal
    job = Job(request=GenerationRequest.parse({"prompt": "x"}), status=status)
    assert job.terminal is terminal
    # A terminal status has no way out.
    assert (ALLOWED_TRANSITIONS[status] == frozenset()) is terminal


def test_job_round_trips_through_json() -> None:
    request = GenerationRequest.parse(
        {
            "prompt": "a red fox",
            "images": ["https://example.com/a.png"],
            "width": 64,
            "height": 128,
            "steps": 3,
            "guidance": 2.5,
            "seed": 42,
            "num_images": 2,
            "output_format": "jpg",
            "quality": 80,
        }
    )
    job = Job(
        owner="key-1",
        dialect="oxen",
        request=request,
        extra={"aspect_ratio": "1:2", "nested": {"a": [1, 2]}},
        status=JobStatus.SUCCEEDED,
        started_at=1000.5,
        completed_at=1001.25,
        attempts=2,
        progress_step=3,
        progress_total=3,
        error_code=None,
        result=JobResult(
            outputs=[
                JobOutput(key=f"j/{i}.jpg", media_type="image/jpeg", seed=42 + i, width=64, height=128, size_bytes=9)
                for i in range(2)
            ],
            steps=3,
            guidance=2.5,
            timings={"denoise": 0.5},
        ),
    )
    text = job.model_dump_json()
    back = Job.model_validate_json(text)
    assert back == job
    assert back.status is JobStatus.SUCCEEDED
    assert back.request.output_format.value == "jpeg"
    assert back.result is not None and back.result.outputs[1].seed == 43
    assert back.model_dump_json() == text


def test_failed_job_round_trips_and_defaults() -> None:
    request = GenerationRequest.parse({"prompt": "x"})
    job = Job(request=request, status=F, error_code="boom", error_message="it broke")
    back = Job.model_validate_json(job.model_dump_json())
    assert back == job
    assert back.id == job.id and back.created_at == job.created_at
    # Fresh jobs get distinct ids and start queued with no attempts.
    other = Job(request=job.request)
    assert other.id != job.id
    assert other.status is Q and other.attempts == 0 and other.result is None


# -- the lifecycle methods (pure) -----------------------------------------------------------------


def _queued(**fields: object) -> Job:
    return Job(request=GenerationRequest.parse({"prompt": "x"}), **fields)  # type: ignore[arg-type]


def test_claim_renew_and_fence() -> None:
    job = _queued(attempts=1, progress_step=3)
    claimed = job.claimed("w1", 30.0, at=100.0)
    assert (claimed.status, claimed.attempts, claimed.worker_id) == (P, 2, "w1")
    assert claimed.lease_until == 130.0 and claimed.started_at == 100.0 and claimed.progress_step == 0
    assert job.status is Q  # pure: the original is unchanged
    assert claimed.holds_lease("w1", 2) and not claimed.holds_lease("w2", 2) and not claimed.holds_lease("w1", 1)
    assert not claimed.lease_expired(129.0) and claimed.lease_expired(131.0)
    renewed = claimed.renewed(30.0, at=120.0, step=2, total=4)
    assert renewed.lease_until == 150.0 and (renewed.progress_step, renewed.progress_total) == (2, 4)
    with pytest.raises(InvalidTransitionError):
        claimed.claimed("w2", 30.0, at=1.0)
    with pytest.raises(InvalidTransitionError):
        job.renewed(30.0, at=1.0)


def test_finished_outcomes() -> None:
    running = _queued().claimed("w1", 30.0, at=1.0)
    result = JobResult(outputs=[], steps=1, guidance=1.0)
    done = running.finished(S, at=5.0, result=result)
    assert done.status is S and done.completed_at == 5.0 and done.lease_until is None and not done.holds_lease("w1", 1)
    with pytest.raises(InvalidTransitionError):
        running.finished(S, at=5.0)  # a success without its result
    failed = running.finished(F, at=5.0, error_code="x", error_message="y")
    assert (failed.status, failed.error_code) == (F, "x")
    back = running.finished(Q, at=5.0)
    assert back.status is Q and back.attempts == 0 and back.worker_id is None and back.completed_at is None
    with pytest.raises(InvalidTransitionError):
        done.finished(F, at=6.0)


def test_cancel_request_and_expiry() -> None:
    queued = _queued()
    assert queued.with_cancel_request(at=2.0).status is C
    running = queued.claimed("w1", 30.0, at=1.0)
    flagged = running.with_cancel_request(at=2.0)
    assert flagged.status is P and flagged.cancel_requested
    assert flagged.expired(max_attempts=3, at=50.0).status is C
    done = running.finished(C, at=3.0)
    assert done.with_cancel_request(at=4.0) is done
    again = running.expired(max_attempts=3, at=50.0)
    assert again.status is Q and again.attempts == 1 and again.worker_id is None
    out = running.expired(max_attempts=1, at=50.0)
    assert out.status is F and out.error_code == "interrupted" and out.completed_at == 50.0
    with pytest.raises(InvalidTransitionError):
        queued.expired(max_attempts=3, at=1.0)
