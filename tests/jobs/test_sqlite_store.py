"""Tests for the SQLite job store (kleinserve.jobs.store.sqlite), on a real file in tmp_path."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kleinserve.jobs.events import Event, EventType
from kleinserve.jobs.job import Job, JobResult, JobStatus
from kleinserve.jobs.store import SQLiteJobStore
from kleinserve.request import GenerationRequest
from tests.jobs.test_job import ALL_PAIRS, EXPECTED_ALLOWED, C, F, P, Q, S


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def make_job(
    created_at: float,
    *,
    owner: str | None = None,
    status: JobStatus = Q,
    model: str = "flux-2-klein-4b",
    **fields: Any,
) -> Job:
    request = GenerationRequest.parse({"prompt": f"job at {created_at}", "model": model, "seed": 1})
    return Job(request=request, owner=owner, status=status, created_at=created_at, **fields)


def make_event(job: Job, created_at: float | None = None, type_: EventType = EventType.PROGRESS, **data: Any) -> Event:
    event = Event.for_job(type_, job, **data)
    if created_at is not None:
        event = event.model_copy(update={"created_at": created_at})
    return event


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
def test_transition_honours_lifecycle(store: SQLiteJobStore, current: JobStatus, new: JobStatus) -> None:
    job = make_job(10.0, status=current)
    store.add(job)
    before = store.get(job.id)
    result = store.transition(job.id, new, error_message="changed")
    if (current, new) in EXPECTED_ALLOWED:
        assert result is not None
        assert result.status is new and result.error_message == "changed"
        assert store.get(job.id) == result
        assert store.list(statuses=[new])[0].id == job.id  # the status column moved too
    else:
        assert result is None
        assert store.get(job.id) == before


def test_transition_expect(store: SQLiteJobStore) -> None:
    job = make_job(10.0, status=Q)
    store.add(job)
    # Allowed by the lifecycle, but not in the expected statuses: nothing changes.
    assert store.transition(job.id, C, expect=[P]) is None
    assert store.get(job.id) == job
    assert store.transition(job.id, C, expect=[]) is None
    assert store.get(job.id) == job
    done = store.transition(job.id, C, expect=[Q, P])
    assert done is not None and done.status is C
    # Expected, but forbidden by the lifecycle: nothing changes either.
    assert store.transition(job.id, Q, expect=[C]) is None
    assert store.get(job.id) == done
    assert store.transition("missing", C) is None


def test_transition_sets_completed_at_on_terminal_only(store: SQLiteJobStore) -> None:
    job = make_job(10.0)
    store.add(job)
    started = time.time()
    processing = store.transition(job.id, P, expect=[Q], started_at=started)
    assert processing is not None and processing.completed_at is None and processing.started_at == started
    back = store.transition(job.id, Q)
    assert back is not None and back.completed_at is None
    store.transition(job.id, P)
    result = JobResult(outputs=[], steps=2, guidance=1.0)
    before = time.time()
    done = store.transition(job.id, S, expect=[P], result=result)
    after = time.time()
    assert done is not None and done.completed_at is not None
    assert before <= done.completed_at <= after
    assert store.get(job.id) == done and done.result == result
    # A terminal row is found by remove_finished_before through its completed_at column.
    assert [j.id for j in store.remove_finished_before(after + 1)] == [job.id]


@pytest.mark.parametrize("terminal", [S, F, C])
def test_every_terminal_transition_sets_completed_at(store: SQLiteJobStore, terminal: JobStatus) -> None:
    job = make_job(10.0, status=P)
    store.add(job)
    done = store.transition(job.id, terminal)
    assert done is not None and done.completed_at is not None
    assert store.get(job.id).completed_at == done.completed_at  # type: ignore[union-attr]


def test_update_sets_fields_but_refuses_status(store: SQLiteJobStore) -> None:
    job = make_job(10.0, status=P)
    store.add(job)
    updated = store.update(job.id, progress_step=3, progress_total=8)
    assert updated is not None and (updated.progress_step, updated.progress_total) == (3, 8)
    assert store.get(job.id) == updated
    with pytest.raises(ValueError):
        store.update(job.id, status=S)
    with pytest.raises(ValueError):
        store.update(job.id, status=S, progress_step=5)
    assert store.get(job.id) == updated
    assert store.count([S]) == 0
    assert store.update("missing", progress_step=1) is None


def test_concurrent_claims_never_share_a_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteJobStore(path)
    second = SQLiteJobStore(path)  # as another process would have
    try:
        jobs = [make_job(float(i)) for i in range(20)]
        for job in jobs:
            first.add(job)
        stores = [first, first, second, second]
        barrier = threading.Barrier(len(stores))
        claimed: list[list[str]] = [[] for _ in stores]
        errors: list[BaseException] = []

        def claim_all(index: int) -> None:
            try:
                barrier.wait()
                while got := stores[index].claim(f"w{index}", None, 30.0):
                    claimed[index].extend(j.id for j in got)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        everything = [job_id for ids in claimed for job_id in ids]
        assert len(everything) == len(set(everything)) == 20
        assert set(everything) == {job.id for job in jobs}
        # Each claimer took jobs oldest first.
        order = {job.id: job.created_at for job in jobs}
        for ids in claimed:
            assert [order[i] for i in ids] == sorted(order[i] for i in ids)
        for job in jobs:
            stored = second.get(job.id)
            assert stored is not None and stored.status is P and stored.attempts == 1
    finally:
        first.close()
        second.close()


def test_everything_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    jobs = [make_job(float(i), owner=f"o{i % 2}") for i in range(4)]
    for job in jobs:
        store.add(job)
    store.claim("w1", None, 30.0)
    store.transition(jobs[1].id, C, expect=[Q])
    store.update(jobs[0].id, progress_step=2, progress_total=5)
    events = [store.append_event(make_event(job, step=i)) for i, job in enumerate(jobs)]
    snapshot = {job.id: store.get(job.id) for job in jobs}
    store.close()

    reopened = SQLiteJobStore(path)
    try:
        for job in jobs:
            assert reopened.get(job.id) == snapshot[job.id]
        assert [j.id for j in reopened.list()] == [j.id for j in reversed(jobs)]
        assert reopened.count([C]) == 1 and reopened.count([P]) == 1 and reopened.count([Q]) == 2
        assert reopened.events_after(events[0].seq - 1)[-len(events) :] == events
        assert [e.type for e in reopened.events_after(0)][:2] == [EventType.STARTED, EventType.CANCELLED]
        # Numbering continues after the last stored event.
        more = reopened.append_event(make_event(jobs[0]))
        assert more.seq > events[-1].seq
        # The queue continues too.
        [claimed] = reopened.claim("w2", None, 30.0)
        assert claimed.id == jobs[2].id
    finally:
        reopened.close()


def test_a_database_from_before_leases_is_migrated_and_its_running_job_reaped(tmp_path: Path) -> None:
    """The first schema had no lease columns; a job it left processing is handed back by reap()."""
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT, status TEXT NOT NULL, model TEXT NOT NULL,
            created_at REAL NOT NULL, completed_at REAL, body TEXT NOT NULL);
        CREATE INDEX jobs_status_created ON jobs (status, created_at);
        CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, owner TEXT,
            created_at REAL NOT NULL, body TEXT NOT NULL);
        """
    )
    running = make_job(1.0, status=P, attempts=1)
    queued = make_job(2.0)
    body = {running.id: running.model_dump_json(exclude={"worker_id", "lease_until", "cancel_requested"})}
    body[queued.id] = queued.model_dump_json(exclude={"worker_id", "lease_until", "cancel_requested"})
    for job in (running, queued):
        old.execute(
            "INSERT INTO jobs (id, owner, status, model, created_at, completed_at, body) VALUES (?,?,?,?,?,?,?)",
            (job.id, None, job.status.value, job.request.model, job.created_at, None, body[job.id]),
        )
    old.commit()
    old.close()

    store = SQLiteJobStore(path)
    try:
        assert store.get(running.id) == running and store.get(queued.id) == queued
        requeued, ended = store.reap(max_attempts=3, now=time.time())
        assert [j.id for j in requeued] == [running.id] and ended == []
        [claimed] = store.claim("w1", None, 30.0)
        assert claimed.id == running.id and claimed.attempts == 2 and claimed.lease_until is not None
    finally:
        store.close()
