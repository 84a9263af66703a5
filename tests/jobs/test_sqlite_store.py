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
from kleinserve.jobs.store import JobStore, SQLiteJobStore
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


def test_is_a_job_store(store: SQLiteJobStore) -> None:
    assert isinstance(store, JobStore)


# -- add / get / list / count ---------------------------------------------------------------------


def test_add_and_get(store: SQLiteJobStore) -> None:
    job = make_job(100.0, owner="alice", extra={"k": "v"})
    store.add(job)
    got = store.get(job.id)
    assert got == job
    assert store.get("no-such-id") is None


def test_add_twice_is_refused(store: SQLiteJobStore) -> None:
    job = make_job(100.0)
    store.add(job)
    with pytest.raises(sqlite3.IntegrityError):
        store.add(job)
    assert len(store.list()) == 1


def test_list_newest_first_and_filters(store: SQLiteJobStore) -> None:
    a = make_job(1.0, owner="alice")
    b = make_job(2.0, owner="bob", status=P)
    c = make_job(3.0, owner=None, status=S, model="flux-2-klein-9b")
    d = make_job(4.0, owner="alice", status=F, model="flux-2-klein-9b")
    e = make_job(5.0, owner=None)
    for job in (c, a, e, b, d):  # insertion order does not matter
        store.add(job)

    def ids(jobs: list[Job]) -> list[str]:
        return [j.id for j in jobs]

    assert ids(store.list()) == [e.id, d.id, c.id, b.id, a.id]
    # The owner filter is ignored unless any_owner=False.
    assert ids(store.list(owner="alice")) == [e.id, d.id, c.id, b.id, a.id]
    assert ids(store.list(owner="alice", any_owner=False)) == [d.id, a.id]
    assert ids(store.list(owner="bob", any_owner=False)) == [b.id]
    assert ids(store.list(owner=None, any_owner=False)) == [e.id, c.id]
    assert ids(store.list(owner="nobody", any_owner=False)) == []
    assert ids(store.list(statuses=[Q])) == [e.id, a.id]
    assert ids(store.list(statuses=[S, F, C])) == [d.id, c.id]
    assert ids(store.list(statuses=[])) == []
    assert ids(store.list(model="flux-2-klein-9b")) == [d.id, c.id]
    assert ids(store.list(model="flux-2-klein-base-4b")) == []
    assert ids(store.list(limit=2)) == [e.id, d.id]
    assert ids(store.list(owner="alice", any_owner=False, statuses=[Q], model="flux-2-klein-4b")) == [a.id]
    assert ids(store.list(owner=None, any_owner=False, model="flux-2-klein-9b", limit=5)) == [c.id]


def test_count(store: SQLiteJobStore) -> None:
    assert store.count([Q, P]) == 0
    statuses = [Q, Q, P, S, F, C, C]
    for i, status in enumerate(statuses):
        store.add(make_job(float(i), status=status))
    assert store.count([Q]) == 2
    assert store.count([Q, P]) == 3
    assert store.count([C]) == 2
    assert store.count(list(JobStatus)) == len(statuses)
    assert store.count([]) == 0


# -- transition / update ---------------------------------------------------------------------------


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


# -- claiming -----------------------------------------------------------------------------------


def test_claim_next_takes_oldest_queued(store: SQLiteJobStore) -> None:
    assert store.claim_next() is None
    newer = make_job(30.0)
    oldest = make_job(10.0, attempts=1, progress_step=4, progress_total=9)
    middle_done = make_job(5.0, status=S)  # older, but not queued
    middle_running = make_job(7.0, status=P)
    for job in (newer, oldest, middle_done, middle_running):
        store.add(job)
    before = time.time()
    claimed = store.claim_next()
    after = time.time()
    assert claimed is not None and claimed.id == oldest.id
    assert claimed.status is P
    assert claimed.attempts == 2
    assert claimed.started_at is not None and before <= claimed.started_at <= after
    assert (claimed.progress_step, claimed.progress_total) == (0, 0)
    assert store.get(oldest.id) == claimed
    second = store.claim_next()
    assert second is not None and second.id == newer.id and second.attempts == 1
    assert store.claim_next() is None
    assert store.count([Q]) == 0 and store.count([P]) == 3


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
                while (job := stores[index].claim_next()) is not None:
                    claimed[index].append(job.id)
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


# -- recovery -----------------------------------------------------------------------------------


def test_recover(store: SQLiteJobStore) -> None:
    under = make_job(1.0, status=P, attempts=1, progress_step=3, progress_total=4, started_at=1.5)
    under2 = make_job(2.0, status=P, attempts=2)
    at_limit = make_job(3.0, status=P, attempts=3)
    over_limit = make_job(4.0, status=P, attempts=5)
    queued = make_job(5.0, status=Q, attempts=3)
    done = make_job(6.0, status=S, attempts=3, completed_at=7.0)
    for job in (under, under2, at_limit, over_limit, queued, done):
        store.add(job)
    before = time.time()
    requeued, failed = store.recover(max_attempts=3)
    assert {j.id for j in requeued} == {under.id, under2.id}
    assert {j.id for j in failed} == {at_limit.id, over_limit.id}
    for job in (under, under2):
        stored = store.get(job.id)
        assert stored is not None
        assert stored.status is Q and stored.attempts == job.attempts and stored.progress_step == 0
        assert stored.completed_at is None
    for job in (at_limit, over_limit):
        stored = store.get(job.id)
        assert stored is not None and stored.status is F
        assert stored.error_code == "interrupted"
        assert stored.error_message is not None and "interrupted" in stored.error_message
        assert stored.completed_at is not None and stored.completed_at >= before
    assert store.get(queued.id) == queued
    assert store.get(done.id) == done
    # The status columns moved too: requeued jobs can be claimed again, oldest first.
    assert store.count([P]) == 0
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == under.id and claimed.attempts == 2
    # Nothing left to recover but the job just claimed.
    requeued, failed = store.recover(max_attempts=2)
    assert requeued == [] and [j.id for j in failed] == [under.id]


# -- persistence and cleanup ------------------------------------------------------------------------


def test_everything_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    jobs = [make_job(float(i), owner=f"o{i % 2}") for i in range(4)]
    for job in jobs:
        store.add(job)
    store.claim_next()
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
        assert reopened.events_after(0) == events
        # Numbering continues after the last stored event.
        more = reopened.append_event(make_event(jobs[0]))
        assert more.seq > events[-1].seq
        # The queue continues too.
        claimed = reopened.claim_next()
        assert claimed is not None and claimed.id == jobs[2].id
    finally:
        reopened.close()


def test_remove_finished_before(store: SQLiteJobStore) -> None:
    old_done = make_job(1.0, status=S, completed_at=100.0)
    old_failed = make_job(2.0, status=F, completed_at=150.0)
    old_cancelled = make_job(3.0, status=C, completed_at=199.0)
    new_done = make_job(4.0, status=S, completed_at=300.0)
    at_cutoff = make_job(5.0, status=F, completed_at=200.0)
    old_queued = make_job(6.0, status=Q)
    old_processing = make_job(7.0, status=P, started_at=50.0)
    jobs = (old_done, old_failed, old_cancelled, new_done, at_cutoff, old_queued, old_processing)
    for job in jobs:
        store.add(job)
    e_old = store.append_event(make_event(old_done, created_at=150.0))
    e_old_active = store.append_event(make_event(old_queued, created_at=199.0))
    e_cutoff = store.append_event(make_event(new_done, created_at=200.0))
    e_new = store.append_event(make_event(new_done, created_at=250.0))
    assert e_old.seq < e_old_active.seq

    removed = store.remove_finished_before(200.0)
    assert {j.id for j in removed} == {old_done.id, old_failed.id, old_cancelled.id}
    assert next(j for j in removed if j.id == old_done.id) == old_done
    for job in (old_done, old_failed, old_cancelled):
        assert store.get(job.id) is None
    for job in (new_done, at_cutoff, old_queued, old_processing):
        assert store.get(job.id) == job
    assert store.events_after(0) == [e_cutoff, e_new]
    assert store.remove_finished_before(200.0) == []


# -- events --------------------------------------------------------------------------------------


def test_append_event_numbers_increasingly(store: SQLiteJobStore) -> None:
    job = make_job(1.0, owner="alice")
    stored = [store.append_event(make_event(job, step=i)) for i in range(5)]
    seqs = [e.seq for e in stored]
    assert seqs[0] >= 1
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    for i, event in enumerate(stored):
        assert event.data == {"step": i} and event.job_id == job.id and event.owner == "alice"
    assert store.events_after(0) == stored


def test_events_after_and_owner_filter(store: SQLiteJobStore) -> None:
    alice = make_job(1.0, owner="alice")
    bob = make_job(2.0, owner="bob")
    anon = make_job(3.0, owner=None)
    stored = []
    for i, job in enumerate([alice, bob, anon, alice, bob, alice]):
        type_ = EventType.QUEUED if i < 3 else EventType.STARTED
        stored.append(store.append_event(make_event(job, type_=type_, i=i)))
    assert store.events_after(0) == stored
    assert store.events_after(stored[2].seq) == stored[3:]
    assert store.events_after(stored[-1].seq) == []
    assert store.events_after(stored[0].seq, owner="alice", any_owner=False) == [stored[3], stored[5]]
    assert store.events_after(0, owner="bob", any_owner=False) == [stored[1], stored[4]]
    assert store.events_after(0, owner="nobody", any_owner=False) == []
    assert store.events_after(0, owner=None, any_owner=False) == [stored[2]]  # jobs without an owner
    assert [e.type for e in store.events_after(0)] == [EventType.QUEUED] * 3 + [EventType.STARTED] * 3
    assert store.events_after(stored[3].seq)[0].data == {"i": 4}


def test_last_seq_before(store: SQLiteJobStore) -> None:
    assert store.last_seq_before(1e12) == 0
    job = make_job(1.0)
    e1 = store.append_event(make_event(job, created_at=10.0))
    e2 = store.append_event(make_event(job, created_at=20.0))
    e3 = store.append_event(make_event(job, created_at=30.0))
    assert store.last_seq_before(5.0) == 0
    assert store.last_seq_before(10.0) == 0  # strictly before
    assert store.last_seq_before(10.5) == e1.seq
    assert store.last_seq_before(25.0) == e2.seq
    assert store.last_seq_before(30.0) == e2.seq
    assert store.last_seq_before(31.0) == e3.seq
    # Replaying from that number gives exactly the events at or after the time.
    assert store.events_after(store.last_seq_before(20.0)) == [e2, e3]


# -- stored jobs are validated once, on entry -----------------------------------------------------


def test_lower_prompt_limit_does_not_stop_the_queue(store: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    long_prompt = "a lighthouse at dusk, " * 20
    request = GenerationRequest.parse({"prompt": long_prompt, "model": "flux-2-klein-4b", "seed": 1})
    job = Job(request=request, created_at=1.0)
    assert store.enqueue([job], [make_event(job, type_=EventType.QUEUED)], max_active=10) is not None
    # The operator lowers the limit below the queued prompt: new requests are refused...
    monkeypatch.setenv("KLEINSERVE_MAX_PROMPT_CHARS", "10")
    from kleinserve.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        GenerationRequest.parse({"prompt": long_prompt})
    # ...but the job already accepted still reads, lists and runs, without rebuilding settings.
    from kleinserve.settings import Settings

    def no_settings(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("stored jobs must load without building Settings()")

    monkeypatch.setattr(Settings, "__init__", no_settings)
    assert store.get(job.id) == job
    assert [j.id for j in store.list()] == [job.id]
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == job.id and claimed.request.prompt == long_prompt


def test_queue_positions_in_one_query(store: SQLiteJobStore) -> None:
    jobs = [make_job(float(t)) for t in (3, 1, 2, 4)]
    for job in jobs:
        store.add(job)
    store.transition(jobs[3].id, C)
    positions = store.queue_positions([j.id for j in jobs] + ["no-such-id"])
    assert positions == {jobs[1].id: 0, jobs[2].id: 1, jobs[0].id: 2}
    assert store.queue_positions([]) == {}
